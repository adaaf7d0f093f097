"""Windowed DiT, window-by-window sampling, span encode/decode and the streaming safetensors writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._tolerance import network_tol, steps_tol
from weightdiff.errors import LayoutMismatchError, NonFiniteWeightsError, WeightFileError
from weightdiff.models.dit import WeightDiT
from weightdiff.models.generator import WeightGenerator, sample_tokens, seeded_noise
from weightdiff.models.schedule import ScheduleConfig
from weightdiff.models.windows import sample_windows, spans, window_noise, window_tokens
from weightdiff.weights.stream import StreamingWeightWriter, decode_span, encode_span, read_span, token_span
from weightdiff.weights.tokenizer import WeightTokenizer


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Odd sizes (tensors end mid-token), a half-precision tensor and a scalar."""
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(7, 5, generator=g), "a.bias": torch.randn(7, generator=g),
            "b.weight": torch.randn(3, 7, generator=g).to(torch.float16), "scale": torch.randn((), generator=g),
            "c.weight": torch.randn(11, 3, generator=g).to(torch.bfloat16)}


def _tokenizer(normalize: bool = True, token_size: int = 4) -> WeightTokenizer:
    tok = WeightTokenizer.from_state_dict(_state_dict(), token_size=token_size)
    return tok.fit([_state_dict(s) for s in range(4)]) if normalize else tok


def _generator(tok: WeightTokenizer, window: int | None, center: bool = False) -> WeightGenerator:
    lay = tok.layout
    torch.manual_seed(0)
    net = WeightGenerator(token_size=lay.token_size, num_tokens=lay.num_tokens, num_tensors=lay.num_tensors,
                          max_chunks=lay.max_chunks, max_depth=lay.max_depth, num_kinds=lay.num_kinds,
                          condition="code", condition_dims={"raw_dim": 3}, hidden=16, depth=2, heads=2,
                          window=window, center=center,
                          token_layout={"tensor_index": lay.token_tensor_index, "chunk_index": lay.token_chunk_index,
                                        "depth": lay.token_depth, "kind": lay.token_kind, "length": lay.token_length})
    for p in net.parameters():  # zero-initialised gates and read-outs would hide the dependence
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


# ------------------------------------------------------------------------------------ the DiT
def test_a_windowed_dit_attends_within_windows_only():
    torch.manual_seed(0)
    dit = WeightDiT(token_size=4, num_tensors=2, max_chunks=8, max_depth=2, num_kinds=2, hidden=16, depth=2,
                    heads=2, window=3).eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ids = {"tensor_index": torch.zeros(8, dtype=torch.long), "chunk_index": torch.arange(8),
           "depth": torch.zeros(8, dtype=torch.long), "kind": torch.zeros(8, dtype=torch.long)}
    x, t, c = torch.randn(2, 8, 4), torch.tensor([5, 700]), torch.randn(2, 16)
    out = dit(x, t, c, **ids)
    changed = x.clone()
    changed[:, 4] += 1.0  # a token of window 1 (tokens 3..5)
    moved = dit(changed, t, c, **ids)
    same = torch.tensor([0, 1, 2, 6, 7])
    torch.testing.assert_close(moved[:, same], out[:, same], rtol=0, atol=network_tol(dit, out))
    assert (moved[:, 3:6] - out[:, 3:6]).abs().amax() > 1e-3  # inside the window it matters
    # each window alone, ids and all, gives that window's output (the last one is short)
    for a, b in ((0, 3), (3, 6), (6, 8)):
        part = dit(x[:, a:b], t, c, **{k: v[a:b] for k, v in ids.items()})
        torch.testing.assert_close(part, out[:, a:b], rtol=0, atol=network_tol(dit, out))


def test_window_must_be_positive_and_latent_generators_take_none():
    with pytest.raises(ValueError, match="'window' must be a positive integer"):
        WeightDiT(token_size=4, num_tensors=1, max_chunks=1, max_depth=1, num_kinds=1, window=0)
    with pytest.raises(ValueError, match="'window' is for weight-token diffusion"):
        WeightGenerator(token_size=4, num_tokens=2, num_tensors=1, max_chunks=2, max_depth=1, num_kinds=8,
                        condition="none", window=2, latent={"num_params": 8})


