"""Tests for the DiT denoiser over weight tokens (weightdiff.models.dit)."""

from __future__ import annotations

import json

import pytest
import torch

from tests._tolerance import network_tol
from weightdiff.errors import LayoutMismatchError
from weightdiff.models import WeightDiT

D, H = 8, 32
SIZES = dict(token_size=D, num_tensors=5, max_chunks=7, max_depth=3, num_kinds=4)


def make_model(cross_attention: bool = False, randomize: bool = True, dtype=torch.float32, **kw) -> WeightDiT:
    torch.manual_seed(0)
    model = WeightDiT(**SIZES, hidden=H, depth=2, heads=4, cross_attention=cross_attention, **kw).to(dtype)
    if randomize:
        # The zero-initialised model outputs exactly 0 whatever its inputs; give every parameter a
        # non-trivial value so that invariance tests could fail.
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
    return model.eval()


def random_ids(length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: torch.randint(0, SIZES[size], (length,), generator=generator)
            for name, size in (("tensor_index", "num_tensors"), ("chunk_index", "max_chunks"),
                               ("depth", "max_depth"), ("kind", "num_kinds"))}


def pad_ragged(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences (L_i, D) -> zero-padded x (B, max L_i, D) and key_mask (B, max L_i), True at real tokens."""
    x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    lengths = torch.tensor([s.shape[0] for s in seqs])
    return x, torch.arange(x.shape[1]) < lengths[:, None]


def ragged_batch(lengths: list[int], dtype=torch.float32, seed: int = 0):
    """Sequences (L_i, D) with their ids, and the padded batch of them."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(n, D, generator=g, dtype=dtype) for n in lengths]
    ids = [random_ids(n, g) for n in lengths]
    x, mask = pad_ragged(seqs)
    padded_ids = {k: pad_ragged([i[k] for i in ids])[0] for k in ids[0]}
    t = torch.randint(0, 1000, (len(lengths),), generator=g)
    c = torch.randn(len(lengths), H, generator=g, dtype=dtype)
    return seqs, ids, x, mask, padded_ids, t, c


# ------------------------------------------------------------------------------------ init / shape
@pytest.mark.parametrize("cross_attention", [False, True])
def test_zero_init_outputs_exactly_zero(cross_attention):
    model = make_model(cross_attention, randomize=False)
    _, _, x, mask, ids, t, c = ragged_batch([4, 9])
    out = model(x, t, c, key_mask=mask, **ids)
    assert out.shape == x.shape
    assert bool((out == 0).all())


def test_cross_attention_shapes_and_condition_mask():
    model = make_model(cross_attention=True)
    _, _, x, mask, ids, t, c = ragged_batch([6, 11])
    g = torch.Generator().manual_seed(3)
    cond_seq = torch.randn(2, 5, H, generator=g)
    cond_mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = model(x, t, c, key_mask=mask, cond_seq=cond_seq, cond_seq_mask=cond_mask, **ids)
    assert out.shape == (2, 11, D) and bool(torch.isfinite(out).all())
    # masked condition vectors are never attended: their attention weights are exactly 0, so the
    # output is the same computation, bit for bit
    noisy = cond_seq.clone()
    noisy[0, 3:] = 1e4
    out2 = model(x, t, c, key_mask=mask, cond_seq=noisy, cond_seq_mask=cond_mask, **ids)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    # and unmasked ones are
    out3 = model(x, t, c, key_mask=mask, cond_seq=noisy, cond_seq_mask=None, **ids)
    assert not torch.allclose(out3[0], out[0])
    # without cond_seq the condition vector is used as a one-element sequence
    out4 = model(x, t, c, key_mask=mask, **ids)
    out5 = model(x, t, c, key_mask=mask, cond_seq=c[:, None], **ids)
    torch.testing.assert_close(out4, out5, rtol=0, atol=0)


def test_cond_seq_requires_cross_attention():
    model = make_model(cross_attention=False)
    _, _, x, mask, ids, t, c = ragged_batch([3])
    with pytest.raises(ValueError, match="cross_attention=False"):
        model(x, t, c, key_mask=mask, cond_seq=c[:, None], **ids)


# --------------------------------------------------------------------------------- ragged batches
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cross_attention", [False, True])
def test_output_independent_of_batch_companions(dtype, cross_attention):
    """Padded into a batch or alone, a sequence's output differs only by the rounding of its sums."""
    model = make_model(cross_attention, dtype=dtype)
    lengths = [5, 17, 1, 12]
    seqs, ids, x, mask, pids, t, c = ragged_batch(lengths, dtype=dtype)
    batched = model(x, t, c, key_mask=mask, **pids)
    alone = [model(seqs[i][None], t[i:i + 1], c[i:i + 1], **ids[i])[0] for i in range(len(lengths))]  # no padding
    for i, n in enumerate(lengths):
        torch.testing.assert_close(batched[i, :n], alone[i], rtol=0, atol=network_tol(model, alone[i]))
    # attending to the padding (the batch without its key mask) lands far outside that bound
    unmasked = model(x, t, c, **pids)
    assert float((unmasked[0, :lengths[0]] - alone[0]).abs().max()) > 100 * network_tol(model, alone[0])
    # the same sequences in another order and with a longer companion
    order = [2, 0, 3, 1]
    extra_seqs = [seqs[j] for j in order] + [torch.randn(40, D, dtype=dtype)]
    extra_ids = [ids[j] for j in order] + [random_ids(40, torch.Generator().manual_seed(9))]
    x2, mask2 = pad_ragged(extra_seqs)
    pids2 = {k: pad_ragged([i[k] for i in extra_ids])[0] for k in pids}
    t2 = torch.cat([t[order], torch.tensor([7])])
    c2 = torch.cat([c[order], torch.randn(1, H, dtype=dtype)])
    out2 = model(x2, t2, c2, key_mask=mask2, **pids2)
    for pos, j in enumerate(order):
        torch.testing.assert_close(out2[pos, :lengths[j]], batched[j, :lengths[j]], rtol=0,
                                   atol=network_tol(model, batched[j, :lengths[j]]))


def test_padding_values_never_change_valid_outputs():
    model = make_model(cross_attention=True)
    _, _, x, mask, ids, t, c = ragged_batch([3, 10, 7])
    ref = model(x, t, c, key_mask=mask, **ids)
    for fill in (1e6, float("nan"), float("inf"), -3.0):
        x2 = x.clone()
        x2[~mask] = fill
        ids2 = {k: v.masked_fill(~mask, 10_000) for k, v in ids.items()}  # garbage ids in padding too
        out = model(x2, t, c, key_mask=mask, **ids2)
        torch.testing.assert_close(out[mask], ref[mask], rtol=0, atol=0)
        assert bool(torch.isfinite(out).all())
        assert bool((out[~mask] == 0).all())


def test_output_finite_with_empty_sequence():
    model = make_model()
    _, _, x, mask, ids, t, c = ragged_batch([0, 4, 0])
    out = model(x, t, c, key_mask=mask, **ids)
    assert bool(torch.isfinite(out).all()) and out.shape == (3, 4, D)
    assert bool((out[0] == 0).all())
    out.sum().backward()  # padded rows must not poison the weight gradients with NaN
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------ conditioning
def test_inputs_reach_the_output():
    """Timestep, condition and every id field change the output (nothing silently ignored)."""
    model = make_model()
    _, _, x, mask, ids, t, c = ragged_batch([6])
    ref = model(x, t, c, **ids)
    assert not torch.allclose(model(x, t + 100, c, **ids), ref)
    assert not torch.allclose(model(x, t, c + 1, **ids), ref)
    for k in ids:
        changed = dict(ids, **{k: (ids[k] + 1) % 3})
        assert not torch.allclose(model(x, t, c, **changed), ref), k


def test_int_float_and_scalar_timesteps_agree():
    model = make_model()
    _, _, x, mask, ids, _, c = ragged_batch([5, 5])
    a = model(x, torch.tensor([30, 30]), c, **ids)
    b = model(x, torch.tensor([30.0, 30.0]), c, **ids)
    s = model(x, torch.tensor(30), c, **ids)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, s, rtol=0, atol=0)


