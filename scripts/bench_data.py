"""Loader throughput: ensemble's Dataset/DataLoader against a plain cv2 loop, same files, same run.

    python scripts/bench_data.py [--n 400] [--size 224]
    python scripts/bench_data.py --augment      the training loader: named views vs albumentations
    python scripts/bench_data.py --check        a launch's image check: before, first launch, resume

Images: real photographs bundled with scikit-image (astronaut, coffee, chelsea,
rocket, ...), written as JPEG files of their native sizes (300-600 px), n files
in all. Three timings over the same files:
  plain    for each file: cv2.imread + cv2.resize to size x size      (baseline)
  loader   ImageDataset(preprocess="pad") -> DataLoader -> normalize_batch, uncached
  cached   the same loader with the decoded uint8 cache: epoch 1 fills it, epoch 2 reads it
Prints images/s and the ratios the foundation issue targets:
  loader / plain >= 0.9     cached epoch 2 / uncached epoch >= 5
With --augment instead: the training loader over the filled cache (what every epoch after the
first reads) with no augmentation, the named views "hflip+rotate:10+shift:0.1+contrast", and the
albumentations pipeline closest to it (HorizontalFlip, Affine rotate +-10 / translate +-10%,
RandomBrightnessContrast), passed as its A.to_dict mapping as a space gives it.
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


def bench_augment(paths: list[str], folder: Path, size: int, batch: int, repeats: int) -> None:
    """Training-loader images/s with each augmentation, over one filled cache, interleaved, best of `repeats`."""
    import albumentations as A

    pipeline = A.to_dict(A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(rotate=(-10, 10), translate_percent=(-0.1, 0.1), border_mode=cv2.BORDER_REFLECT_101, p=1.0),
        A.RandomBrightnessContrast(p=0.5),
    ]))
    augments = {"none": None, "views": "hflip+rotate:10+shift:0.1+contrast", "albumentations": pipeline}
    y = np.zeros((len(paths), 1), np.float32)
    cache = DecodedCache(folder / "augment-cache.npy", len(paths), size)
    time_loader(ImageDataset(paths, y, size, preprocess="pad", cache=cache), batch)  # fill it
    best = dict.fromkeys(augments, 1e9)
    for r in range(repeats):  # interleaved, so drift on a noisy machine hits all alike
        for name, augment in augments.items():
            dataset = ImageDataset(paths, y, size, preprocess="pad", cache=cache, augment=augment)
            dataset.epoch = r
            best[name] = min(best[name], time_loader(dataset, batch))
    n = len(paths)
    print(f"{n} cached {size}x{size} images, training loader, batch {batch}, 1 thread, best of {repeats}")
    labels = {"none": "no augmentation", "views": f"views {augments['views']}",
              "albumentations": "albumentations, the same ops (A.to_dict)"}
    for name, label in labels.items():
        print(f"{label:<42}: {n / best[name]:8.1f} images/s")
    print(f"{'ratio albumentations / views':<42}: {best['views'] / best['albumentations']:.2f}")


def bench_check(n: int, resume_n: int, repeats: int) -> None:
    """A launch's image check (ensemble.data.manifest.ImageChecks) on n 640x480 JPEG photos, on every CPU:
    (a) the check as it was (a full decode of each image, kept below), (b) a first launch (blank scans,
    empty cache), the same on a process pool (why threads), (c) a resume of the same unchanged files (stat +
    cache lookup), and one image's decode on one thread before and now (the ratio that shared CPUs blur
    least), all interleaved, best of `repeats`; then (d) a whole resume check of a `resume_n`-image
    manifest (hard links to the n photos): read_manifest, realpath + stat of each image, the cache."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    import pandas as pd

    from ensemble.data import manifest as manifest_mod
    from ensemble.data.manifest import ImageChecks, read_manifest

    folder = Path(tempfile.mkdtemp(prefix="bench_check-"))
    try:
        paths = write_images(folder, n)
        for p in paths:  # full-size photos as a dataset holds them: 640x480, quality 90
            cv2.imwrite(p, cv2.resize(cv2.imread(p), (640, 480), interpolation=cv2.INTER_AREA),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])
        stats = [os.stat(p) for p in paths]
        best = dict.fromkeys(("before", "first", "processes", "resume", "serial before", "serial now"), 1e9)
        serial = paths[:500]
        for r in range(repeats):  # interleaved, so drift on a noisy machine hits all alike
            start = time.perf_counter()
            assert not any(_check_before(paths))
            best["before"] = min(best["before"], time.perf_counter() - start)
            start = time.perf_counter()
            cache = folder / f"run{r}" / "cache" / "image_checks.parquet"  # none yet: a first launch
            checks = ImageChecks(cache)
            assert not any(checks.bad(paths, [os.stat(p) for p in paths])) and checks.decoded == n
            best["first"] = min(best["first"], time.perf_counter() - start)
            checks.save()  # as write_plan does
            start = time.perf_counter()
            with ProcessPoolExecutor(os.cpu_count()) as pool:
                assert all(pool.map(manifest_mod._decodes, paths, chunksize=64))
            best["processes"] = min(best["processes"], time.perf_counter() - start)
            start = time.perf_counter()
            again = ImageChecks(cache)
            assert not any(again.bad(paths, [os.stat(p) for p in paths])) and again.decoded == 0
            best["resume"] = min(best["resume"], time.perf_counter() - start)
            start = time.perf_counter()
            assert all(_imread_before(p) is not None for p in serial)
            best["serial before"] = min(best["serial before"], (time.perf_counter() - start) / len(serial))
            start = time.perf_counter()
            assert all(manifest_mod._decodes(p) for p in serial)
            best["serial now"] = min(best["serial now"], (time.perf_counter() - start) / len(serial))
        many = folder / "many"
        many.mkdir()
        for i in range(resume_n):
            os.link(paths[i % n], many / f"{i:06d}.jpg")
        manifest = folder / "many.csv"
        pd.DataFrame({"id": [f"{i:06d}" for i in range(resume_n)], "image": [f"many/{i:06d}.jpg" for i in range(resume_n)],
                      "label": ["a", "b"] * (resume_n // 2) + ["a"] * (resume_n % 2)}).to_csv(manifest, index=False)
        big = folder / "cache" / "many.parquet"
        start = time.perf_counter()
        filled = ImageChecks(big)
        read_manifest(manifest, checks=filled)
        filled.save()
        fill = time.perf_counter() - start
        resume = resume_checks = 1e9
        for _ in range(repeats):
            start = time.perf_counter()
            again = ImageChecks(big)
            read_manifest(manifest, checks=again)
            resume = min(resume, time.perf_counter() - start)
            assert again.decoded == 0
            start = time.perf_counter()
            again = ImageChecks(big)
            assert not any(again.bad([str(many / f"{i:06d}.jpg") for i in range(resume_n)],
                                     [os.stat(many / f"{i:06d}.jpg") for i in range(resume_n)]))
            resume_checks = min(resume_checks, time.perf_counter() - start)
        size = np.mean([st.st_size for st in stats]) / 1e3
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{n} JPEG photos 640x480 q90 ({size:.0f} KB each), {os.cpu_count()} CPUs, page cache warm, best of {repeats}")
    print(f"(a) before: full decode, a thread per CPU : {n / best['before']:8.0f} images/s")
    print(f"(b) first launch: blank scans, threads     : {n / best['first']:8.0f} images/s")
    print(f"    the same on a forked process pool      : {n / best['processes']:8.0f} images/s")
    print(f"(c) resume, unchanged files (stat + cache) : {n / best['resume']:8.0f} images/s")
    print(f"ratio first launch / before               : {best['before'] / best['first']:.2f}x  (target >= 2)")
    print(f"ratio resume / first launch               : {best['first'] / best['resume']:.0f}x")
    print(f"one image on one thread: before {best['serial before'] * 1e3:.2f} ms, now {best['serial now'] * 1e3:.2f} ms "
          f"({best['serial before'] / best['serial now']:.2f}x)")
    print(f"(d) {resume_n} images: first launch read_manifest {fill:.1f} s ({resume_n / fill:.0f} images/s); "
          f"resume read_manifest {resume:.2f} s (target < 5 s), of which the image check {resume_checks:.2f} s")


def _check_before(paths: list[str]) -> list[bool]:
    """The check as it was before the cache (baseline): isfile, then a full RGB decode of every image, one
    thread per CPU, one task per image."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    assert all(os.path.isfile(p) for p in paths)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda p: _imread_before(p) is None, paths))


def _imread_before(path: str) -> np.ndarray | None:
    """ensemble.data.manifest._imread as it was (OpenCV >= 4.10 decodes straight to RGB)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-64:]:
        return None
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    except cv2.error:
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each timing (noisy machines)")
    parser.add_argument("--augment", action="store_true", help="time train-time augmentations instead: views vs "
                        "albumentations (needs pip install 'ensemble[albumentations]')")
    parser.add_argument("--check", action="store_true", help="time a launch's image check instead (--check-n "
                        "photos; the resume of --resume-n images)")
    parser.add_argument("--check-n", type=int, default=3000)
    parser.add_argument("--resume-n", type=int, default=20000)
    args = parser.parse_args(argv)
    if args.check:  # before cv2.setNumThreads(1): a launch checks with OpenCV's defaults
        return bench_check(args.check_n, args.resume_n, args.repeats)
    cv2.setNumThreads(1)  # one core each, like a fold worker with cpu: 1
    import torch

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        paths = write_images(folder, args.n)
        if args.augment:
            return bench_augment(paths, folder, args.size, args.batch, args.repeats)
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
