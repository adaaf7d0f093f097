"""Canonicalisation leaves the function unchanged and removes the LoRA gauge and permutations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests._tolerance import matmul_tol, network_tol, svd_factor_tol
from weightdiff.errors import CanonicalizationError
from weightdiff.weights.canonical import (
    AxisRef,
    align_to_reference,
    canonical_lora_pair,
    canonicalize,
    canonicalize_lora,
    permute_state_dict,
    random_permutations,
    sequential_permutation_spec,
)


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.LayerNorm(12), nn.ReLU(),
                         nn.Linear(12, 3))


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 10), nn.ReLU(),
                         nn.Linear(10, 4))


def _cnn1d(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(1, 5, 5, stride=2), nn.ReLU(), nn.Conv1d(5, 7, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(7 * 4, 3))


_NETS = {
    "mlp": (_mlp, (10,)),
    "cnn2d": (_cnn, (1, 8, 8)),
    "cnn1d": (_cnn1d, (1, 16)),
}


def _randomise_bn(net: nn.Module) -> None:
    """Non-trivial running statistics so a wrong permutation of them would show in eval outputs."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance over the floating-point tensors of two state dicts with the same keys."""
    return sum(float((v.double() - b[k].double()).pow(2).sum()) for k, v in a.items()
               if v.is_floating_point()) ** 0.5


def _outputs(build, sd, x):
    net = build(0)
    net.load_state_dict(sd, strict=True)
    net.eval()
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize("name", list(_NETS))
def test_permutation_preserves_function_and_alignment_undoes_it(name: str) -> None:
    build, in_shape = _NETS[name]
    net = build(0)
    _randomise_bn(net)
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    spec = sequential_permutation_spec(ref)
    x = torch.randn(7, *in_shape)
    perms = random_permutations(ref, spec, torch.Generator().manual_seed(1))
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = permute_state_dict(ref, spec, perms)
    assert list(permuted) == list(ref)
    assert _distance(ref, permuted) > 1.0
    want = _outputs(build, ref, x)
    # permuted hidden units reorder the next layer's sums: equal up to their rounding
    torch.testing.assert_close(_outputs(build, permuted, x), want, rtol=0, atol=network_tol(build(0), want))

    aligned = align_to_reference(permuted, ref, spec)
    assert _distance(ref, aligned) == 0.0  # the permutation is undone exactly: the same numbers in the same places
    torch.testing.assert_close(_outputs(build, aligned, x), want, rtol=0, atol=0)


def test_flatten_block_spec_for_cnn() -> None:
    spec = sequential_permutation_spec(_cnn(0).state_dict())
    assert AxisRef("6.weight", 1, 9) in spec.perms["P1"]
    assert {a.tensor for a in spec.perms["P1"]} >= {"3.weight", "3.bias", "3.running_mean", "3.running_var"}
    assert "P2" in spec.perms and "P3" not in spec.perms  # the last layer's outputs stay fixed
    explicit = sequential_permutation_spec(_cnn(0).state_dict(), flatten_spatial=9)
    assert explicit == spec
    with pytest.raises(CanonicalizationError, match="'6.weight' has 72 input features"):
        sequential_permutation_spec(_cnn(0).state_dict(), flatten_spatial=4)


@pytest.mark.parametrize("name", ["mlp", "cnn2d"])
def test_alignment_of_independent_nets_never_increases_distance(name: str) -> None:
    build, in_shape = _NETS[name]
    x = torch.randn(64, *in_shape)
    nets = []
    for seed in (0, 1):
        net = build(seed)
        # "Trained-ish": a few SGD steps towards a shared random teacher so the nets share structure.
        g = torch.Generator().manual_seed(5)
        teacher = torch.randn(int(torch.tensor(in_shape).prod()), net[-1].out_features, generator=g)
        y = x.flatten(1) @ teacher
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in range(20):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        nets.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    a, b = nets
    spec = sequential_permutation_spec(a)
    before = _distance(a, b)
    after = _distance(a, align_to_reference(b, a, spec))
    assert after <= before + 1e-9
    assert after < before  # random inits always leave some matching to gain
    net_b = build(0)
    net_b.load_state_dict(align_to_reference(b, a, spec))
    ref_b = build(0)
    ref_b.load_state_dict(b)
    for n in (net_b, ref_b):
        n.eval()
    want = ref_b(x)
    torch.testing.assert_close(net_b(x), want, rtol=0, atol=network_tol(build(0), want))


def test_non_sequential_state_dict_is_rejected() -> None:
    sd = {"a.weight": torch.randn(4, 3), "b.weight": torch.randn(2, 5)}
    with pytest.raises(CanonicalizationError, match="'b.weight' has 5 input features, expected 4"):
        sequential_permutation_spec(sd)


# -------------------------------------------------------------------------------- LoRA gauge
def _lora_pair(out_f: int, in_f: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)


