"""Deterministic data order: an endless sampler whose position is a function of the iteration.

Exact resume needs the same images, with the same augmentations, at every iteration whether the
run was interrupted or not, and whatever the number of processes. The training stream is one
global sequence of samples: epoch ``e`` is a permutation of the dataset drawn from
``seed + e``, and the ``g``-th sample of the stream has its own augmentation seed derived from
``(seed, g)``. Process ``r`` of ``W`` takes stream positions ``r, r + W, r + 2W, ...``, so an
optimiser step of global batch ``B`` always consumes positions ``[t * B, (t + 1) * B)`` in
total, on one device with accumulation or on ``W`` devices. Resuming at iteration ``t`` only
needs ``t``: no sampler state is saved.

:class:`ClassBalancedSampler` keeps these properties for rare-class sampling: the ``g``-th sample
is drawn (a class, then an image holding it) from a generator of ``(seed, g)`` alone.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, position: int) -> int:
    """A well-mixed 32-bit seed for stream position ``position`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


class InfiniteSampler(Sampler):
    """Yields ``(dataset_index, epoch, augmentation_seed)`` for one process, forever.

    Args:
        size: number of samples in the dataset.
        seed: run seed; epoch ``e`` is shuffled with ``seed + e``.
        rank, world_size: this process and the number of processes.
        start: how many samples this process has already consumed (``iteration * accumulation
            * per_device_batch_size`` on resume).
        shuffle: ``False`` walks the dataset in order (useful for tests and debugging).
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ):
        if size < 1:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.start, self.shuffle = start, shuffle

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        position = self.start * self.world_size + self.rank
        epoch, order = -1, []
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = self._order(epoch)
            yield order[position % self.size], epoch, sample_seed(self.seed, position)
            position += self.world_size


class ClassDraw(Protocol):
    """What :class:`ClassBalancedSampler` draws from (e.g.
    :class:`pivotseg.data.rare_classes.RareClassSampling`)."""

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """One ``(dataset index, class)``."""
        ...


class ClassBalancedSampler(Sampler):
    """Yields ``(dataset_index, position, augmentation_seed, class)`` for one process, forever.

    Stream position ``g`` draws its class and image from ``default_rng([seed, g, 1])`` through
    ``classes.draw`` and gets the augmentation seed :func:`sample_seed` ``(seed, g)``. The
    position also stands in for the epoch, so an image drawn twice gets two augmentations.
    Arguments as for :class:`InfiniteSampler`.
    """

    def __init__(
        self,
        classes: ClassDraw,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ):
        self.classes, self.seed, self.rank, self.world_size = classes, seed, rank, world_size
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        position = self.start * self.world_size + self.rank
        while True:
            # The trailing 1 keeps this stream apart from the augmentation seed's (seed, g).
            index, cls = self.classes.draw(np.random.default_rng([self.seed, position, 1]))
            yield index, position, sample_seed(self.seed, position), cls
            position += self.world_size


class SeededItems(Dataset):
    """Wraps a dataset so that item ``(index, epoch, seed)`` is drawn reproducibly.

    Datasets with ``set_epoch`` (:class:`pivotseg.data.SegDataset`, whose seeded transforms
    draw from ``(transform seed, epoch, index)``) get the sample's stream epoch, and those with
    ``set_crop_class`` the class a key ``(index, epoch, seed, class)`` names (else ``None``, so
    no class carries over from a previous item). For transforms that use the global generators
    instead, Python's, NumPy's and torch's are seeded with
    ``seed`` for the duration of one ``dataset[index]`` call and restored afterwards. Either
    way a sample depends on its stream position only (not on which worker or process loads
    it), and the main process's own random state is left as it was when ``num_workers=0``.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...]):
        index, epoch, seed = key[:3]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if hasattr(self.dataset, "set_crop_class"):
            self.dataset.set_crop_class(key[3] if len(key) > 3 else None)
        py_state, np_state = random.getstate(), np.random.get_state()
        torch_state = torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


def shard_indices(size: int, rank: int, world_size: int) -> list[int]:
    """Indices ``rank, rank + W, ...`` of ``range(size)``: every index on exactly one process.

    Unlike ``DistributedSampler`` nothing is padded, so no sample counts twice in a metric that
    is summed over processes (shards may differ in length by one).
    """
    return list(range(rank, size, world_size))
