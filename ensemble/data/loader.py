"""From image files to batches: the Dataset, the DataLoader factory, the decoded cache, normalisation.

Per image: decode -> preprocess (a deterministic view chain, e.g. `pad`) -> resize
to S x S -> [cached as uint8] -> train-time augmentation (named views or an albumentations
pipeline, `ensemble.data.albu`) or TTA views. Batches stay uint8 until `normalize_batch`,
one vectorised step per batch (on the GPU when there is one).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from ensemble.data import albu
from ensemble.data import views as views_mod
from ensemble.data.manifest import BAD_IMAGE_POLICIES, BadImageError, decode_image
from ensemble.errors import UserError
from ensemble.io import atomic_path

# --------------------------------------------------------------------------- normalisation


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def compute_normalization(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) of uint8 images shaped N x H x W x 3.

    The distracted-driver workflow normalised with the training set's own statistics
    instead of ImageNet's; pass a sample of the decoded training images.
    """
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(pixels.mean(0).round(4).tolist()), tuple(pixels.std(0).round(4).tolist())


def normalize_batch(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32 normalised, in one vectorised step per batch.

    Normalising batches (not single images in the workers) keeps the per-sample
    work to decode + uint8 ops, and on a GPU the batch is normalised there.
    """
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255.0
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255.0
    return x.float().sub_(mean).div_(std)  # in place on the fresh float copy: one pass less


# --------------------------------------------------------------------------- decoded cache


class DecodedCache:
    """Decoded, preprocessed and resized images as one memory-mapped uint8 array.

    Epochs after the first read pixels from the page cache instead of decoding
    files again. Shared by DataLoader workers (and by trials on one node) through
    the file; a byte per image records which rows are filled.
    """

    def __init__(self, path: str | os.PathLike, n: int, size: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        shape = (n, size, size, 3)
        # Several trials (or predict's actors) may open the same cache at once: create it under a
        # lock, or one could pair its own pixel file with another's flags and read zeros as filled.
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self._valid(shape):
                self._create(shape)
        self.pixels = np.load(self.path, mmap_mode="r+")
        self.filled = np.load(self.path.with_suffix(".filled.npy"), mmap_mode="r+")

    def _valid(self, shape) -> bool:
        try:
            return np.load(self.path, mmap_mode="r").shape == shape and \
                np.load(self.path.with_suffix(".filled.npy"), mmap_mode="r").shape == shape[:1]
        except (OSError, ValueError):
            return False

    def _create(self, shape) -> None:
        # Flags first, pixels last: a half-created cache fails _valid and is rebuilt.
        for target, sub_shape in ((self.path.with_suffix(".filled.npy"), shape[:1]), (self.path, shape)):
            with atomic_path(target) as tmp:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=sub_shape).flush()
                # Reserve the blocks now: a sparse file on a full disk would fail later, inside a write to
                # the memory map (SIGBUS, a dead worker); here it is an OSError naming the file.
                with open(tmp, "r+b") as f:
                    try:
                        os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
                    except OSError as exc:
                        raise OSError(exc.errno, exc.strerror, str(target)) from None

    def get(self, i: int) -> np.ndarray | None:
        return np.array(self.pixels[i]) if self.filled[i] else None

    def put(self, i: int, img: np.ndarray) -> None:
        self.pixels[i] = img
        self.filled[i] = 1  # after the pixels: a reader never sees a half-written row as filled


# --------------------------------------------------------------------------- dataset and loader


class ImageDataset(torch.utils.data.Dataset):
    """Decode -> preprocess (deterministic, cacheable) -> augment or view -> uint8 image.

    Each item is `(image uint8 SxSx3, or VxSxSx3 with views, target row, index, ok)`;
    `collate` turns a batch into one N x 3 x S x S (or N x V x 3 x S x S) uint8 tensor;
    `ok` is False for an image that failed to decode under on_bad_image="skip",
    and `collate` drops those rows and reports their indices.
    """

    def __init__(
        self,
        paths: list[str],
        targets: np.ndarray | None,
        image_size: int,
        *,
        preprocess: str = "pad",
        augment: str | dict | None = None,
        views: str | None = None,
        cache: DecodedCache | None = None,
        cache_rows: Sequence[int] | None = None,
        on_bad_image: str = "raise",
        seed: int = 0,
    ):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise UserError(f"The 'on_bad_image' parameter must be one of {list(BAD_IMAGE_POLICIES)}. Got {on_bad_image!r} instead.")
        if augment and views:
            raise ValueError("pass augment (training) or views (inference), not both")
        self.paths, self.targets, self.size = paths, targets, image_size
        self.preprocess = self._one_chain(preprocess, "preprocess") if preprocess else "orig"
        self.augment = self._augmentation(augment) if augment else None
        self.views = views_mod.parse_views(views) if views else None
        self.n_views = views_mod.count_views(views) if views else 1
        # cache_rows[i]: the cache row of image i, when the cache holds a larger list (e.g. all of a
        # sweep's images, shared by every fold); default: row i.
        self.cache, self.cache_rows, self.on_bad_image, self.seed = cache, cache_rows, on_bad_image, seed
        self.epoch = 0  # set by the training loop so augmentations differ per epoch, yet reproducibly

    def __len__(self) -> int:
        return len(self.paths)

    def batch_bytes(self, batch_size: int) -> int:
        """What one collated batch of this dataset takes in shared memory (`batch_bytes`)."""
        classes = self.targets.shape[1] if getattr(self.targets, "ndim", 1) == 2 else 1
        return batch_bytes(batch_size, self.size, self.n_views, classes)

    @staticmethod
    def _one_chain(spec: str, what: str) -> str:
        chains = views_mod.parse_views(spec)
        if len(chains) != 1 or views_mod.count_views(spec) != 1:
            raise UserError(f"{what} must be one chain giving one image (e.g. 'pad' or 'facecrop+pad'); "
                            f"got {spec!r}: put several views under 'tta' instead.")
        return chains[0]

    @staticmethod
    def _augmentation(augment: str | dict) -> views_mod.Augmentation | albu.Pipeline:
        """A view chain ('hflip+rotate:10'), or an albumentations pipeline: its A.to_dict mapping or a file of it."""
        if isinstance(augment, dict) or albu.is_pipeline_file(augment):
            return albu.create_pipeline(augment)
        return views_mod.create_augmentation(augment)

    def load(self, i: int) -> np.ndarray:
        """The preprocessed SxS uint8 image, from the cache when it holds it."""
        row = i if self.cache_rows is None else int(self.cache_rows[i])
        img = self.cache.get(row) if self.cache is not None else None
        if img is None:
            img = views_mod.apply_chain_resized(decode_image(self.paths[i]), self.preprocess, self.size)[0]
            if self.cache is not None:
                self.cache.put(row, img)
        return img

    def __getitem__(self, i: int):
        target = self.targets[i] if self.targets is not None else np.zeros(0, np.float32)
        try:
            img = self.load(i)
        except BadImageError:
            if self.on_bad_image == "raise":
                raise
            shape = (self.n_views, self.size, self.size, 3) if self.views else (self.size, self.size, 3)
            return np.zeros(shape, np.uint8), target, i, False
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            img = views_mod.resize_square(self.augment(img, rng), self.size)
        if self.views is not None:
            imgs = [v for chain in self.views for v in views_mod.apply_chain_resized(img, chain, self.size)]
            return np.stack(imgs), target, i, True
        return img, target, i, True

def collate(batch):
    """Stack good rows; report the dataset indices of images skipped as unreadable."""
    good = [b for b in batch if b[3]]
    skipped = [b[2] for b in batch if not b[3]]
    if not good:
        return None, None, torch.zeros(0, dtype=torch.long), skipped
    # One numpy stack of channels-last images, then one transposing copy for the whole batch.
    x = torch.from_numpy(np.stack([b[0] for b in good])).movedim(-1, -3).contiguous()
    y = torch.from_numpy(np.stack([b[1] for b in good])).float()
    return x, y, torch.tensor([b[2] for b in good]), skipped


def loader_workers(cpus: float, batch_bytes: int = 0) -> int:
    """DataLoader workers for a CPU share: none below 2 CPUs (the trial's own process decodes), and no more
    than this share of /dev/shm holds (`batch_bytes`: one batch as the workers hand it over).

    Each worker keeps up to PREFETCH batches in /dev/shm, and the process that reads them holds up to 2
    more (measured: 2 workers of 104 KiB batches need 640 KiB). A worker whose batch finds it full does not die:
    torch prints the error in the worker and the loader waits forever (a container's default /dev/shm is
    64 MB; one batch of 64 images at 224 px is 9.6 MB). So the workers are capped to what this process's
    share of the free space holds (its share of the node's CPUs: the folds beside it need theirs), and a
    note says how to give it more.
    """
    wanted = max(0, int(cpus) - 1)
    if not wanted or not batch_bytes:
        return wanted
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:  # no /dev/shm (macOS): torch shares memory another way
        return wanted
    node_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    fits = max(0, (int(free * min(1.0, cpus / node_cpus)) // batch_bytes - 2) // PREFETCH)
    if fits < wanted and (batch_bytes, fits) not in _SHM_NOTED:  # once per process and batch shape
        _SHM_NOTED.add((batch_bytes, fits))
        print(f"note: /dev/shm has {free / 2 ** 20:.1f} MiB free; a {cpus:g}-CPU share of this node's {node_cpus} "
              f"CPUs holds {fits} DataLoader worker(s) of {PREFETCH} batches of {batch_bytes / 2 ** 20:.2f} MiB, not "
              f"{wanted}: decoding is slower. Give it more shared memory (docker run --shm-size=16g, or a bigger "
              "/dev/shm).", file=sys.stderr)
    return min(wanted, fits)


PREFETCH = 2  # torch's default prefetch_factor: batches each worker keeps ready
_SHM_NOTED: set = set()


def batch_bytes(batch_size: int, image_size: int, views: int = 1, classes: int = 1) -> int:
    """What one collated batch takes in shared memory: uint8 views, float32 targets (`classes` per row),
    int64 indices, each tensor rounded up to whole pages."""
    tensors = (batch_size * views * 3 * image_size ** 2, batch_size * 4 * classes, batch_size * 8)
    return sum(-(-n // 4096) * 4096 for n in tensors)


def _worker_init(_):
    # Each worker is one CPU's worth of decoding: no OpenCV or torch thread pools. 0, not 1: in a worker
    # forked from a process whose OpenCV pool has run (a fold with 2+ CPUs), setNumThreads(1) waits forever
    # on the parent's pool threads, which the fork did not copy (opencv#5150; 0 only turns threading off).
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def create_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    cpus: float = 1,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose worker count follows the caller's CPU share (and /dev/shm: `loader_workers`)."""
    workers = loader_workers(cpus, dataset.batch_bytes(batch_size))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=workers > 0,
        generator=generator,
        drop_last=drop_last,
    )


def cache_path(cache_dir: str | os.PathLike, paths: list[str], image_size: int, preprocess: str) -> Path:
    """A cache file keyed by the image list, size and preprocessing: change any, get a new file."""
    digest = hashlib.sha1("\n".join([str(image_size), preprocess or "", *paths]).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"decoded-{image_size}-{digest}.npy"