# ------------------------------------------------------------------------------------ noise
def test_window_noise_is_the_same_whether_drawn_whole_or_by_spans():
    shape = (10, 3)
    whole = seeded_noise([4, 9], shape, 0.5, window=4)
    assert whole.shape == (2, 10, 3)
    parts = torch.cat([window_noise([4, 9], shape, 4, a, b, 0.5) for a, b in spans(10, 4)], dim=1)
    assert torch.equal(parts, whole)
    assert not torch.equal(whole[0, :4], whole[0, 4:8])  # windows have their own seeds
    assert not torch.equal(whole[0], whole[1])
    with pytest.raises(ValueError, match="not a span of whole windows"):
        window_noise([0], shape, 4, 2, 6)


def test_window_tokens_puts_a_short_last_window_last():
    assert window_tokens(10, 4, torch.tensor([2, 0])).tolist() == [0, 1, 2, 3, 8, 9]
    assert spans(10, 4, 2) == [(0, 8), (8, 10)]


# --------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("sampler, steps", [("ddim", 4), ("x0", 1)])
def test_sampling_window_by_window_equals_the_whole_sequence_sample(sampler, steps):
    tok = _tokenizer()
    net = _generator(tok, window=2)
    schedule = ScheduleConfig()
    raw = torch.tensor([[0.3, -1.0, 0.5]])
    seeds = [11, 12, 13]
    noise = seeded_noise(seeds, net.sample_shape, 1.0, window=2)
    whole = sample_tokens(net, raw, 3, schedule, steps=steps, sampler=sampler, guidance=1.0, noise=noise)
    got = list(sample_windows(net, raw, seeds, schedule, steps=steps, sampler=sampler, windows_per_span=2))
    assert [a for a, _ in got] == [a for a, _ in spans(tok.layout.num_tokens, 2, 2)]
    chunked = torch.cat([t for _, t in got], dim=1)
    # the same arithmetic on differently batched rows: per-step network rounding, accumulated
    atol = steps_tol(network_tol(net, whole), max(steps, 1))
    torch.testing.assert_close(chunked, whole, rtol=0, atol=atol)
    assert (chunked.masked_select(~net.valid.expand_as(chunked)) == 0).all()


def test_centring_is_the_training_mean_and_a_per_tensor_scale_and_inverts():
    tok = _tokenizer()
    lay = tok.layout
    centred = _generator(tok, window=2, center=True)
    g = torch.Generator().manual_seed(0)
    valid = lay.valid_mask()
    train = (3.0 + 0.1 * torch.randn(6, lay.num_tokens, lay.token_size, generator=g)).masked_fill(~valid, 0)
    centred.fit_center(train)
    mean = train.mean(0)
    torch.testing.assert_close(centred.token_center, mean.masked_fill(~valid, 0))
    for t, spec in enumerate(lay.tensors):  # the scale of a token is its tensor's residual std
        rows = lay.token_tensor_index == t
        resid = (train - mean)[:, rows][:, valid[rows]]
        want = resid.pow(2).mean().sqrt()
        torch.testing.assert_close(centred.token_scale[rows, 0], want.expand(int(rows.sum())), rtol=1e-5, atol=0)
    x = train[:2]
    r = centred.residual(x)
    assert r.abs().amax() < 10 and float(r[:, valid].std()) == pytest.approx(1.0, rel=0.3)
    torch.testing.assert_close(centred.to_tokens(r), x, rtol=0, atol=4 * float(x.abs().max()) * 2**-23)
    torch.testing.assert_close(centred.to_tokens(r[:, 2:5], slice(2, 5)), x[:, 2:5], rtol=0,
                               atol=4 * float(x.abs().max()) * 2**-23)


def test_sample_windows_refuses_a_generator_without_windows():
    net = _generator(_tokenizer(), window=None)
    with pytest.raises(ValueError, match="needs a windowed generator"):
        next(sample_windows(net, torch.zeros(1, 3), [0], ScheduleConfig(), steps=2, sampler="ddim"))


# ------------------------------------------------------------------------ span encode/decode
@pytest.mark.parametrize("normalize", [False, True])
def test_span_encode_and_decode_are_bit_exact_against_the_whole_sequence(normalize):
    tok = _tokenizer(normalize)
    lay = tok.layout
    sds = [_state_dict(s) for s in (5, 6)]
    flat = tok.flatten_batch(sds)
    tokens = tok.encode_batch(sds)
    decoded = tok.decode_flat(tokens)
    for a, b in spans(lay.num_tokens, 3) + spans(lay.num_tokens, 5, 2) + [(0, lay.num_tokens)]:
        p0, p1 = token_span(lay, a, b)
        assert torch.equal(encode_span(lay, flat[:, p0:p1], a, b), tokens[:, a:b])
        assert torch.equal(decode_span(lay, tokens[:, a:b], a), decoded[:, p0:p1])
    ends = [token_span(lay, a, b) for a, b in spans(lay.num_tokens, 3)]
    assert ends[0][0] == 0 and ends[-1][1] == lay.num_params
    assert all(x[1] == y[0] for x, y in zip(ends, ends[1:]))  # spans tile the flat vector


