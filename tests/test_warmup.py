"""The engine's warm-up pass: how many images, no effect on the training stream, not on resume."""

from __future__ import annotations

import torch

from pivotseg.engine import Trainer
from tests.test_engine import ToyData, ToySegmenter, losses, train_cfg


class WarmToy(ToySegmenter):
    """A toy whose warm-up records the batches it is shown and changes nothing."""

    def __init__(self, warmup_images: int):
        super().__init__()
        self.warmup_images = warmup_images
        self.warm_batches: list[torch.Tensor] = []

    def warm_up(self, images, labels):
        assert images.shape[0] == labels.shape[0]
        self.warm_batches.append(images.clone())


def fit(tmp_path, name, model, resume=None, stop_at=None, **cfg):
    trainer = Trainer(model, train_cfg(**cfg), ToyData(), tmp_path / name, seed=3)
    trainer.fit(resume=resume, stop_at=stop_at)
    return trainer


def test_warm_up_sees_the_requested_images_and_leaves_training_unchanged(tmp_path):
    torch.manual_seed(0)
    plain = ToySegmenter()
    torch.manual_seed(0)
    warm = WarmToy(warmup_images=5)
    fit(tmp_path, "plain", plain, iterations=4)
    fit(tmp_path, "warm", warm, iterations=4)
    # ceil(5 / 2) batches of the per-device batch size 2, drawn from the training set.
    assert [b.shape[0] for b in warm.warm_batches] == [2, 2, 2]
    data = ToyData().images
    for image in torch.cat(warm.warm_batches):
        assert any(torch.equal(image, d) or torch.equal(image, d.flip(-1)) for d in data)
    # The warm-up has its own sample order: training sees exactly the plain run's batches.
    assert losses(tmp_path / "warm") == losses(tmp_path / "plain")
    for a, b in zip(plain.parameters(), warm.parameters()):
        assert torch.equal(a, b)


def test_resume_does_not_warm_up_again(tmp_path):
    model = WarmToy(warmup_images=2)
    fit(tmp_path, "run", model, iterations=4, checkpoint_every=2, stop_at=2)
    assert len(model.warm_batches) == 1
    again = WarmToy(warmup_images=2)
    fit(tmp_path, "run", again, iterations=4, resume=tmp_path / "run" / "checkpoints" / "last")
    assert again.warm_batches == []


def test_no_warm_up_without_images(tmp_path):
    model = WarmToy(warmup_images=0)
    fit(tmp_path, "run", model, iterations=1)
    assert model.warm_batches == []
