"""Loader throughput: ensemble's Dataset/DataLoader against a plain cv2 loop, same files, same run.

    python scripts/bench_data.py [--n 400] [--size 224]

Images: real photographs bundled with scikit-image (astronaut, coffee, chelsea,
rocket, ...), written as JPEG files of their native sizes (300-600 px), n files
in all. Three timings over the same files:
  plain    for each file: cv2.imread + cv2.resize to size x size      (baseline)
  loader   ImageDataset(preprocess="pad") -> DataLoader -> normalize_batch, uncached
  cached   the same loader with the decoded uint8 cache: epoch 1 fills it, epoch 2 reads it
Prints images/s and the ratios the foundation issue targets:
  loader / plain >= 0.9     cached epoch 2 / uncached epoch >= 5
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from ensemble.data.loader import DecodedCache, ImageDataset, create_loader, normalize_batch


def write_images(folder: Path, n: int) -> list[str]:
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry(),
               data.retina()[::2, ::2]]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        y, x = rng.integers(0, h // 8), rng.integers(0, w // 8)  # distinct files, not n copies of one
        path = folder / f"img{i:04d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(img[y:, x:, :3]), cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(path))
    return paths


def time_plain(paths: list[str], size: int) -> float:
    start = time.perf_counter()
    for p in paths:
        cv2.resize(cv2.imread(p), (size, size), interpolation=cv2.INTER_AREA)
    return time.perf_counter() - start


def time_loader(dataset: ImageDataset, batch: int) -> float:
    start = time.perf_counter()
    for x, *_ in create_loader(dataset, batch, cpus=1):
        normalize_batch(x, (0.5,) * 3, (0.25,) * 3)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each timing (noisy machines)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # one core each, like a fold worker with cpu: 1
    import torch

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        paths = write_images(folder, args.n)
        y = np.zeros((len(paths), 1), np.float32)
        plain = loader = 1e9
        for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits both alike
            plain = min(plain, time_plain(paths, args.size))
            loader = min(loader, time_loader(ImageDataset(paths, y, args.size, preprocess="pad"), args.batch))
        first = second = 1e9
        for r in range(args.repeats):
            cache = DecodedCache(folder / f"cache{r}.npy", len(paths), args.size)
            first = min(first, time_loader(ImageDataset(paths, y, args.size, preprocess="pad", cache=cache), args.batch))
            second = min(second, time_loader(ImageDataset(paths, y, args.size, preprocess="pad", cache=cache), args.batch))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    n = len(paths)
    print(f"{n} JPEG files (300-600 px) -> {args.size}x{args.size}, batch {args.batch}, 1 thread, best of {args.repeats}")
    print(f"plain cv2.imread+resize loop : {n / plain:8.1f} images/s")
    print(f"loader (decode+pad+resize+normalise): {n / loader:8.1f} images/s")
    print(f"cached loader, epoch 1 (fill): {n / first:8.1f} images/s")
    print(f"cached loader, epoch 2       : {n / second:8.1f} images/s")
    print(f"ratio loader / plain         : {plain / loader:.2f}  (target >= 0.9)")
    print(f"ratio cached epoch 2 / uncached loader: {loader / second:.1f}x  (target >= 5)")


if __name__ == "__main__":
    main()
