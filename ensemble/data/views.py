"""Named, deterministic OpenCV image operations that compose by name (TTA views and augmentation).

Spec syntax::

    spec  := chain ("," chain)*        "orig,hflip,pad+equalize"   -> one list of views per chain
    chain := op ("+" op)*              "pad+hflip+equalize"        -> applied left to right
    op    := name [":" argument]       "rotate:-10", "pad:edge", "fivecrop:0.8"

Images are HxWx3 uint8 RGB, C-contiguous, in and out. Most ops map one image to
one image; an *expanding* op (``fivecrop``) maps one image to several, so
``"fivecrop+hflip"`` is 5 views and ``"fivecrop,fivecrop+hflip"`` is 10.

This sits in the data loader's hot path: every op is one or a few cv2/numpy calls,
and parsed specs are cached so per-image calls never re-parse strings.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np

from ensemble.errors import UserError

Step = tuple[str, tuple]  # (op name, parsed arguments: () or (value,))


@dataclass(frozen=True)
class ViewOp:
    """A registered op: `fn(img, *args)`; `augment(img, *args, rng)` is its randomised form."""

    name: str
    fn: Callable[..., Any]
    expands: int  # 0: one image -> one image; N: one image -> a list of N images
    parse: Callable[[str | None], Any] | None  # None: the op takes no argument
    augment: Callable[..., np.ndarray] | None  # None: apply `fn` as is during training


VIEWS: dict[str, ViewOp] = {}


def register_view(
    name: str,
    *,
    expands: int | bool = False,
    parse: Callable[[str | None], Any] | None = None,
    augment: Callable[..., np.ndarray] | None = None,
) -> Callable:
    """Decorator that registers `fn(img[, value]) -> image` (or a list, if expanding) as op `name`.

    Args:
        name: the op's name in specs (letters, digits, underscores).
        expands: False for one-to-one ops, else the number of images each input
            yields (``count_views`` needs it without an image).
        parse: turns the text after ``:`` (None when absent) into the value passed
            to `fn`; raises ValueError with the accepted form (e.g. ``"blur:K, K an
            odd integer"``). Omit it for ops without an argument.
        augment: optional randomised form ``augment(img[, value], rng) -> image``;
            without it, training applies `fn` as is (an expanding op: one of its
            outputs at random).
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"View op name {name!r} must be letters, digits and underscores.")
    if expands is True:
        raise ValueError(f"expands for {name!r} must be the number of images it yields, e.g. expands=5.")

    def decorator(fn: Callable) -> Callable:
        if name in VIEWS:
            raise ValueError(f"View op {name!r} is already registered; pick another name.")
        # Names are never replaced, so the cached parses (of valid specs only) stay valid.
        VIEWS[name] = ViewOp(name, fn, int(expands), parse, augment)
        return fn

    return decorator


# ---- argument parsers: each returns the value or raises ValueError("<accepted form>")


def _number(form: str, default: float | None, ok: Callable[[float], bool], cast: type = float) -> Callable:
    def parse(text: str | None):
        try:
            value = default if text is None else cast(text)
        except ValueError:
            value = None
        if value is None or not (math.isfinite(value) and ok(value)):
            raise ValueError(form)
        return value

    return parse


def _fraction(op: str, default: float):
    return _number(f"{op}:F with 0 < F <= 1 (default {default})", default, lambda f: 0 < f <= 1)


def _pad_mode(text: str | None) -> int:
    modes = {None: cv2.BORDER_CONSTANT, "constant": cv2.BORDER_CONSTANT, "edge": cv2.BORDER_REPLICATE}
    if text not in modes:
        raise ValueError("pad, pad:constant (black border) or pad:edge (replicated border)")
    return modes[text]


# ---- the built-in ops, in the order a chain usually uses them


def _sometimes(name: str) -> Callable[..., np.ndarray]:
    """The augmentation of a flip or photometric op: apply it with probability 0.5."""

    def augment(img: np.ndarray, *args_and_rng):
        *args, rng = args_and_rng
        return VIEWS[name].fn(img, *args) if rng.random() < 0.5 else img

    return augment


register_view("orig")(lambda img: img)  # the input array itself, no copy