def _product_tol(*pairs: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Tolerance between the float32 products ``B @ A`` of pairs ``(A, B)`` that are equal in exact arithmetic.

    Each product sums ``r`` terms whose magnitudes ``|B| @ |A|`` bound its rounding (cancellation
    included); rounding the factors to float32 adds ``u`` per factor, within the same bound.
    """
    r = pairs[0][0].shape[0]
    scale = max(float((b.abs() @ a.abs()).max()) for a, b in pairs)
    return matmul_tol(reduction=r, scale=scale, depth=2)


@pytest.mark.parametrize(("out_f", "in_f", "r"), [(12, 9, 4), (3, 20, 5), (20, 2, 4), (6, 6, 6)])
def test_lora_canonical_form_keeps_product_and_removes_gauge(out_f: int, in_f: int, r: int) -> None:
    a, b = _lora_pair(out_f, in_f, r, seed=0)
    a1, b1 = canonical_lora_pair(a, b)
    assert a1.shape == a.shape and b1.shape == b.shape and a1.dtype == a.dtype
    torch.testing.assert_close(b1 @ a1, b @ a, rtol=0, atol=_product_tol((a1, b1), (a, b)))
    # An arbitrary invertible change of gauge: A -> R A, B -> B R^-1.
    g = torch.Generator().manual_seed(3)
    rot = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    a2 = (rot @ a.double()).float()
    b2 = (b.double() @ torch.linalg.inv(rot)).float()
    assert not torch.allclose(a2, a, atol=1e-2)
    a3, b3 = canonical_lora_pair(a2, b2)
    # (A2, B2) were rounded to float32, which changes the product by E; the canonical factors are
    # the SVD factors of the product, so they move by at most what E moves them (Weyl, Wedin).
    product = b.double() @ a.double()
    change = float(torch.linalg.matrix_norm(b2.double() @ a2.double() - product, ord=2))
    sv = torch.linalg.svdvals(product)[:min(out_f, in_f, r)]
    tol = svd_factor_tol(sv, change, scale=max(float(a1.abs().max()), float(b1.abs().max())))
    torch.testing.assert_close(a3, a1, rtol=0, atol=tol)
    torch.testing.assert_close(b3, b1, rtol=0, atol=tol)
    assert float((1.01 * a1 - a1).abs().max()) > 10 * tol  # a 1 % slip of the gauge would show
    # Canonical factors are balanced (B'^T B' = A' A'^T = S) and signed: max-|.| entry of each B column > 0.
    gram_scale = max(float((b1.abs().T @ b1.abs()).max()), float((a1.abs() @ a1.abs().T).max()))
    torch.testing.assert_close(b1.T @ b1, a1 @ a1.T, rtol=0,
                               atol=matmul_tol(reduction=max(out_f, in_f), scale=gram_scale, depth=2))
    k = min(out_f, in_f, r)
    cols = b1[:, :k]
    assert bool((cols[cols.abs().argmax(0), torch.arange(k)] > 0).all())


def test_lora_zero_b_stays_zero_and_conv_pairs_flatten() -> None:
    a = torch.randn(4, 7)
    a1, b1 = canonical_lora_pair(a, torch.zeros(5, 4))
    assert torch.equal(b1, torch.zeros(5, 4)) and torch.equal(a1, torch.zeros(4, 7))
    conv_a, conv_b = torch.randn(3, 2, 3, 3), torch.randn(6, 3, 1, 1)
    ca, cb = canonical_lora_pair(conv_a, conv_b)
    assert ca.shape == conv_a.shape and cb.shape == conv_b.shape
    x = torch.randn(2, 2, 8, 8)

    def run(wa: torch.Tensor, wb: torch.Tensor, inputs: torch.Tensor = x) -> torch.Tensor:
        return nn.functional.conv2d(nn.functional.conv2d(inputs, wa, padding=1), wb)

    # two chained convs (A: 2 x 3 x 3 = 18 terms, B: 3); the chain on absolute values bounds the summed magnitudes
    scale = max(float(run(wa.abs(), wb.abs(), x.abs()).max()) for wa, wb in ((ca, cb), (conv_a, conv_b)))
    torch.testing.assert_close(run(ca, cb), run(conv_a, conv_b), rtol=0,
                               atol=matmul_tol(reduction=18, scale=scale, depth=2))
    with pytest.raises(CanonicalizationError, match=r"B of shape \(6, 3, 3, 3\)"):
        canonical_lora_pair(conv_a, torch.randn(6, 3, 3, 3))


def test_canonicalize_lora_state_dict_names_and_errors() -> None:
    sd = {}
    for layer in ("q", "v"):
        a, b = _lora_pair(8, 8, 2, seed=len(layer))
        sd[f"m.{layer}.lora_A.weight"] = a
        sd[f"m.{layer}.lora_B.weight"] = b
    sd["m.v.lora_magnitude_vector"] = torch.ones(8)
    out = canonicalize_lora(sd)
    assert list(out) == list(sd)
    assert torch.equal(out["m.v.lora_magnitude_vector"], sd["m.v.lora_magnitude_vector"])
    for layer in ("q", "v"):
        pairs = [(d[f"m.{layer}.lora_A.weight"], d[f"m.{layer}.lora_B.weight"]) for d in (out, sd)]
        torch.testing.assert_close(pairs[0][1] @ pairs[0][0], pairs[1][1] @ pairs[1][0], rtol=0,
                                   atol=_product_tol(*pairs))
    assert torch.equal(canonicalize(sd, "lora")["m.q.lora_A.weight"], out["m.q.lora_A.weight"])
    broken = dict(sd)
    del broken["m.q.lora_B.weight"]
    with pytest.raises(CanonicalizationError, match="'m.q.lora_A.weight' has no partner 'm.q.lora_B.weight'"):
        canonicalize_lora(broken)
    broken = dict(sd)
    del broken["m.v.lora_A.weight"]
    with pytest.raises(CanonicalizationError, match="m.v.lora_B.weight"):
        canonicalize_lora(broken)
