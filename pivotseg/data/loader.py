"""DataLoader helpers: batching item dicts and seeding workers."""

from __future__ import annotations

import random

import numpy as np
import torch

from pivotseg.data.taxonomy import IGNORE_INDEX


def _as_image_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image
    array = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(array)


def _as_label_tensor(label) -> torch.Tensor:
    if isinstance(label, torch.Tensor):
        return label.long()
    return torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))


def collate(batch: list[dict]) -> dict:
    """Stack a list of items into ``image (B, 3, H, W)``, ``label (B, H, W)`` and ``meta`` list.

    Items of different sizes are padded bottom/right to the largest (image 0, label 255); each
    meta gets ``input_size``, the image size before that padding. Numpy items (no
    ``ToTensor``) are converted.
    """
    images = [_as_image_tensor(item["image"]) for item in batch]
    h = max(img.shape[-2] for img in images)
    w = max(img.shape[-1] for img in images)
    metas = []
    for item, img in zip(batch, images):
        meta = dict(item.get("meta", {}))
        meta["input_size"] = (int(img.shape[-2]), int(img.shape[-1]))
        metas.append(meta)
    image_batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, img in enumerate(images):
        image_batch[i, :, : img.shape[-2], : img.shape[-1]] = img
    out = {"image": image_batch, "meta": metas}
    if all("label" in item for item in batch):
        labels = [_as_label_tensor(item["label"]) for item in batch]
        lh = max(lab.shape[-2] for lab in labels)
        lw = max(lab.shape[-1] for lab in labels)
        label_batch = torch.full((len(labels), lh, lw), IGNORE_INDEX, dtype=torch.int64)
        for i, lab in enumerate(labels):
            label_batch[i, : lab.shape[-2], : lab.shape[-1]] = lab
        out["label"] = label_batch
    return out


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader: seed numpy and ``random`` from the worker's torch seed.

    Transforms built with a ``seed`` do not need it (they seed per item); it makes unseeded
    numpy/random use in user transforms differ between workers and follow ``torch.manual_seed``.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
