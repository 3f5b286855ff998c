"""The image check of a launch: the JPEG decode with blank scans (ensemble.data.jpeg), the reduced-scale
decode, and the per-image cache kept in the run."""

from __future__ import annotations

import io
import os
import time

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data as skdata
from sweep_fixtures import small_space

from ensemble.data import manifest as manifest_mod
from ensemble.data.jpeg import with_blank_scans
from ensemble.data.manifest import ImageChecks, read_manifest
from ensemble.errors import UserError
from ensemble.run import Run, open_run
from ensemble.tune import spaces
from ensemble.tune.launch import plan_sweep, prepare_run, write_plan


@pytest.fixture
def photos(tmp_path):
    """8 JPEG photos (160x120) and a manifest of them; returns (manifest path, root, frame)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        x, y = rng.integers(0, 40, size=2)
        (root / "images" / f"p{i}.jpg").write_bytes(_jpeg(_photo().crop((x, y, 512, 512)).resize((160, 120))))
        rows.append({"id": f"p{i}", "image": f"images/p{i}.jpg", "label": "ab"[i % 2]})
    frame = pd.DataFrame(rows)
    manifest = root / "m.csv"
    frame.to_csv(manifest, index=False)
    return manifest, root, frame


def _photo() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


def _jpeg(image: Image.Image, mode: str = "RGB", **options) -> bytes:
    buf = io.BytesIO()
    image.convert(mode).save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def check(manifest, cache, **kwargs) -> ImageChecks:
    """One launch's check: read the cache, check the manifest, save the cache; returns the checks."""
    checks = ImageChecks(cache)
    read_manifest(manifest, checks=checks, **kwargs)
    checks.save()
    return checks


# --------------------------------------------------------------------------- the cache


def test_an_unchanged_file_is_not_decoded_again_a_touched_or_replaced_one_is(tmp_path, photos):
    manifest, root, _ = photos
    cache = tmp_path / "run" / "cache" / "image_checks.parquet"
    assert check(manifest, cache).decoded == 8 and cache.exists()
    assert check(manifest, cache).decoded == 0
    touched = root / "images" / "p2.jpg"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same bytes, new mtime
    assert check(manifest, cache).decoded == 1
    replaced = root / "images" / "p5.jpg"
    mtime = replaced.stat().st_mtime_ns
    replaced.write_bytes(_jpeg(_photo().resize((90, 100))))
    os.utime(replaced, ns=(mtime, mtime))  # same mtime, another size
    assert check(manifest, cache).decoded == 1
    assert check(manifest, cache).decoded == 0


def test_a_damaged_copy_of_the_same_size_and_mtime_is_checked_again(tmp_path, photos):
    """`cp -p` / `rsync -a` of another file keeps the mtime, and bytes damaged in place keep the size:
    the ctime, which nothing sets back, still tells the cache the file changed."""
    manifest, root, _ = photos
    cache = tmp_path / "cache.parquet"
    assert check(manifest, cache).decoded == 8
    victim = root / "images" / "p6.jpg"
    st, data = victim.stat(), victim.read_bytes()
    time.sleep(0.05)  # the kernel's ctime clock ticks every few ms: the rewrite must land on a later tick
    victim.write_bytes(data[:100] + bytes(len(data) - 100))  # the same size, zeros after its first 100 bytes
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with pytest.raises(UserError, match=r"unreadable or corrupt image at row 7 \(1 row\)"):
        check(manifest, cache)


def test_a_new_file_is_checked(tmp_path, photos):
    manifest, root, frame = photos
    cache = tmp_path / "cache.parquet"
    check(manifest, cache)
    (root / "images" / "new.jpg").write_bytes(_jpeg(_photo().resize((64, 64))))
    frame.loc[len(frame)] = {"id": "new", "image": "images/new.jpg", "label": "a"}
    frame.to_csv(manifest, index=False)
    checks = check(manifest, cache)
    assert checks.decoded == 1 and str((root / "images" / "new.jpg").resolve()) in checks.good