@register_view("pad", parse=_pad_mode)
def pad(img: np.ndarray, border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    """Pad to a square, image centred (an odd remainder goes bottom/right); never resizes the content."""
    h, w = img.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return cv2.copyMakeBorder(img, top, side - h - top, left, side - w - left, border, value=(0, 0, 0))


@register_view(
    "resize",
    parse=_number("resize:S with S a positive integer, e.g. resize:224", None, lambda s: s > 0, int),
)
def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size: INTER_AREA if any side shrinks (no aliasing), else INTER_LINEAR."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    interpolation = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interpolation)


@register_view("hflip", augment=_sometimes("hflip"))
def hflip(img: np.ndarray) -> np.ndarray:
    # cv2.flip, not img[:, ::-1]: a negative-stride view breaks torch.from_numpy.
    return cv2.flip(img, 1)


@register_view("vflip", augment=_sometimes("vflip"))
def vflip(img: np.ndarray) -> np.ndarray:
    return cv2.flip(img, 0)


@register_view(
    "rotate",
    parse=_number("rotate:N with N degrees counter-clockwise (default 10)", 10.0, lambda n: True),
    augment=lambda img, n, rng: rotate(img, rng.uniform(-n, n)),
)
def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate counter-clockwise about the centre; same size, reflect-101 border (no black corners)."""
    h, w = img.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, 1.0)
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


@register_view(
    "shift",
    parse=_number("shift:F with -1 < F < 1, a fraction of width and height (default 0.1)", 0.1, lambda f: -1 < f < 1),
    augment=lambda img, f, rng: shift(img, *rng.uniform(-f, f, size=2)),
)
def shift(img: np.ndarray, fx: float, fy: float | None = None) -> np.ndarray:
    """Translate right by fx x width and down by fy (default fx) x height; the border is replicated."""
    h, w = img.shape[:2]
    # Whole pixels: the content is copied exactly, without interpolation blur.
    matrix = np.float32([[1, 0, round(fx * w)], [0, 1, round((fx if fy is None else fy) * h)]])
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)


@register_view("equalize", augment=_sometimes("equalize"))
def equalize(img: np.ndarray) -> np.ndarray:
    """CLAHE on luminance only (Y of YCrCb), so colours are kept."""
    # YCrCb, not LAB: 0.1 ms vs 1.0 ms per 512x512 conversion here, and this is the hot path.
    y, cr, cb = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2YCrCb))
    # A new CLAHE per call costs 0.5 us; one shared instance is not thread-safe.
    y = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(y)
    return cv2.cvtColor(cv2.merge((y, cr, cb)), cv2.COLOR_YCrCb2RGB)


@register_view(
    "contrast",
    parse=_number("contrast:P with 0 <= P < 50 (default 2)", 2.0, lambda p: 0 <= p < 50),
    augment=_sometimes("contrast"),
)
def contrast(img: np.ndarray, percentile: float = 2.0) -> np.ndarray:
    """Stretch so the P-th and (100-P)-th luminance percentiles map to 0 and 255 (same map on R, G, B)."""
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    # Percentiles from the 256-bin cumulative histogram: one pass, no sort.
    cdf = np.cumsum(np.bincount(gray.ravel(), minlength=256))
    lo = np.searchsorted(cdf, cdf[-1] * percentile / 100, side="right")
    hi = np.searchsorted(cdf, cdf[-1] * (100 - percentile) / 100, side="left")
    if hi <= lo:  # a flat image has nothing to stretch
        return img
    lut = np.clip((np.arange(256) - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)
    return cv2.LUT(img, lut)


def _random_crop(img: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    return crop(img, frac, rng.random(), rng.random())


@register_view("centercrop", parse=_fraction("centercrop", 0.875), augment=_random_crop)
def crop(img: np.ndarray, frac: float = 0.875, ry: float = 0.5, rx: float = 0.5) -> np.ndarray:
    """Crop `frac` of each side; ry, rx in [0, 1] place it in the room left (0: top/left, 0.5: centre)."""
    h, w = img.shape[:2]
    ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
    top, left = round((h - ch) * ry), round((w - cw) * rx)
    return img[top : top + ch, left : left + cw].copy()  # copy: C-contiguous


@register_view("fivecrop", expands=5, parse=_fraction("fivecrop", 0.875), augment=_random_crop)
def fivecrop(img: np.ndarray, frac: float = 0.875) -> list[np.ndarray]:
    """The four corner crops (top-left, top-right, bottom-left, bottom-right) and the centre, as torchvision."""
    return [crop(img, frac, ry, rx) for ry, rx in ((0, 0), (0, 1), (1, 0), (1, 1), (0.5, 0.5))]


@functools.lru_cache(maxsize=None)
def face_detector() -> cv2.CascadeClassifier:
    """OpenCV's bundled frontal-face Haar cascade, loaded once per process."""
    # OpenCV 5 wheels have neither cv2.data nor cv2.CascadeClassifier: say so instead of an AttributeError.
    path = getattr(getattr(cv2, "data", None), "haarcascades", "") + "haarcascade_frontalface_default.xml"
    detector = cv2.CascadeClassifier(path) if hasattr(cv2, "CascadeClassifier") else None
    if detector is None or detector.empty():
        raise RuntimeError(f"Cannot load the Haar face cascade {path!r}: facecrop needs opencv-python 4.x.")
    return detector


@register_view(
    "facecrop",
    parse=_number("facecrop:F with F > 0, the crop side / the face side (default 2)", 2.0, lambda f: f > 0),
)
def facecrop(img: np.ndarray, scale: float = 2.0) -> np.ndarray:
    """Square crop of side `scale` x the largest face, centred on it; the centre crop when there is no face."""
    h, w = img.shape[:2]
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    faces = face_detector().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5)  # 5: fewer false faces
    if len(faces) == 0:
        return crop(img)
    x, y, fw, fh = max(faces.tolist(), key=lambda f: f[2] * f[3])
    side = min(round(scale * max(fw, fh)), h, w)
    # Slide the square inside the image rather than cutting it: the crop stays square
    # (the later resize never distorts it) and still holds the face.
    top = min(max(round(y + fh / 2 - side / 2), 0), h - side)
    left = min(max(round(x + fw / 2 - side / 2), 0), w - side)
    return img[top : top + side, left : left + side].copy()


