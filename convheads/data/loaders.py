"""Loading images for training and evaluation: a dataset over a manifest, seeded per-sample
augmentation, and the DataLoader that feeds the training engine (one process or several).

Images are decoded and transformed in DataLoader worker processes; every sample's augmentation is
seeded on its own (SeededSampler), so results do not depend on the number of workers.
"""
import contextlib
import os
import random
import threading
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from ..errors import ConvHeadsError
from .images import open_image


@contextlib.contextmanager
def seeded(seed: Optional[int]) -> Iterator[None]:
    """Seed the generators the transforms draw from (Python's random, torch's CPU generator) for
    one sample, and put them back afterwards (the caller's streams, e.g. dropout's, go on as they
    were). numpy's is left alone: none of the augment presets use it, and saving it costs more
    than the transform."""
    if seed is None:
        yield
        return
    state = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    torch.default_generator.manual_seed(seed)  # torch.manual_seed would also seed every GPU: 80x slower
    try:
        yield
    finally:
        random.setstate(state[0])
        torch.set_rng_state(state[1])


class ManifestDataset(Dataset):
    """One split of a dataset manifest: (image, label) pairs decoded from root/<path> on access.

    Paths are kept in one numpy bytes array, not a list of Python strings, so DataLoader workers
    share the parent's memory instead of copying it as they touch each object's refcount.
    An index may come with a seed (see SeededSampler): the sample's augmentation is then the
    same whichever worker process draws it.
    """

    def __init__(self, manifest: Path, root: Path, split: str, transform=None, chunksize: int = 100_000):
        self.root = Path(root)
        paths, labels = [], []
        try:
            for chunk in pd.read_csv(manifest, usecols=["path", "label", "split"], chunksize=chunksize,
                                     dtype={"path": str, "label": np.int64, "split": str}, keep_default_na=False):
                chunk = chunk[chunk.split == split]
                paths.append(chunk.path.to_numpy(dtype=bytes))
                labels.append(chunk.label.to_numpy())
        except (OSError, ValueError) as e:
            raise ConvHeadsError(f"cannot read the dataset manifest {manifest} ({e}); rerun the data stage") from None
        self.paths = np.concatenate(paths) if paths else np.array([], dtype=bytes)
        self.labels = np.concatenate(labels) if labels else np.array([], dtype=np.int64)
        if len(self.paths) == 0:
            raise ConvHeadsError(f"the {split} split of {manifest} has no images; rerun the data stage")
        self.transform = transform or transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        img = open_image(self.root / self.paths[i].decode())
        with seeded(seed):
            return self.transform(img), int(self.labels[i])


class SeededSampler(Sampler):
    """Every index (shuffled if `shuffle`) with its own random seed, both drawn from the global
    torch RNG when an epoch starts (convheads.training.train reseeds it every epoch). Augmentation
    then depends on the seed alone: not on the number of workers, nor on whether they persist
    between epochs, and a resumed run equals an uninterrupted one.

    For training over several processes (`batch_size`, the global batch of one update, with this
    process's `rank` of `world`): every process draws the same order, as DistributedSampler does
    from its seed and epoch; an incomplete last global batch is dropped (timm's drop_last), and
    each process takes every world-th index of each global batch. The images of update s, over all
    processes, are then those of update s in one process with the same global batch.
    """

    def __init__(self, size: int, shuffle: bool, batch_size: Optional[int] = None, rank: int = 0, world: int = 1):
        self.size, self.shuffle, self.batch_size, self.rank, self.world = size, shuffle, batch_size, rank, world
        used = size if batch_size is None else size // batch_size * batch_size
        self.indices = range(rank, used, world)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        order = torch.randperm(self.size) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,))
        order, seeds = order.tolist(), seeds.tolist()
        return ((order[i], seeds[i]) for i in self.indices)


class ImageLoader(DataLoader):
    """A DataLoader that re-raises a worker's ConvHeadsError (a bad image file) with its own
    message, not wrapped in the worker's traceback."""

    def __iter__(self):
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except ConvHeadsError as e:
                text = str(e)
                marker = f"{ConvHeadsError.__name__}: "
                raise ConvHeadsError(text[text.rindex(marker) + len(marker):].strip() if marker in text
                                     else text) from None
            yield batch


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers() -> int:
    """DataLoader workers: one per CPU core this process may use, but one for the main process,
    at most 8 (more rarely helps one GPU, and each holds its prefetched batches)."""
    return max(0, min(8, cpu_cores() - 1))


def forget_parent_exit_hooks(worker_id: int) -> None:
    """DataLoader worker init. Workers are forked, so they inherit the parent's thread-exit callbacks
    (threading._register_atexit): a workflow engine's, such as Prefect's service drains, then run at the
    worker's exit, fail there (its service threads do not exist in the child) and make a worker that
    finished cleanly exit with code 1, which the loader reports as a crashed worker."""
    hooks = getattr(threading, "_threading_atexits", None)  # private in CPython 3.9-3.13: hence getattr
    if hooks is not None:
        hooks.clear()


def make_loader(dataset: Dataset, batch_size: int, train: bool = False, num_workers: int = 0,
                pin_memory: bool = False, persistent_workers: bool = True, drop_last: bool = False,
                rank: int = 0, world: int = 1, accumulation: int = 1) -> DataLoader:
    """A loader over `dataset`; when `train`, shuffled with a seed per sample (SeededSampler).

    drop_last (training): `batch_size` is the global batch of one update, over `world` processes
    and `accumulation` steps; this process's loader yields its batch_size / (world x accumulation)
    images per step, and an incomplete last update is dropped. Otherwise (evaluation) process
    `rank` of `world` reads every world-th image, all of them together once.
    """
    if drop_last:
        share = world * accumulation
        if batch_size % share:
            raise ConvHeadsError(f"batch_size {batch_size} (the global batch of one update) must be a multiple of "
                                 f"processes x accumulation steps = {world} x {accumulation}")
        if len(dataset) < share:
            raise ConvHeadsError(f"the training split has {len(dataset)} images, fewer than processes x "
                                 f"accumulation steps = {world} x {accumulation}")
        batch_size = min(batch_size, len(dataset) // share * share)  # a split smaller than a batch: one update
        sampler = SeededSampler(len(dataset), train, batch_size, rank, world)
        batch_size //= world * accumulation
    else:
        sampler = SeededSampler(len(dataset), True) if train else (range(rank, len(dataset), world) if world > 1
                                                                   else None)
    workers = num_workers
    # The loader's own generator: its worker base seed (drawn when workers start, i.e. only in the
    # first epoch if they persist) must not come from the global RNG the sampler draws from.
    return ImageLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                       persistent_workers=persistent_workers and workers > 0,
                       generator=torch.Generator().manual_seed(0), worker_init_fn=forget_parent_exit_hooks)