def test_read_span_reads_a_safetensors_file_piece_by_piece(tmp_path):
    from safetensors.torch import save_file

    tok = _tokenizer()
    sd = _state_dict(3)
    save_file(sd, str(tmp_path / "m.safetensors"))
    flat = tok.flatten(sd)
    for a, b in spans(tok.layout.num_tokens, 3):
        p0, p1 = token_span(tok.layout, a, b)
        assert torch.equal(read_span(tmp_path / "m.safetensors", tok.layout, p0, p1), flat[p0:p1])
    save_file({k: v for k, v in sd.items() if k != "b.weight"}, str(tmp_path / "short.safetensors"))
    with pytest.raises(WeightFileError, match=r"short.safetensors has no tensor 'b.weight'"):
        read_span(tmp_path / "short.safetensors", tok.layout, 0, tok.layout.num_params)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightFileError, match="bad.safetensors is not a readable safetensors file"):
        read_span(tmp_path / "bad.safetensors", tok.layout, 0, 4)


# ------------------------------------------------------------------------------ the writer
def test_streamed_file_equals_the_whole_decode_and_loads_with_safetensors(tmp_path):
    tok = _tokenizer()
    tokens = tok.encode_batch([_state_dict(7)])[0]
    path = tmp_path / "model.safetensors"
    extra = {"bn.num_batches_tracked": torch.tensor(5)}
    with StreamingWeightWriter(path, tok.layout, metadata={"format": "pt"}, extra=extra) as writer:
        for a, b in reversed(spans(tok.layout.num_tokens, 3)):  # in any order
            writer.write_tokens(tokens[a:b], a)
    loaded = load_file(str(path))
    want = tok.decode(tokens)
    assert set(loaded) == set(want) | set(extra)
    for k, v in want.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert torch.equal(loaded["bn.num_batches_tracked"], extra["bn.num_batches_tracked"])


def test_an_incomplete_or_overlapping_stream_publishes_nothing(tmp_path):
    tok = _tokenizer()
    tokens = tok.encode_batch([_state_dict(7)])[0]
    path = tmp_path / "model.safetensors"
    with pytest.raises(LayoutMismatchError, match="never written"):
        with StreamingWeightWriter(path, tok.layout) as writer:
            writer.write_tokens(tokens[:3], 0)
    with pytest.raises(LayoutMismatchError, match="written twice"):
        with StreamingWeightWriter(path, tok.layout) as writer:
            writer.write_tokens(tokens, 0)
            writer.write_tokens(tokens[:3], 0)
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingWeightWriter(path, tok.layout) as writer:
            writer.write_tokens(tokens, 0)
            raise RuntimeError("boom")
    bad = tokens.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="a.weight"):
        with StreamingWeightWriter(path, tok.layout) as writer:
            writer.write_tokens(bad, 0)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def windowed_generator(tmp_path_factory):
    """A windowed generator fitted for a few steps on random windows of a tiny whole-network zoo."""
    from conftest import REPO, export_last, fit_tiny
    from weightdiff.zoo import build_zoo, load_recipe

    root = tmp_path_factory.mktemp("windowed")
    zoo = build_zoo(load_recipe(REPO / "configs/zoo/tiny-digits-cnn.yaml"), root / "zoo", workers=1, progress=False)
    run = fit_tiny(zoo, root / "fit", "--data.condition", "none", "--data.token_size", "16", "--model.window", "4",
                   "--model.train_windows", "3", "--model.center_tokens", "true",
                   "--trainer.max_steps", "6")
    return export_last(run, root / "generator")