def test_a_corrupt_image_is_an_error_at_every_launch_never_cached_as_good(tmp_path, photos, capsys):
    manifest, root, _ = photos
    cache = tmp_path / "cache.parquet"
    victim = root / "images" / "p3.jpg"
    victim.write_bytes(victim.read_bytes()[:-300])  # truncated: no end marker
    for _ in range(2):
        checks = ImageChecks(cache)
        with pytest.raises(UserError, match=r"unreadable or corrupt image at row 4 \(1 row\)"):
            read_manifest(manifest, checks=checks)
        checks.save()  # what the 7 good images gave, saved as if the run existed
        assert str(victim.resolve()) not in checks.good and len(checks.good) == 7
    for _ in range(2):  # on_bad_image: skip names it at every launch too
        assert check(manifest, cache, on_bad_image="skip").decoded == 1
        assert "row 4 (1 row)" in capsys.readouterr().err


def test_a_corrupt_or_foreign_cache_file_is_ignored(tmp_path, photos):
    manifest, _, _ = photos
    cache = tmp_path / "cache.parquet"
    for damage in (b"PAR1 not really parquet", b""):
        cache.write_bytes(damage)
        assert check(manifest, cache).decoded == 8  # checked again, then written whole
        assert check(manifest, cache).decoded == 0
    pd.DataFrame({"path": ["x"], "other": [1]}).to_parquet(cache)  # readable, but not this cache's columns
    assert check(manifest, cache).decoded == 8


