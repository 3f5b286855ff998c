"""A JPEG's markers with blank scans: what the launch-time image check decodes instead of the file.

A full decode of a JPEG refuses a file only for what its marker segments say (tables, frame, scan
headers, markers where none may be, a missing end): damaged entropy-coded data only makes libjpeg
warn and fill the picture with grey. So `with_blank_scans` keeps every marker segment in order and
replaces each scan's entropy-coded data with a stand-in of the same number of blocks, every block
zero (a DC difference of 0, then end-of-block, in the file's own Huffman codes). libjpeg then parses
the same marker segments as in the file and decodes a tenth to a fifteenth of its bytes (640x480
photos at quality 75-90), without a warning. Bytes between a scan's data and the next marker (stray
restart markers, junk) are dropped; where libjpeg would have read them differently, the stand-in is
refused and the caller's full decode decides.

Only single-scan sequential Huffman JPEGs (SOF0/SOF1, all components in one scan: what cameras and
most encoders write) get a stand-in. `with_blank_scans` returns None, and the caller decodes the
file as it is, for a progressive, multi-scan, arithmetic-coded or lossless file, one whose segments
do not parse cleanly, one with no Huffman table or a table without a code for symbol 0 (common with
optimised tables of small images), and one whose stand-in would be larger than the file (a damaged
frame size). tests/test_validation.py checks that the check refuses what a full decode refuses,
over kinds of damage and JPEG flavours.
"""

from __future__ import annotations

import functools

import numpy as np

