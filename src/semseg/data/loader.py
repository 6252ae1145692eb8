"""Loaders: an infinite, exactly resumable train stream and a sharded eval loader.

Exact resume: the train sampler yields `(index, sample_seed)` pairs. Epoch e is a permutation
drawn from `torch.Generator().manual_seed(seed + e)`, sharded across ranks like
`DistributedSampler(drop_last=True)`; the sample seed is derived from (seed, epoch, position in
the permutation), and the dataset seeds the whole augmentation pipeline with it. So batch k of a
rank is a pure function of (seed, rank, world_size, k): independent of num_workers, of which
worker loads it, and of where a run was stopped (start_batch skips without loading anything).

User errors (a truncated JPEG, a bad mask value, ...) raised while loading reach the caller as
themselves, with workers or without: a worker hands the exception back as a value instead of
letting the DataLoader re-wrap it into a "Caught ... in DataLoader worker" traceback text.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from semseg.errors import UserError


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Augmentation seed of the sample at `position` of epoch `epoch`'s permutation."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class InfiniteSeededSampler(Sampler):
    """Endless `(index, sample_seed)` stream of one rank, starting after `start_sample` samples."""

    def __init__(
        self, size: int, seed: int, rank: int = 0, world_size: int = 1, start_sample: int = 0
    ):
        self.per_rank = size // world_size  # drop_last: every rank sees the same count
        if self.per_rank == 0:
            raise ValueError(f"{size} samples cannot be split over {world_size} ranks")
        self.size, self.seed = size, seed
        self.rank, self.world_size = rank, world_size
        self.start_sample = start_sample

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's (index, sample_seed) pairs of one epoch."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.size, generator=gen).tolist()
        positions = range(self.rank, self.per_rank * self.world_size, self.world_size)
        return [(perm[p], sample_seed(self.seed, epoch, p)) for p in positions]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start_sample, self.per_rank)
        for e in itertools.count(epoch):
            yield from self.epoch_order(e)[offset:]
            offset = 0

    def __len__(self) -> int:
        # Infinite; DataLoader only needs len() for its own bookkeeping, never reached here.
        return 2**62


class ShardSampler(Sampler):
    """Indices rank, rank + world_size, ...: every item on exactly one rank, no padding."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class LoadFailure:
    """A :class:`UserError` raised while loading one sample, carried out of the worker as a value."""

    def __init__(self, error: UserError) -> None:
        self.error = error


class UserErrorsAsValues(Dataset):
    """``dataset`` whose items are :class:`LoadFailure` where loading raises a UserError."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        try:
            return self.dataset[index]
        except UserError as e:
            return LoadFailure(e)

    def __getattr__(self, name: str) -> Any:  # names, has_labels, ... of the wrapped dataset
        if name == "dataset":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_or_failure(items: list[Any]) -> Any:
    """The batch, or the first LoadFailure among its items."""
    failure = next((item for item in items if isinstance(item, LoadFailure)), None)
    return failure if failure is not None else default_collate(items)


class SegmentationLoader(DataLoader):
    """A DataLoader that raises a sample's UserError in the caller's process, as itself."""

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:
        super().__init__(UserErrorsAsValues(dataset), collate_fn=collate_or_failure, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, LoadFailure):
                raise batch.error
            yield batch


def worker_init(worker_id: int) -> None:
    """Keep each worker single-threaded inside cv2 (workers already run in parallel)."""
    cv2.setNumThreads(0)


def _pin(pin_memory: bool) -> bool:
    # Pinning only helps (and only works without a warning) with an accelerator present.
    return pin_memory and torch.cuda.is_available()


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    pin_memory: bool = True,
) -> Iterator[dict[str, Any]]:
    """Infinite iterator of collated train batches; `start_batch` resumes exactly after a stop."""
    sampler = InfiniteSeededSampler(
        len(dataset), seed, rank, world_size, start_sample=start_batch * batch_size
    )
    loader = SegmentationLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=_pin(pin_memory),
        drop_last=True,
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_init,
        # Worker base seeds come from here, not from the global RNG that dropout uses (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """Deterministic eval loader; rank r gets items r, r + world_size, ... (each exactly once).
    ``pin_memory``: for a model on a GPU (on the CPU it would only create a CUDA context)."""
    return SegmentationLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        pin_memory=_pin(pin_memory),
        drop_last=False,
        persistent_workers=False,
        worker_init_fn=worker_init,
    )