def test_a_failed_first_launch_leaves_no_run_directory(tmp_path, demo_dir):
    frame = pd.read_csv(demo_dir / "multiclass.csv").head(40)
    (tmp_path / "images").mkdir()
    for image in frame["image"]:
        (tmp_path / image).write_bytes((demo_dir / image).read_bytes())
    (tmp_path / frame["image"][7]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    manifest = tmp_path / "m.csv"
    frame.to_csv(manifest, index=False)
    space = spaces.load_space(str(small_space(tmp_path, demo_dir, data={
        "manifest": str(manifest), "root": str(tmp_path), "normalize": "backbone"})))
    with pytest.raises(UserError, match=r"unreadable or corrupt image at row 8 \(1 row\)"):
        prepare_run(space, tmp_path / "runs" / "r")
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- the reduced decode


def _jpegs() -> dict[str, bytes]:
    """One 320x240 photo in each kind of JPEG a dataset may hold."""
    img = _photo().resize((320, 240))
    return {"baseline": _jpeg(img), "444": _jpeg(img, subsampling=0), "progressive": _jpeg(img, progressive=True),
            "restart": _jpeg(img, restart_marker_blocks=4), "grey": _jpeg(img, "L"), "cmyk": _jpeg(img, "CMYK")}


_RNG = np.random.default_rng(0)
CORRUPTIONS = {  # what a damaged download or disk leaves; `b` is an intact JPEG
    "intact": lambda b: b,
    "truncated-half": lambda b: b[:len(b) // 2],
    "truncated-end-marker": lambda b: b[:-2],
    "truncated-then-end-marker": lambda b: b[:len(b) // 2] + b"\xff\xd9",
    "zeroed-middle": lambda b: b[:len(b) // 2] + bytes(4096) + b[len(b) // 2 + 4096:],
    "random-middle": lambda b: b[:len(b) // 2] + _RNG.bytes(4096) + b[len(b) // 2 + 4096:],
    "header-zeroed": lambda b: b[:20] + bytes(100) + b[120:],
    "header-garbage": lambda b: b[:2] + _RNG.bytes(300) + b[302:],
    "garbage": lambda b: _RNG.bytes(len(b)),
    "jpeg-magic-then-garbage": lambda b: b"\xff\xd8\xff" + _RNG.bytes(len(b)) + b"\xff\xd9",
    "empty": lambda b: b"",
    "text": lambda b: b"id,image,label\n" * 20,
    "trailing-junk": lambda b: b + _RNG.bytes(200),
    "two-files-spliced": lambda b: b[:len(b) // 2] + b,
    "chunk-removed": lambda b: b[:len(b) // 2] + b[len(b) // 2 + 5000:],
    "bytes-flipped": lambda b: bytes(v ^ 0x5A if i % 997 == 500 else v for i, v in enumerate(b)),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_the_reduced_decode_refuses_exactly_what_a_full_decode_refuses(tmp_path, kind):
    refused = []
    for variant, intact in _jpegs().items():
        data = CORRUPTIONS[kind](intact)
        full = manifest_mod._imdecode(data) is not None
        assert manifest_mod._jpeg_decodes_reduced(data) == full, (variant, kind, full)
        path = tmp_path / f"{variant}.jpg"
        path.write_bytes(data)
        assert manifest_mod._decodes(str(path)) == (manifest_mod._imread(str(path)) is not None), (variant, kind)
        refused.append(not full)
    if kind == "intact":
        assert not any(refused), refused
    elif kind in ("truncated-half", "truncated-end-marker", "garbage", "empty", "text"):
        assert all(refused), refused


def test_a_sequential_jpeg_is_checked_with_blank_scans_a_progressive_one_as_it_is(capfd):
    """The stand-in keeps the frame and every marker, decodes without libjpeg's 'Corrupt JPEG data' warning
    (printed once per file otherwise), and is a fraction of the file."""
    for variant, data in _jpegs().items():
        blank = with_blank_scans(data)
        if variant == "progressive":
            assert blank is None
            continue
        assert blank is not None and len(blank) < len(data) / 5, variant
        small = cv2.imdecode(np.frombuffer(blank, np.uint8), cv2.IMREAD_REDUCED_COLOR_8)
        assert small is not None and small.shape[:2] == (30, 40), variant  # 320x240 at 1/8
        assert manifest_mod._jpeg_decodes_reduced(data)
    assert capfd.readouterr().err == ""


def _damage(data: bytes, rng: np.random.Generator) -> bytes:
    """One random damage: bytes flipped anywhere or in the headers, a range cut, bytes or a marker inserted,
    a cut followed by an end marker."""
    b, n = bytearray(data), len(data)
    kind = rng.integers(6)
    if kind == 0:
        for i in rng.integers(0, n, rng.integers(1, 20)):
            b[i] = rng.integers(256)
    elif kind == 1:
        for i in rng.integers(0, min(n, 700), rng.integers(1, 6)):
            b[i] = rng.integers(256)
    elif kind == 2:
        i = rng.integers(n)
        del b[i:i + rng.integers(1, 3000)]
    elif kind == 3:
        i = rng.integers(n)
        b[i:i] = rng.bytes(rng.integers(1, 500))
    elif kind == 4:
        i = rng.integers(2, n)
        b[i:i] = bytes([0xFF, rng.integers(1, 255)])
    else:
        b = b[:rng.integers(2, n)] + b"\xff\xd9"
    return bytes(b)


def test_random_damage_is_refused_exactly_when_a_full_decode_refuses():
    """Seeded random damage to each kind of JPEG: the check's decode (blank scans where it can) agrees with
    a full decode on every file. Wider runs of the same (~18,500 files, 5 seeds) found no disagreement."""
    rng = np.random.default_rng(7)
    outcomes = {"refused": 0, "read": 0, "blank": 0}
    for variant, intact in _jpegs().items():
        for _ in range(60):
            data = _damage(intact, rng)
            full = manifest_mod._imdecode(data) is not None
            assert manifest_mod._jpeg_decodes_reduced(data) == full, variant
            outcomes["read" if full else "refused"] += 1
            outcomes["blank"] += manifest_mod._has_jpeg_end(data) and with_blank_scans(data) is not None
    assert min(outcomes.values()) > 30, outcomes  # both answers, and the blank path, are exercised


def test_a_jpeg_the_reduced_decode_refuses_is_confirmed_in_full(tmp_path, monkeypatch):
    path = tmp_path / "ok.jpg"
    path.write_bytes(_jpegs()["baseline"])
    monkeypatch.setattr(manifest_mod, "_jpeg_decodes_reduced", lambda data: False)
    assert manifest_mod._decodes(str(path))  # a file training reads is never refused


# --------------------------------------------------------------------------- through the launch


def counting_decodes(monkeypatch) -> list[str]:
    calls = []
    decodes = manifest_mod._decodes

    def counted(path: str) -> bool:
        calls.append(path)
        return decodes(path)

    monkeypatch.setattr(manifest_mod, "_decodes", counted)
    return calls


def test_a_second_plan_of_the_run_decodes_nothing(tmp_path, demo_dir, monkeypatch):
    calls = counting_decodes(monkeypatch)
    space = spaces.load_space(str(small_space(tmp_path, demo_dir, rows=120)))
    run = tmp_path / "runs" / "r"
    prepare_run(space, run)
    assert len(calls) == 120 and (run / "cache" / "image_checks.parquet").exists()
    del calls[:]
    prepare_run(space, run, resume=True)
    assert calls == []


def test_a_uri_run_keeps_its_checks_on_this_node_never_at_the_uri(tmp_path, demo_dir, monkeypatch):
    calls = counting_decodes(monkeypatch)
    space = spaces.load_space(str(small_space(tmp_path, demo_dir, rows=60)))
    uri = f"file://{tmp_path}/store/r"
    for resume, decoded in ((False, 60), (True, 0)):  # each launch works in a new scratch directory
        del calls[:]
        with open_run(uri) as run:
            run.pull_artifacts()
            write_plan(plan_sweep(space, run, resume=resume, smoke=False), run)
        assert len(calls) == decoded
    assert (Run.on_node(uri).cache_dir / "image_checks.parquet").exists()
    assert not list((tmp_path / "store").rglob("image_checks*")), "the cache was pushed"


def test_a_frame_header_claiming_a_huge_picture_is_refused_as_by_a_full_decode():
    """A damaged SOF that claims 60000 x 60000 in a 25 KB file: no stand-in is built (it would be larger than
    the file), and although its 1/8 decode fits OpenCV's pixel limit, the full picture does not: refused."""
    data = bytearray(_jpegs()["baseline"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2
    assert with_blank_scans(bytes(data)) is None
    assert manifest_mod._imdecode(bytes(data)) is None and not manifest_mod._jpeg_decodes_reduced(bytes(data))


def _with_sampling(data: bytes, factors: list[int]) -> bytes:
    """`data` with its SOF's sampling bytes (one per component, 0xHV) replaced."""
    d = bytearray(data)
    sof = d.index(b"\xff\xc0")
    for i, hv in enumerate(factors):
        d[sof + 11 + 3 * i] = hv
    return bytes(d)


@pytest.mark.parametrize("factors", [[0x10], [0x01], [0x50]], ids=["v0", "h0", "h5"])
def test_a_sampling_factor_libjpeg_refuses_is_refused_not_a_crash(factors):
    data = _with_sampling(_jpegs()["grey"], factors)
    assert manifest_mod._imdecode(data) is None
    assert with_blank_scans(data) is None and not manifest_mod._jpeg_decodes_reduced(data)


def test_fractional_chroma_sampling_is_refused_as_by_a_full_decode():
    """libjpeg refuses chroma sampling that is not a whole fraction of luma's when it upsamples: a grey decode
    never does, so the check decodes in colour."""
    data = _with_sampling(_jpegs()["baseline"], [0x11, 0x12, 0x13])
    assert manifest_mod._imdecode(data) is None and not manifest_mod._jpeg_decodes_reduced(data)


def test_duplicate_component_ids_get_no_stand_in(capfd):
    d = bytearray(_jpegs()["baseline"])
    sof, sos = d.index(b"\xff\xc0"), d.index(b"\xff\xda")
    d[sof + 13] = d[sof + 10]  # component 2 takes component 1's id, in the frame and the scan
    d[sos + 7] = d[sos + 5]
    data = bytes(d)
    assert with_blank_scans(data) is None
    assert manifest_mod._jpeg_decodes_reduced(data) == (manifest_mod._imdecode(data) is not None)


def test_a_restart_marker_after_every_block_keeps_the_stand_in_small():
    """Restart intervals of one MCU: the stand-in repeats eight built intervals (not one Python chunk per
    interval), and a damaged frame height that would make it larger than the file gets none."""
    data = _jpeg(_photo().convert("L").resize((320, 240)), "L", restart_marker_blocks=1)
    blank = with_blank_scans(data)
    assert blank is not None and blank.count(b"\xff\xd7") == 40 * 30 // 8 - 1  # 1200 MCUs: RST7 ends 149 periods
    assert cv2.imdecode(np.frombuffer(blank, np.uint8), cv2.IMREAD_REDUCED_COLOR_8).shape[:2] == (30, 40)
    d = bytearray(data)
    sof = d.index(b"\xff\xc0")
    d[sof + 5:sof + 7] = (65000).to_bytes(2, "big")
    assert with_blank_scans(bytes(d)) is None