def test_out_of_range_id_names_the_field():
    model = make_model()
    _, _, x, mask, ids, t, c = ragged_batch([4])
    bad = dict(ids, depth=torch.full((1, 4), SIZES["max_depth"]))
    with pytest.raises(LayoutMismatchError, match=r"'depth'.*\[3, 3\].*3 rows"):
        model(x, t, c, key_mask=mask, **bad)


def test_shape_errors_name_expected_and_actual():
    model = make_model()
    _, _, x, mask, ids, t, c = ragged_batch([4])
    with pytest.raises(ValueError, match=r"condition has shape \(1, 7\), expected \(1, 32\)"):
        model(x, t, torch.zeros(1, 7), **ids)
    with pytest.raises(ValueError, match="token_size=8"):
        model(torch.zeros(1, 4, 5), t, c, **ids)
    with pytest.raises(ValueError, match="'kind' has shape"):
        model(x, t, c, **dict(ids, kind=torch.zeros(3, dtype=torch.long)))


# -------------------------------------------------------------------------------------- training
def _nonzero_grads(model: WeightDiT, x, t, c, mask, ids, cond_seq=None) -> set[str]:
    model.zero_grad(set_to_none=True)
    out = model(x, t, c, key_mask=mask, cond_seq=cond_seq, **ids)
    out.pow(2).sum().add(out.sum()).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}