def test_a_streamed_sample_equals_the_whole_sequence_sample_and_loads_strictly(windowed_generator, tmp_path):
    from weightdiff.models.generator import load_generator
    from weightdiff.sampling import SamplerSettings, generate_tokens, make_condition, sample
    from weightdiff.tasks import get_task

    gen = load_generator(windowed_generator)
    assert gen.generator.config.window == 4 and gen.tokenizer.layout.num_tokens > 3 * 4
    assert gen.generator.config.center and gen.generator.token_center.abs().sum() > 0  # fitted and exported
    cond = make_condition(gen, task="digits")
    settings = SamplerSettings(steps=3, sampler="ddim", seed=5)
    dirs, info = sample(gen, cond, 3, settings, tmp_path / "samples", progress=False, batch_size=2)
    tokens, _ = generate_tokens(gen, cond, 3, settings, use_cache=False, progress=False)
    whole = gen.tokenizer.decode_batch(tokens)
    net = get_task("digits").build_network()
    atol = steps_tol(network_tol(gen.generator, tokens), 3) * float(gen.tokenizer.layout.std.max())
    for folder, want in zip(dirs, whole):
        got = load_file(str(folder / "model.safetensors"))
        net.load_state_dict(got, strict=True)  # every tensor of the network, with its shape
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=atol)
        assert (folder / "sample.json").is_file()
    assert not torch.equal(load_file(str(dirs[0] / "model.safetensors"))["conv1.weight"],
                           load_file(str(dirs[1] / "model.safetensors"))["conv1.weight"])


def test_window_by_window_sampling_never_runs_the_denoiser_on_more_than_a_span(monkeypatch, tmp_path):
    """Memory bounded by a span: on a synthetic layout of many windows the denoiser only ever sees
    one span of tokens (and so do the decoder and the writer), never the whole target."""
    from weightdiff.weights.layout import TokenLayout

    shapes = {f"layer{i}.weight": ((37, 29), torch.float32) for i in range(12)}  # 12 x 34 tokens of 32
    lay = TokenLayout.from_shapes(shapes, 32)
    tok = WeightTokenizer(lay)
    net = _generator(tok, window=8)
    seen = []
    forward = WeightDiT.forward
    monkeypatch.setattr(WeightDiT, "forward",
                        lambda self, x, *a, **k: seen.append(x.shape[1]) or forward(self, x, *a, **k))
    decoded = []
    span_decode = decode_span
    monkeypatch.setattr("weightdiff.weights.stream.decode_span",
                        lambda layout, tokens, start: decoded.append(tokens.shape[1])
                        or span_decode(layout, tokens, start))
    with StreamingWeightWriter(tmp_path / "m.safetensors", lay) as writer:
        for start, tokens in sample_windows(net, torch.zeros(1, 3), [0, 1], ScheduleConfig(), steps=3,
                                            sampler="ddim", windows_per_span=2):
            assert tokens.shape[:2] == (2, min(16, lay.num_tokens - start))
            writer.write_tokens(tokens[0], start)
    assert set(load_file(str(tmp_path / "m.safetensors"))) == set(shapes)
    assert lay.num_tokens == 408 and max(seen) == 16 and len(seen) == 3 * 26  # 26 spans x 3 steps
    assert max(decoded) == 16 and sum(decoded) == lay.num_tokens


def test_diagnose_measures_a_centred_generator_in_its_residual_space(windowed_generator, tmp_path):
    """The entries are diffused as residuals and scored as tokens: at low noise the posterior-mean
    oracle returns the training entries themselves, so its accuracy is theirs."""
    from weightdiff.evaluate.diagnose import diagnose_generator, diffusion_space
    from weightdiff.models.generator import load_generator
    from weightdiff.tasks import get_task
    from weightdiff.zoo import Zoo

    gen = load_generator(windowed_generator)
    zoo = Zoo.open(Path(gen.config["zoo"]["path"]))
    report = diagnose_generator(gen, zoo, paths=[("ddim", 2)], max_entries=None, num=2, timesteps=(0, 5, 999))
    train = report["noise_levels"]["train"]
    assert train["oracle_mse"][1] < 1e-3  # t = 5: the oracle is the entry itself
    rows = zoo.rows("train")
    n_val = get_task(rows[0]["task"]).data().split("val")[1].numel()
    zoo_acc = sum(r["metrics"]["val_acc"] for r in rows) / len(rows)
    assert abs(train["oracle_acc"][1] - zoo_acc) <= 1 / n_val  # one near-tie may round the other way
    into, back = diffusion_space(gen)
    tokens = gen.tokenizer.encode_batch([zoo.load(rows[0]["id"])])
    scale = float(tokens.abs().max() + gen.generator.token_center.abs().max())
    assert torch.allclose(back(into(tokens)), tokens, rtol=0, atol=4 * torch.finfo(torch.float32).eps * scale)
    assert not torch.allclose(into(tokens), tokens)  # the residual is not the token itself
    assert len(report["paths"]["ddim-2"]["accuracy"]) == 2
