"""Manifests, validation errors, target forms, decoding, the loader and its decoded cache."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from ensemble.data import demo_data as datasets
from ensemble.data.loader import (
    DecodedCache,
    ImageDataset,
    compute_normalization,
    create_loader,
    loader_workers,
    normalize_batch,
)
from ensemble.data.manifest import Target, encode_targets, read_columns, read_manifest
from ensemble.errors import UserError


@pytest.fixture
def small(demo_dir, tmp_path):
    """A copy of 12 real demo images and a writable manifest of them."""
    frame = pd.read_csv(demo_dir / "grouped.csv").head(12)
    (tmp_path / "images").mkdir()
    for image in frame["image"]:
        shutil.copy(demo_dir / image, tmp_path / image)
    return tmp_path, frame


def write(tmp_path, frame, name="m.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------- demo data


def test_demo_variants_share_images_and_have_expected_columns(demo_dir):
    multi = read_manifest(datasets.demo_manifest("multiclass", demo_dir), check_images="exists")
    tags = read_manifest(datasets.demo_manifest("multilabel", demo_dir), check_images="exists")
    grouped = read_manifest(datasets.demo_manifest("grouped", demo_dir), check_images="exists")
    test = read_manifest(datasets.demo_manifest("test", demo_dir), require_target=False)
    assert len(multi.frame) == len(tags.frame) == len(grouped.frame) == 4000 and len(test.frame) == 1000
    assert multi.classes == sorted(datasets.DIGIT_NAMES) and multi.task == "multiclass"
    assert tags.classes == ["big", "even", "loop", "odd", "prime"] and tags.task == "multilabel"
    assert grouped.frame["group"].nunique() == datasets.N_GROUPS >= 8
    assert not set(test.ids) & set(multi.ids)
    # Every digit is in the training set with a realistic share (MNIST: 500 per class in all).
    counts = multi.frame["label"].value_counts()
    assert counts.min() > 300 and counts.max() < 500


def test_demo_export_is_reused_and_repairs_a_corrupt_image(tmp_path):
    root = tmp_path / "d"
    path = datasets.demo_manifest("multiclass", root)
    victim = root / "images" / "d0007.png"
    original = victim.read_bytes()
    stamp_time = (root / "EXPORTED").stat().st_mtime_ns
    datasets.demo_manifest("multiclass", root)  # complete: nothing rewritten
    assert (root / "EXPORTED").stat().st_mtime_ns == stamp_time
    victim.write_bytes(b"not a png")
    assert datasets.demo_manifest("multiclass", root) == path
    assert victim.read_bytes() == original


# --------------------------------------------------------------------------- validation errors


def test_valid_manifest_reads(small):
    root, frame = small
    m = read_manifest(write(root, frame))
    assert m.target == Target("label", "label") and len(m.ids) == 12 and m.groups is not None


def test_missing_column(small):
    root, frame = small
    with pytest.raises(UserError, match=r"m.csv: missing column\(s\) \['image'\]"):
        read_manifest(write(root, frame.drop(columns="image")))


def test_needs_exactly_one_target_form(small):
    root, frame = small
    with pytest.raises(UserError, match="neither 'label' nor 'tags'"):
        read_manifest(write(root, frame.drop(columns="label")))
    with pytest.raises(UserError, match="both 'label' and 'tags'"):
        read_manifest(write(root, frame.assign(tags="a")))


def test_empty_label_names_rows(small):
    root, frame = small
    frame.loc[[2, 5], "label"] = ""
    with pytest.raises(UserError, match=r"empty 'label' at rows 3, 6 \(2 rows\)"):
        read_manifest(write(root, frame))


def test_unknown_label_against_given_classes(small):
    root, frame = small
    classes = sorted(set(frame["label"]) - {frame["label"][0]})
    with pytest.raises(UserError, match=r"'label' not among the classes .* at row"):
        read_manifest(write(root, frame), classes=classes)


def test_duplicate_id(small):
    root, frame = small
    frame.loc[7, "id"] = frame.loc[1, "id"]
    with pytest.raises(UserError, match=r"duplicate 'id' at row 8 \(1 row\)"):
        read_manifest(write(root, frame))


def test_missing_image_file(small):
    root, frame = small
    (root / frame["image"][4]).unlink()
    with pytest.raises(UserError, match=r"'image' file missing under .* at row 5 \(1 row\)"):
        read_manifest(write(root, frame))


def test_image_path_escaping_root(small, tmp_path_factory):
    root, frame = small
    outside = tmp_path_factory.mktemp("outside") / "x.png"
    shutil.copy(root / frame["image"][0], outside)
    frame.loc[3, "image"] = str(outside)
    frame.loc[9, "image"] = "../" + root.name + "/" + frame["image"][9]  # resolves inside: allowed
    with pytest.raises(UserError, match=r"escaping the root .* at row 4 \(1 row\)"):
        read_manifest(write(root, frame))


def test_corrupt_images_png_and_truncated_jpeg(small):
    root, frame = small
    (root / frame["image"][0]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    import cv2

    ok, buf = cv2.imencode(".jpg", np.full((32, 32, 3), 127, np.uint8))
    (root / "images" / "cut.jpg").write_bytes(buf.tobytes()[:200])
    frame.loc[6, "image"] = "images/cut.jpg"
    with pytest.raises(UserError, match=r"unreadable or corrupt image at rows 1, 7 \(2 rows\)"):
        read_manifest(write(root, frame))
    read_manifest(write(root, frame), check_images="exists")  # cheaper check skips decoding


def test_row_list_is_capped_at_five_with_count(small):
    root, frame = small
    frame["label"] = ""
    with pytest.raises(UserError, match=r"rows 1, 2, 3, 4, 5, \.\.\. \(12 rows\)"):
        read_manifest(write(root, frame))


def test_parquet_manifest(small):
    root, frame = small
    path = root / "m.parquet"
    frame.to_parquet(path)
    assert read_manifest(path).frame["id"].tolist() == frame["id"].tolist()


def test_unreadable_table(tmp_path):
    path = tmp_path / "m.parquet"
    path.write_text("id,image\n")
    with pytest.raises(UserError, match="cannot be read as Parquet"):
        read_manifest(path)


def test_header_only_manifest_names_the_file(small):
    root, frame = small
    path = write(root, frame.head(0))
    for require_target in (True, False):  # a test manifest without rows is as useless
        with pytest.raises(UserError, match=re.escape(f"{path}: no data rows, only the header ['id', 'image', ")):
            read_manifest(path, require_target=require_target)


@pytest.mark.parametrize("content, name, found", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "m.csv", "cannot be read as CSV: it looks like a PNG image"),
    (b"PK\x03\x04\x14\x00\x06\x00", "m.csv", "it looks like a ZIP archive (an Excel .xlsx workbook?)"),
    (b"\xff\xfei\x00d\x00,\x00", "m.csv", "it looks like UTF-16 text"),
    (b"id,image\x00\x01\x02", "m.csv", "it looks like binary data"),
    ("id,image,label\n1,\u00e9.png,x\n".encode("latin-1"), "m.csv", "it is not UTF-8 text"),
    (b"", "m.csv", "the file is empty (0 bytes)"),
    (b"\n\n", "m.csv", "cannot be read as CSV: No columns to parse"),
    (b"\x89PNG\r\n\x1a\n", "m.parquet", "cannot be read as Parquet: it looks like a PNG image"),
])
def test_a_file_that_is_no_table_says_what_it_looks_like(tmp_path, content, name, found):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(f"{path}: ")) as caught:
        read_manifest(path)
    assert found in str(caught.value)


def test_parquet_named_csv_says_rename_it(small):
    root, frame = small
    frame.to_parquet(root / "m.csv")
    with pytest.raises(UserError, match="it looks like a Parquet file .*; name it .parquet"):
        read_manifest(root / "m.csv")


def test_read_columns_reads_the_header_alone(small):
    root, frame = small
    frame.to_parquet(root / "m.parquet")
    (root / "m.csv").write_text("\ufeffid,image,label\n1,no-such.png,x\n")  # Excel's BOM; the image is not checked
    (root / "late.csv").write_text("\n\nid,image,label\n")  # pandas too skips leading blank lines
    assert read_columns(root / "m.csv") == read_columns(root / "late.csv") == ("id", "image", "label")
    assert read_columns(root / "m.parquet") == tuple(frame.columns)
    (root / "blank.csv").write_text("\n \n")
    with pytest.raises(UserError, match="blank.csv: no header line, only blank lines"):
        read_columns(root / "blank.csv")
    with pytest.raises(UserError, match="is a directory"):
        read_columns(root / "images")


# --------------------------------------------------------------------------- target forms


def test_tags_multi_hot(small):
    root, frame = small
    frame = frame.drop(columns="label").assign(tags=["clear water", "cloudy", "water clear haze"] * 4)
    m = read_manifest(write(root, frame))
    assert m.task == "multilabel" and m.classes == ["clear", "cloudy", "haze", "water"]
    np.testing.assert_array_equal(m.targets()[:3], [[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 1]])


def test_attribute_strings_soft_maybe(small):
    root, frame = small
    frame = frame.drop(columns="label").assign(collar=["nnynn", "nmynn", "mnnnm"] * 4)
    m = read_manifest(write(root, frame), target=Target("attribute", "collar", maybe_weight=0.5))
    assert m.task == "multiclass" and m.classes == ["c0", "c1", "c2", "c3", "c4"]
    y = m.targets()
    np.testing.assert_allclose(y[0], [0, 0, 1, 0, 0])
    np.testing.assert_allclose(y[1], [0, 1 / 3, 2 / 3, 0, 0], rtol=1e-6)  # 0.5 and 1, renormalised
    np.testing.assert_allclose(y[2], [0.5, 0, 0, 0, 0.5])
    np.testing.assert_allclose(y.sum(1), 1, rtol=1e-6)


@pytest.mark.parametrize("bad, message", [("nnyn", "length other than 5"), ("nnxnn", "other than y/n/m"),
                                          ("nnnnn", "without any y or m")])
def test_attribute_errors(small, bad, message):
    root, frame = small
    frame = frame.drop(columns="label").assign(collar="nnynn")
    frame.loc[10, "collar"] = bad
    with pytest.raises(UserError, match=message + r".* at row 11 \(1 row\)"):
        read_manifest(write(root, frame), target=Target("attribute", "collar"))


def test_encode_targets_reads_folds_like_frames():
    frame = pd.DataFrame({"label": ["b", "a", "b"]})
    np.testing.assert_array_equal(encode_targets(frame, {"form": "label", "column": "label"}, ["a", "b"]),
                                  [[0, 1], [1, 0], [0, 1]])


# --------------------------------------------------------------------------- loading


def demo_paths(demo_dir, n=64):
    m = read_manifest(datasets.demo_manifest("multiclass", demo_dir), check_images="none")
    return m.image_paths[:n], m.targets()[:n]


def test_dataset_item_shapes_and_views(demo_dir):
    paths, y = demo_paths(demo_dir, 4)
    x, target, index, ok = ImageDataset(paths, y, 32)[2]
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8 and ok and index == 2
    np.testing.assert_array_equal(target, y[2])
    xb, yb, indices, skipped = create_loader(ImageDataset(paths, y, 32), 4).__iter__().__next__()
    assert xb.shape == (4, 3, 32, 32) and xb.is_contiguous() and skipped == []
    assert torch.equal(xb[2], torch.from_numpy(x).permute(2, 0, 1))
    xv, *_ = create_loader(ImageDataset(paths, y, 32, views="orig,hflip,fivecrop"), 2).__iter__().__next__()
    assert xv.shape == (2, 7, 3, 32, 32)
    assert torch.equal(xv[0, 1], xv[0, 0].flip(-1))


def test_loader_workers_start_after_the_parent_used_opencvs_thread_pool(demo_dir):
    """A fold with 2+ CPUs runs OpenCV's thread pool before its DataLoader forks workers; a worker that then
    calls cv2.setNumThreads(1) waits forever (opencv#5150). A fresh process, so the pool's state is known."""
    import subprocess
    import sys

    code = f"""
import cv2, numpy as np
from ensemble.data import demo_data
from ensemble.data.loader import ImageDataset, create_loader
from ensemble.data.manifest import read_manifest
cv2.setNumThreads(2)
big = np.zeros((2000, 2000, 3), np.uint8)
for _ in range(5):
    cv2.GaussianBlur(big, (9, 9), 0)  # the parent's pool threads run
m = read_manifest(demo_data.demo_manifest("multiclass", {str(demo_dir)!r}), check_images="none")
batches = list(create_loader(ImageDataset(m.image_paths[:32], m.targets()[:32], 32), 8, cpus=3))  # 2 workers
print(len(batches))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["4"], out.stderr[-2000:]


def test_a_small_dev_shm_caps_the_loader_workers_instead_of_hanging(demo_dir):
    """Workers hand batches over in /dev/shm (a container's default: 64 MB). When it cannot hold their prefetched
    batches, torch prints the error in the worker and the loader waits forever. A real fault: a 512 KiB
    /dev/shm in a private mount namespace, where 2 workers of 104 KiB batches hang (they need 640 KiB) and 1 runs."""
    import sys

    from sweep_fixtures import with_small_dev_shm

    code = f"""
import os
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])  # 1 CPU: the process's share is all of /dev/shm
from ensemble.data import demo_data
from ensemble.data.loader import ImageDataset, create_loader
from ensemble.data.manifest import read_manifest
m = read_manifest(demo_data.demo_manifest("multiclass", {str(demo_dir)!r}), check_images="none")
loader = create_loader(ImageDataset(m.image_paths[:128], m.targets()[:128], 32), 32, cpus=3)  # 2 workers wanted
print(loader.num_workers, sum(len(x) for x, *_ in loader))
"""
    proc = with_small_dev_shm([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "128"], proc.stderr[-2000:]
    assert "note: /dev/shm has 0.5 MiB free" in proc.stderr and "not 2: decoding is slower" in proc.stderr


def test_augmentation_is_seeded_per_epoch(demo_dir):
    paths, y = demo_paths(demo_dir, 4)
    ds = ImageDataset(paths, y, 32, augment="rotate:20+shift:0.1")
    first = ds[1][0]
    assert np.array_equal(first, ds[1][0])
    ds.epoch = 1
    assert not np.array_equal(first, ds[1][0])


def test_cache_returns_identical_tensors_and_skips_decoding(demo_dir, tmp_path, monkeypatch):
    paths, y = demo_paths(demo_dir)
    plain = [b[0] for b in create_loader(ImageDataset(paths, y, 32), 16)]
    cache = DecodedCache(tmp_path / "c.npy", len(paths), 32)
    first = [b[0] for b in create_loader(ImageDataset(paths, y, 32, cache=cache), 16)]
    assert cache.filled.all()
    import ensemble.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "decode_image", lambda p: pytest.fail("decoded again despite the cache"))
    reopened = DecodedCache(tmp_path / "c.npy", len(paths), 32)  # another process / epoch reopens the file
    second = [b[0] for b in create_loader(ImageDataset(paths, y, 32, cache=reopened), 16)]
    for a, b, c in zip(plain, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_cache_with_a_different_shape_is_rebuilt(tmp_path):
    DecodedCache(tmp_path / "c.npy", 4, 16).put(0, np.ones((16, 16, 3), np.uint8))
    rebuilt = DecodedCache(tmp_path / "c.npy", 5, 16)
    assert rebuilt.pixels.shape == (5, 16, 16, 3) and not rebuilt.filled.any()


def test_bad_image_policy_skip_reports_and_raise_names_file(demo_dir, tmp_path):
    paths, y = demo_paths(demo_dir, 8)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"broken")
    paths[3] = str(bad)
    batches = list(create_loader(ImageDataset(paths, y, 32, on_bad_image="skip"), 4))
    assert [b[3] for b in batches] == [[3], []]
    assert batches[0][0].shape[0] == 3 and batches[0][2].tolist() == [0, 1, 2]
    with pytest.raises(UserError, match="bad.png: unreadable or corrupt image"):
        list(create_loader(ImageDataset(paths, y, 32), 4))
    with pytest.raises(UserError, match="on_bad_image"):
        ImageDataset(paths, y, 32, on_bad_image="ignore")


def test_loader_workers_follow_cpu_share(demo_dir):
    assert [loader_workers(c) for c in (0.5, 1, 2, 4)] == [0, 0, 1, 3]
    paths, y = demo_paths(demo_dir, 16)
    single = torch.cat([b[0] for b in create_loader(ImageDataset(paths, y, 32), 4, cpus=1)])
    multi = torch.cat([b[0] for b in create_loader(ImageDataset(paths, y, 32), 4, cpus=3)])
    assert torch.equal(single, multi)


def test_normalization_from_images_and_batch():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[1] = 255
    mean, std = compute_normalization(images)
    assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = normalize_batch(x, mean, std)
    assert out.dtype == torch.float32 and out.min() == -1 and out.max() == 1