def test_gradient_flow_under_adaln_zero():
    """adaLN-Zero opens the network one layer per step.

    Step 0: everything upstream of the zero read-out gets zero gradient, so only the read-out
    learns. Step 1: the read-out is non-zero, so the token/position embeddings (reached through
    the identity blocks), every modulation layer and the cross-attention output projections
    learn; the gated attention/MLP weights, the cross-attention inputs (behind a zero output
    projection) and everything feeding the condition (timestep MLP, c: behind zero modulation
    weights) still get zero gradient. Step 2: every parameter learns.
    """
    torch.manual_seed(0)
    model = WeightDiT(**SIZES, hidden=H, depth=2, heads=4, cross_attention=True).train()
    _, _, x, mask, ids, t, c = ragged_batch([5, 8])
    c = c.clone().requires_grad_(True)
    cond_seq = torch.randn(2, 3, H)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = {n for n, _ in model.named_parameters()}

    step0 = _nonzero_grads(model, x, t, c, mask, ids, cond_seq)
    assert step0 == {"final_layer.linear.weight", "final_layer.linear.bias"}
    assert c.grad is None or bool((c.grad == 0).all())
    opt.step()

    step1 = _nonzero_grads(model, x, t, c, mask, ids, cond_seq)
    expected1 = {n for n in names if n.startswith(("token_embedder.", "pos_embedder.", "final_layer."))
                 or ".adaLN_modulation." in n or ".cross_attn.proj." in n}
    assert step1 == expected1, (sorted(step1 - expected1), sorted(expected1 - step1))
    assert bool((c.grad == 0).all())
    opt.step()

    step2 = _nonzero_grads(model, x, t, c, mask, ids, cond_seq)
    assert step2 == names, sorted(names - step2)
    assert bool(c.grad.abs().sum() > 0)


def test_config_round_trip():
    model = WeightDiT(**SIZES, hidden=H, depth=3, heads=4, mlp_ratio=2.0, cross_attention=True, attn_dropout=0.1)
    cfg = json.loads(json.dumps(model.config))
    clone = WeightDiT(**cfg)
    clone.load_state_dict(model.state_dict(), strict=True)
    assert clone.config == model.config
    assert cfg["depth"] == 3 and cfg["attn_dropout"] == 0.1 and cfg["dropout"] == 0.0


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not divisible by heads=5"):
        WeightDiT(**SIZES, hidden=32, heads=5)
    with pytest.raises(ValueError, match="'max_chunks' must be a positive integer, got 0"):
        WeightDiT(**dict(SIZES, max_chunks=0))


def test_attention_dropout_only_in_training():
    model = make_model(attn_dropout=0.5)
    _, _, x, mask, ids, t, c = ragged_batch([12])
    ev = [model(x, t, c, **ids) for _ in range(2)]
    torch.testing.assert_close(ev[0], ev[1], rtol=0, atol=0)
    model.train()
    tr = [model(x, t, c, **ids) for _ in range(2)]
    assert not torch.allclose(tr[0], tr[1])