# ---- parsing (cached: per-image calls never re-parse a string)


def _did_you_mean(name: str) -> str:
    # difflib's ratio (as get_close_matches, cutoff 0.6), but every equally close name:
    # get_close_matches(n=1) would offer 'vflip' for 'flip2' only by alphabetical accident.
    ratios = {op: difflib.SequenceMatcher(None, name.lower(), op.lower()).ratio() for op in VIEWS}
    best = max(ratios.values(), default=0.0)
    close = sorted(op for op, ratio in ratios.items() if ratio == best >= 0.6)
    return f" Did you mean {' or '.join(map(repr, close))}?" if close else ""


@functools.lru_cache(maxsize=1024)
def _parse_chain(chain: str, spec: str) -> tuple[Step, ...]:
    """Parse one chain into steps; `spec` is only for the error messages."""
    steps = []
    for token in chain.split("+"):
        name, colon, text = (part.strip() for part in token.partition(":"))
        if not name:
            raise UserError(f"Empty view op in view spec {spec!r}: ops are joined by '+' and chains by ','.")
        op = VIEWS.get(name)
        if op is None:
            hint = _did_you_mean(name)
            raise UserError(f"Unknown view op {name!r} in view spec {spec!r}. Known ops: {sorted(VIEWS)}.{hint}")
        if op.parse is None:
            if colon:
                raise UserError(f"View op {name!r} takes no argument; got {token.strip()!r} in view spec {spec!r}.")
            steps.append((name, ()))
            continue
        try:
            steps.append((name, (op.parse(text if colon else None),)))
        except ValueError as e:  # the parser's message is the accepted form
            got = f"got {token.strip()!r} in view spec {spec!r}"
            raise UserError(f"Bad argument for view op {name!r}: {got}. Use {e}.") from None
    return tuple(steps)


@functools.lru_cache(maxsize=256)
def _parse_spec(spec: str) -> tuple[tuple[Step, ...], ...]:
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"Empty view spec {spec!r}: give comma-separated chains such as 'orig,hflip'.")
    return tuple(_parse_chain(chain.strip(), spec) for chain in spec.split(","))


def parse_views(spec: str) -> list[str]:
    """Split a view spec into its chains, validating every op and argument.

    Raises:
        UserError: an unknown op (with the closest known name) or a bad argument.
    """
    _parse_spec(spec)
    return [chain.strip() for chain in spec.split(",")]


