"""Task strings, splits, image transforms, codes and descriptions."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch

from tests._tolerance import interpolation_tol
from weightdiff.errors import TaskStringError, WeightDiffError
from weightdiff.tasks import get_task, list_families, make_task, rotate_images
from weightdiff.tasks import mnist1d as mnist1d_module
from weightdiff.tasks.digits import NUM_TEST, NUM_TRAIN, NUM_VAL


# ---------------------------------------------------------------- task strings
@pytest.mark.parametrize("text, canonical", [
    ("digits", "digits"),
    ("  mnist1d ", "mnist1d"),
    ("rotdigits:flip=0,angle=40.0", "rotdigits:angle=40,flip=0"),
    ("rotdigits:angle=40", "rotdigits:angle=40,flip=0"),
    ("rotdigits: angle = -12.50 , flip = 1", "rotdigits:angle=-12.5,flip=1"),
    ("rotdigits:angle=-0", "rotdigits:angle=0,flip=0"),
    ("rotdigits:angle=1e2,flip=1", "rotdigits:angle=100,flip=1"),
    ("rotdigits:angle=-180", "rotdigits:angle=-180,flip=0"),
    ("rotdigits:angle=33.3333333", "rotdigits:angle=33.3333,flip=0"),
])
def test_canonical_names(text: str, canonical: str) -> None:
    task = get_task(text)
    assert task.name == canonical
    again = get_task(task.name)
    assert again == task and again.name == canonical
    assert hash(again) == hash(task)


def test_factors_agree_with_name() -> None:
    task = get_task("rotdigits:angle=33.3333333,flip=1")
    assert task.factors == {"angle": 33.3333, "flip": 1}
    assert list(task.factors) == ["angle", "flip"]
    assert isinstance(task.factors["flip"], int)
    assert make_task("rotdigits", angle=33.3333333, flip=1) == task
    assert make_task("digits").name == "digits"


def test_families_and_kinds() -> None:
    assert list_families() == ["cordigits", "dataset", "dataset-net", "digits", "digits-mlp", "mnist1d", "rotdigits"]
    assert get_task("digits").kind == "full"
    assert get_task("mnist1d").kind == "full"
    rot = get_task("rotdigits:angle=10")
    assert rot.kind == "lora" and rot.base_family == "digits"
    assert rot.num_classes == 10 and rot.input_shape == (1, 8, 8)
    assert get_task("mnist1d").input_shape == (1, 40)


@pytest.mark.parametrize("text, needles", [
    ("", ["empty"]),
    ("   ", ["empty"]),
    (":angle=3", ["no family"]),
    ("imagenet", ["unknown family 'imagenet'", "digits"]),
    ("Digits", ["unknown family 'Digits'"]),
    ("rotdigits:", ["no factors"]),
    ("rotdigits:angle", ["'angle'", "key=value"]),
    ("rotdigits:angle=", ["'angle='", "key=value"]),
    ("rotdigits:=5", ["'=5'", "key=value"]),
    ("rotdigits:angle=5,,flip=1", ["empty factor"]),
    ("rotdigits:angle=5,", ["empty factor"]),
    ("rotdigits:angle=5,angle=6", ["'angle'", "twice"]),
    ("rotdigits:flip=1", ["missing required factor 'angle'", "[-180, 180)"]),
    ("rotdigits:angle=5,scale=2", ["unknown factor 'scale'", "angle, flip"]),
    ("digits:angle=5", ["unknown factor 'angle'", "no factors"]),
    ("rotdigits:angle=abc", ["'angle'", "'abc'", "[-180, 180)"]),
    ("rotdigits:angle=nan", ["'angle'", "non-finite", "[-180, 180)"]),
    ("rotdigits:angle=inf", ["'angle'", "non-finite"]),
    ("rotdigits:angle=180", ["'angle'", "out of range", "[-180, 180)"]),
    ("rotdigits:angle=-180.5", ["'angle'", "out of range"]),
    ("rotdigits:angle=5,flip=2", ["'flip'", "not allowed", "one of 0, 1"]),
    ("rotdigits:angle=5,flip=0.5", ["'flip'", "non-integer", "one of 0, 1"]),
    ("rotdigits:angle=5,flip=yes", ["'flip'", "'yes'"]),
])
def test_malformed_strings_name_the_problem(text: str, needles: list[str]) -> None:
    with pytest.raises(TaskStringError) as info:
        get_task(text)
    message = str(info.value)
    assert repr(text) in message  # the message names the string
    for needle in needles:
        assert needle in message, (needle, message)
    assert isinstance(info.value, WeightDiffError)


def test_non_string_rejected() -> None:
    with pytest.raises(TaskStringError, match="must be a str"):
        get_task(40)  # type: ignore[arg-type]


# ---------------------------------------------------------------- data
def _assert_disjoint_rows(*xs: torch.Tensor) -> None:
    keys = [{row.numpy().tobytes() for row in x.flatten(1)} for x in xs]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            # load_digits has a handful of exact duplicate images; splits are disjoint by index,
            # so at most those duplicates may coincide.
            assert len(keys[i] & keys[j]) <= 5


def test_digits_splits() -> None:
    data = get_task("digits").data()
    assert data.x_train.shape == (NUM_TRAIN, 1, 8, 8)
    assert data.x_val.shape == (NUM_VAL, 1, 8, 8)
    assert data.x_test.shape == (NUM_TEST, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    for y in (data.y_train, data.y_val, data.y_test):  # stratified: every class present
        assert torch.equal(torch.unique(y), torch.arange(10))
    _assert_disjoint_rows(data.x_train, data.x_val, data.x_test)
    assert get_task("digits").data() is data  # cached per process


def test_digits_splits_are_seed_deterministic() -> None:
    from weightdiff.tasks import digits as digits_module

    first = digits_module.digits_arrays()
    digits_module.digits_arrays.cache_clear()
    try:
        second = digits_module.digits_arrays()
    finally:
        digits_module.digits_arrays.cache_clear()
    assert second is not first
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_rotdigits_shares_the_digit_splits() -> None:
    base = get_task("digits").data()
    rot = get_task("rotdigits:angle=0").data()
    assert torch.equal(rot.x_train, base.x_train) and torch.equal(rot.y_test, base.y_test)
    flipped = get_task("rotdigits:angle=0,flip=1").data()
    assert torch.equal(flipped.x_val, base.x_val.flip(-1))
    assert torch.equal(flipped.y_val, base.y_val)


def test_mnist1d_restores_global_rng_and_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WEIGHTDIFF_CACHE", str(tmp_path))
    random.seed(123)
    np.random.seed(456)
    py_before, np_before = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(456)
    raw = mnist1d_module.mnist1d_raw()
    assert random.random() == py_before and np.random.rand() == np_before
    cache = tmp_path / mnist1d_module.CACHE_FILE
    assert cache.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != cache.name]  # no temp files left
    cached = mnist1d_module.mnist1d_raw()
    for key in ("x", "y", "x_test", "y_test"):
        np.testing.assert_array_equal(cached[key], raw[key])
    assert raw["x"].shape == (4000, 40) and raw["x_test"].shape == (1000, 40)
    cache.write_bytes(b"not a zip")  # a corrupt cache is regenerated, not trusted
    np.testing.assert_array_equal(mnist1d_module.mnist1d_raw()["y"], raw["y"])


def test_mnist1d_splits() -> None:
    data = get_task("mnist1d").data()
    assert data.x_train.shape == (3500, 1, 40) and data.x_val.shape == (500, 1, 40)
    assert data.x_test.shape == (1000, 1, 40)
    assert data.y_train.dtype == torch.int64
    _assert_disjoint_rows(data.x_train, data.x_val, data.x_test)


# ---------------------------------------------------------------- rotation and flips
def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


#: bilinear resampling of 8 x 8 images in [0, 1] against an exact pixel move
_ROT_TOL = interpolation_tol(size=8, scale=1.0)


def test_rotation_by_zero_is_identity() -> None:
    x = _images()
    torch.testing.assert_close(rotate_images(x, 0.0), x, rtol=0, atol=0)
    torch.testing.assert_close(rotate_images(x, 1e-9), x, rtol=0, atol=_ROT_TOL)


def test_rotation_is_counter_clockwise() -> None:
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 0, 7] = 1.0  # top-right pixel; counter-clockwise by 90° it lands top-left
    out = rotate_images(x, 90.0)
    assert out[0, 0, 0, 0] > 0.99 and float(out.sum()) == pytest.approx(1.0, abs=64 * _ROT_TOL)  # 64 pixels
    torch.testing.assert_close(rotate_images(_images(), 90.0), torch.rot90(_images(), 1, (-2, -1)),
                               atol=_ROT_TOL, rtol=0)
    torch.testing.assert_close(rotate_images(_images(), -90.0), torch.rot90(_images(), -1, (-2, -1)),
                               atol=_ROT_TOL, rtol=0)


def test_rotation_tolerance_catches_a_slightly_wrong_angle() -> None:
    off = rotate_images(_images(), 90.001) - torch.rot90(_images(), 1, (-2, -1))
    assert float(off.abs().max()) > 10 * _ROT_TOL


def test_rotation_90_twice_is_180() -> None:
    x = _images()
    twice = rotate_images(rotate_images(x, 90.0), 90.0)
    torch.testing.assert_close(twice, rotate_images(x, 180.0 - 1e-12), atol=3 * _ROT_TOL, rtol=0)  # 2 + 1 resamplings
    torch.testing.assert_close(twice, torch.rot90(x, 2, (-2, -1)), atol=2 * _ROT_TOL, rtol=0)  # two resamplings
    torch.testing.assert_close(rotate_images(x, -180.0), torch.rot90(x, 2, (-2, -1)), atol=_ROT_TOL, rtol=0)


def test_flip_then_rotate() -> None:
    x = _images()
    torch.testing.assert_close(rotate_images(x, 0.0, flip=1), x.flip(-1), rtol=0, atol=0)
    # mirroring first, then rotating: rot(A) ∘ mirror
    torch.testing.assert_close(rotate_images(x, 90.0, flip=1), torch.rot90(x.flip(-1), 1, (-2, -1)),
                               atol=_ROT_TOL, rtol=0)
    # ... which differs from mirroring after the rotation
    assert not torch.allclose(rotate_images(x, 90.0, flip=1), torch.rot90(x, 1, (-2, -1)).flip(-1), atol=1e-3)


def test_task_data_is_rotated_images() -> None:
    base = get_task("digits").data()
    rot = get_task("rotdigits:angle=-90,flip=1").data()
    tol = interpolation_tol(size=8, scale=float(base.x_test.abs().max()))
    torch.testing.assert_close(rot.x_test, torch.rot90(base.x_test.flip(-1), -1, (-2, -1)), atol=tol, rtol=0)


# ---------------------------------------------------------------- codes and descriptions
@pytest.mark.parametrize("angle, flip", [(40.0, 0), (-135.5, 1), (0.0, 1), (-180.0, 0)])
def test_code(angle: float, flip: int) -> None:
    code = make_task("rotdigits", angle=angle, flip=flip).code()
    assert code.dtype == torch.float32 and code.shape == (3,)
    a = math.radians(angle)
    torch.testing.assert_close(code, torch.tensor([math.cos(a), math.sin(a), 2.0 * flip - 1.0]), rtol=0, atol=0)


def test_single_task_families_have_constant_code() -> None:
    assert torch.equal(get_task("digits").code(), torch.ones(1))


_MIRROR = re.compile(r"mirror|flip|reflect", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@pytest.mark.parametrize("angle, flip", [(40.0, 0), (-33.5, 1), (0.0, 0), (0.0, 1), (-180.0, 1), (179.9, 0)])
def test_descriptions_state_angle_direction_and_flip(angle: float, flip: int) -> None:
    texts = make_task("rotdigits", angle=angle, flip=flip).descriptions()
    assert len(texts) >= 5 and len(set(texts)) == len(texts)
    for text in texts:
        numbers = _NUMBER.findall(text)
        assert numbers == [f"{abs(angle):g}"], text  # the angle is the only number
        assert re.search(rf"{re.escape(numbers[0])}(?: degrees|°)", text), text
        lower = text.lower()
        if angle < 0:
            assert "clockwise" in lower and not re.search(r"counter-?clockwise|anticlockwise", lower), text
        elif angle > 0:
            assert re.search(r"counter-?clockwise|anticlockwise", lower), text
        else:
            assert "clockwise" not in lower, text
        assert bool(_MIRROR.search(text)) == bool(flip), text


def test_descriptions_are_varied() -> None:
    texts = get_task("rotdigits:angle=25,flip=1").descriptions()
    words = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    assert {"counter", "anticlockwise", "counterclockwise"} <= words
    assert len({t.split()[0] for t in texts}) >= 5  # different openings, not one template
    for family in ("digits", "mnist1d"):
        assert len(get_task(family).descriptions()) >= 3