_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)  # SOF0 baseline, SOF1 extended sequential
_NOT_A_FRAME = (0xC4, 0xC8, 0xCC)  # DHT, JPG, DAC share the SOFn code range
_PARAMETERLESS = set(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: no length field


def with_blank_scans(data: bytes) -> bytes | None:
    """`data`, a JPEG, with its scan's entropy-coded data replaced by blank blocks; None when no stand-in is
    built (see the module docstring). A file that ends before any scan comes back unchanged."""
    buf = np.frombuffer(data, np.uint8)
    ff = np.flatnonzero(buf[:-1] == 0xFF)
    after = buf[ff + 1]
    # A scan's data runs to the first marker that is not a byte stuffing (FF 00), a fill byte or a restart.
    scan_ends = ff[(after != 0) & (after != 0xFF) & ((after < 0xD0) | (after > 0xD7))]
    tables, frame, restart = {}, None, 0
    kept, pos, start = [], 2, 0
    while True:
        if pos + 2 > len(data) or data[pos] != 0xFF or data[pos + 1] == 0xFF:
            return None  # not a marker where one belongs (or fill bytes): decode the file itself
        code = data[pos + 1]
        if code == 0xD9:  # EOI: nothing after it is read
            return b"".join([*kept, data[start:]])
        if code in _PARAMETERLESS:
            pos += 2
            continue
        end = pos + 2 + (data[pos + 2] << 8 | data[pos + 3]) if pos + 4 <= len(data) else len(data) + 1
        if end > len(data):
            return None
        body = data[pos + 4:end]
        if 0xC0 <= code <= 0xCF and code not in _NOT_A_FRAME:
            frame = _frame(body) if code in _SEQUENTIAL_HUFFMAN else None
            if frame is None:
                return None
        elif code == 0xC4:
            found = _codes_for_zero(body)
            if found is None:
                return None
            tables.update(found)
        elif code == 0xDD and len(body) >= 2:
            restart = body[0] << 8 | body[1]
        elif code == 0xDA:
            if kept:  # a second scan (progressive-like layouts of sequential data): decoded as it is
                return None
            blank = _blank_scan(body, frame, tables, restart, len(data))
            i = np.searchsorted(scan_ends, end)
            if blank is None or i == len(scan_ends):
                return None
            kept += [data[start:end], blank]
            pos = start = int(scan_ends[i])
            continue
        pos = end


def _frame(body: bytes) -> tuple[int, int, dict] | None:
    """(width, height, {component id: (h, v) sampling}) of a SOF segment; None unless libjpeg would take it
    as it is (sampling factors 1-4, distinct component ids), so a damaged one is decoded as it is."""
    if len(body) < 6:
        return None
    height, width, count = body[1] << 8 | body[2], body[3] << 8 | body[4], body[5]
    if len(body) < 6 + 3 * count or not (height and width and count):
        return None  # height 0: defined later by a DNL marker
    comps = {body[6 + 3 * i]: (body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(count)}
    if len(comps) < count or not all(1 <= h <= 4 and 1 <= v <= 4 for h, v in comps.values()):
        return None
    return width, height, comps


@functools.lru_cache(maxsize=256)
def _codes_for_zero(body: bytes) -> tuple | None:
    """((class, id), bit string) of each table in a DHT segment: the code of symbol 0 (DC: a difference of 0,
    AC: end-of-block), or None as the bit string of a table without one; None for the whole segment when it
    is cut short. Codes are canonical: they follow from the counts."""
    found, pos = [], 0
    while pos < len(body):
        if pos + 17 > len(body):
            return None
        counts = body[pos + 1:pos + 17]
        k = body[pos + 17:pos + 17 + sum(counts)].find(0)
        zero, code, first = None, 0, 0
        for length, count in enumerate(counts, 1):
            if 0 <= k < first + count:
                zero = format(code + k - first, f"0{length}b")
                break
            code, first = (code + count) << 1, first + count
        found.append(((body[pos] >> 4, body[pos] & 15), zero))
        pos += 17 + sum(counts)
    return tuple(found)


def _blank_scan(body: bytes, frame, tables: dict, restart: int, size: int) -> bytes | None:
    """The entropy-coded data of a scan (an SOS header's `body`) whose blocks are all zero; None when it
    would be larger than the file (`size` bytes, before byte stuffing, which at most doubles it), as for
    a damaged frame header claiming 60000 x 60000."""
    if frame is None or not body:
        return None
    width, height, comps = frame
    count = body[0]
    if not 1 <= count <= 4 or len(body) != 4 + 2 * count or body[-3:] != b"\x00\x3f\x00":
        return None  # not one full sequential scan (Ss 0, Se 63, Ah = Al = 0)
    ids, selectors = body[1:1 + 2 * count:2], body[2:2 + 2 * count:2]
    if any(c not in comps for c in ids):
        return None
    codes = [(tables.get((0, s >> 4)), tables.get((1, s & 15))) for s in selectors]
    if any(dc is None or ac is None for dc, ac in codes):
        return None
    hmax, vmax = max(h for h, _ in comps.values()), max(v for _, v in comps.values())
    if count == 1:  # one block per MCU, over the component's own grid
        h, v = comps[ids[0]]
        mcus = -(-width * h // (hmax * 8)) * -(-height * v // (vmax * 8))
        mcu = codes[0][0] + codes[0][1]
    else:  # h x v blocks of each component per MCU
        mcus = -(-width // (hmax * 8)) * -(-height // (vmax * 8))
        mcu = "".join((dc + ac) * comps[c][0] * comps[c][1] for c, (dc, ac) in zip(ids, codes))
    interval = restart if 0 < restart < mcus else mcus
    if -(-mcus // interval) * (-(-interval * len(mcu) // 8) + 2) > size:
        return None
    return _blank_data(mcu, mcus, interval)


@functools.lru_cache(maxsize=64)
def _blank_data(mcu: str, mcus: int, interval: int) -> bytes:
    """`mcus` copies of an MCU's bits, a restart marker after every `interval` MCUs but the last, each interval
    padded with 1s. Full intervals differ only in their marker (RST0-RST7): eight are built, then repeated."""

    def coded(n: int) -> bytes:
        bits = mcu * n + "1" * (-(n * len(mcu)) % 8)
        return int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")

    full, last = divmod(mcus, interval)
    if not last:
        full, last = full - 1, interval
    tail = coded(last)
    if not full:  # no restart markers: the usual case
        return tail
    chunk = tail if last == interval else coded(interval)
    period = b"".join(chunk + bytes([0xFF, 0xD0 + k]) for k in range(8))
    return period * (full // 8) + period[:(full % 8) * (len(chunk) + 2)] + tail