def count_views(spec: str) -> int:
    """How many images `apply_views(img, spec)` returns, without an image (fivecrop counts 5)."""
    return sum(math.prod(VIEWS[name].expands or 1 for name, _ in steps) for steps in _parse_spec(spec))


# ---- applying


def _check_image(img: np.ndarray, what: str) -> np.ndarray:
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
        found = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{what} must be an HxWx3 uint8 RGB array; got {found}.")
    return np.ascontiguousarray(img)  # a no-op unless a user op returned a strided view


def _run(steps: tuple[Step, ...], img: np.ndarray) -> list[np.ndarray]:
    images = [_check_image(img, "The image")]
    for name, args in steps:
        op = VIEWS[name]
        outputs = []
        for image in images:
            out = op.fn(image, *args)
            outputs.extend(out if op.expands else [out])
        images = [_check_image(out, f"The output of view op {name!r}") for out in outputs]
    return images


def apply_chain(img: np.ndarray, chain: str) -> list[np.ndarray]:
    """Apply one chain (ops joined by '+', left to right); always a list (fivecrop gives 5)."""
    if "," in chain:
        raise UserError(f"apply_chain takes one chain; {chain!r} has several: use apply_views.")
    return _run(_parse_chain(chain.strip(), chain), img)


def apply_chain_resized(img: np.ndarray, chain: str, size: int) -> list[np.ndarray]:
    """`apply_chain` then `resize_square(size)`, the data loader's path.

    A trailing `pad` is done as a letterbox instead: resize the content so its long
    side is `size`, then pad. Same picture, but the costly area-resize reads only the
    image's pixels, not the padding's (0.79x -> 0.9x+ of a plain imread+resize loop).
    """
    steps = _parse_chain(chain.strip(), chain)
    if steps and steps[-1][0] == "pad":
        return [letterbox(image, size, *steps[-1][1]) for image in _run(steps[:-1], img)]
    return [resize_square(image, size) for image in _run(steps, img)]


def letterbox(img: np.ndarray, size: int, border: int = cv2.BORDER_CONSTANT) -> np.ndarray:
    """Resize keeping the aspect ratio so the long side is `size`, then pad to size x size."""
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top, left = (size - nh) // 2, (size - nw) // 2
    return cv2.copyMakeBorder(img, top, size - nh - top, left, size - nw - left, border, value=(0, 0, 0))


def apply_views(img: np.ndarray, spec: str) -> list[np.ndarray]:
    """Apply every chain of `spec` to `img`; the views in spec order, `count_views(spec)` of them."""
    return [view for steps in _parse_spec(spec) for view in _run(steps, img)]


# ---- train-time augmentation: the same ops, randomised


@dataclass(frozen=True)
class Augmentation:
    """A randomised chain; picklable, so DataLoader workers can hold it. Build with `create_augmentation`."""

    spec: str
    steps: tuple[Step, ...]

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One augmented image; the same `rng` state always gives the same output."""
        img = _check_image(img, "The image")
        for name, args in self.steps:
            op = VIEWS[name]
            if op.augment is not None:
                img = op.augment(img, *args, rng)
            elif op.expands:  # a user's expanding op: one of its outputs at random
                outputs = op.fn(img, *args)
                img = outputs[rng.integers(len(outputs))]
            else:
                img = op.fn(img, *args)
            img = _check_image(img, f"The augmentation of view op {name!r}")
        return img


def create_augmentation(spec: str) -> Augmentation:
    """Build a train-time augmentation from one chain, e.g. ``"pad+hflip+rotate:15+resize:224"``.

    Flips, equalize and contrast fire with probability 0.5; rotate:N turns by a
    uniform angle in [-N, N]; shift:F moves by uniform [-F, F] in x and y
    independently; centercrop:F and fivecrop:F take a crop of fraction F at a
    uniform random position; orig, pad, resize and facecrop always apply.
    """
    chains = _parse_spec(spec)
    if len(chains) != 1:
        raise UserError(
            f"An augmentation is one chain of ops joined by '+'; view spec {spec!r} has {len(chains)} chains. "
            "Use '+' instead of ','."
        )
    return Augmentation(spec, chains[0])
