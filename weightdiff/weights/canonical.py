"""Function-preserving canonicalisation of weights, applied before tokenising.

Two symmetries make many weight vectors compute the same function; a generator trained on raw
checkpoints must then model every copy. Both are removed here without changing the function:

* **LoRA gauge.** ``B A = (B R^-1)(R A)`` for any invertible ``R (r, r)``. Each pair is replaced by
  the canonical SVD form of its product, ``B A = U S V^T -> B' = U sqrt(S)``, ``A' = sqrt(S) V^T``,
  with singular values in descending order and each column of ``U`` signed so that its
  largest-magnitude entry is positive. Any two gauge-equivalent adapters map to the same tensors
  (up to float rounding, provided their singular values are distinct).
* **Hidden-unit permutations.** Permuting the hidden units of a layer (rows of its weight and
  bias, columns of the next layer's weight) leaves an MLP/CNN's function unchanged. Checkpoints
  are aligned to a reference by weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023,
  Alg. 1): coordinate descent over the permutations, each step a linear assignment problem.

Permutation semantics: ``perm`` of a hidden layer maps new unit ``i`` to old unit ``perm[i]``,
i.e. every axis listed for that permutation is re-indexed as ``new[..., i, ...] = old[..., perm[i], ...]``.
A flatten from ``(C, H, W)`` to ``C*H*W`` features is channel-major, so a channel permutation acts
on the next linear layer's input axis in blocks of ``H*W`` (``AxisRef.block``). Example: 2 channels,
2 spatial positions, ``perm = [1, 0]`` -> input features ``[2, 3, 0, 1]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from weightdiff.errors import CanonicalizationError
from weightdiff.weights.layout import module_of

logger = logging.getLogger(__name__)

_LORA_A_PARTS = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}


# ------------------------------------------------------------------------------ LoRA gauge
def canonical_lora_pair(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical SVD form of one LoRA pair.

    Args:
        lora_a: ``A (r, in)``, or a conv ``A (r, in, *kernel)``, or an embedding ``A (r, num_embeddings)``.
        lora_b: ``B (out, r)``, or a conv ``B (out, r, 1, ..., 1)``.

    Returns:
        ``(A', B')`` with the input shapes and dtypes and ``B' A' = B A`` (computed in float64).

    The product of a conv LoRA is ``B.reshape(out, r) @ A.reshape(r, -1)`` (a 1x1 ``B`` after a
    ``k x k`` ``A`` is one ``k x k`` conv), so conv pairs are handled by flattening.
    """
    r = lora_a.shape[0]
    if lora_b.dim() < 2 or lora_b.shape[1] != r or any(s != 1 for s in lora_b.shape[2:]):
        raise CanonicalizationError(f"LoRA B of shape {tuple(lora_b.shape)} does not pair with A of shape "
                                    f"{tuple(lora_a.shape)}: expected B (out, {r}) or (out, {r}, 1, ...)")
    a = lora_a.detach().reshape(r, -1).to(torch.float64)
    b = lora_b.detach().reshape(lora_b.shape[0], r).to(torch.float64)
    # SVD of the (out, in) product through two thin QRs and an SVD of a small core:
    # B = Qb Rb, A^T = Qa Ra  =>  B A = Qb (Rb Ra^T) Qa^T, and only the core is decomposed.
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    u = qb @ uc  # (out, k)
    v = qa @ vch.T  # (in, k)
    # Deterministic signs: the largest-|.| entry of each column of U is positive (V flips with it).
    rows = u.abs().argmax(dim=0)
    sign = torch.sign(u[rows, torch.arange(u.shape[1])])
    sign[sign == 0] = 1
    u, v = u * sign, v * sign
    root = s.sqrt()
    b_new = torch.zeros_like(b)
    a_new = torch.zeros_like(a)
    k = s.shape[0]  # min(out, in, r); a rank above that carries nothing and stays zero
    b_new[:, :k] = u * root
    a_new[:k] = (v * root).T
    return a_new.reshape(lora_a.shape).to(lora_a.dtype), b_new.reshape(lora_b.shape).to(lora_b.dtype)


def _lora_partner(name: str) -> str | None:
    """``"x.lora_A.weight" -> "x.lora_B.weight"``; None when ``name`` is not a LoRA A factor."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _LORA_A_PARTS:
            return ".".join([*parts[:i], _LORA_A_PARTS[parts[i]], *parts[i + 1:]])
    return None


def canonicalize_lora(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every LoRA pair of a (PEFT) state dict by its canonical SVD form.

    Pairs are found by name: ``...lora_A.weight`` with ``...lora_B.weight`` (also with an adapter
    name, ``...lora_A.default.weight``, and ``lora_embedding_A``/``_B``). Other tensors (e.g. DoRA
    magnitudes) are kept; the key order is kept.

    Raises:
        CanonicalizationError: an A without its B (or B without A), or shapes that do not pair.
    """
    out = dict(sd)
    paired: set[str] = set()
    for name in sd:
        partner = _lora_partner(name)
        if partner is None:
            continue
        if partner not in sd:
            raise CanonicalizationError(f"LoRA factor '{name}' has no partner '{partner}' in the state dict")
        try:
            out[name], out[partner] = canonical_lora_pair(sd[name], sd[partner])
        except CanonicalizationError as exc:
            raise CanonicalizationError(f"'{name}' / '{partner}': {exc}") from None
        paired.add(partner)
    lone = [k for k in sd if any(p in k.split(".") for p in _LORA_A_PARTS.values()) and k not in paired]
    if lone:
        raise CanonicalizationError(f"LoRA B factor(s) without an A factor: {lone}")
    return out


# --------------------------------------------------------------------- permutation specs
@dataclass(frozen=True)
class AxisRef:
    """Axis ``axis`` of tensor ``tensor`` is indexed by a permutation, in blocks of ``block``."""

    tensor: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """Which axes of which tensors share each hidden-unit permutation.

    ``perms[name]`` lists every axis that permutation ``name`` re-indexes; they must all have size
    ``block * n`` for one unit count ``n`` per permutation.
    """

    perms: dict[str, tuple[AxisRef, ...]] = field(default_factory=dict)

    def size(self, name: str, sd: Mapping[str, torch.Tensor]) -> int:
        """Number of units permuted by ``name``."""
        ref = self.perms[name][0]
        return sd[ref.tensor].shape[ref.axis] // ref.block

    def axes_of(self, tensor: str) -> list[tuple[str, AxisRef]]:
        """``(perm name, axis ref)`` for every permuted axis of ``tensor``."""
        return [(p, a) for p, refs in self.perms.items() for a in refs if a.tensor == tensor]


def _block_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Unit permutation ``(n,)`` -> entry permutation ``(n * block,)`` (channel-major blocks)."""
    return (perm[:, None] * block + torch.arange(block, device=perm.device)[None, :]).reshape(-1)


def _permute_tensor(t: torch.Tensor, axes: list[tuple[str, AxisRef]], perms: Mapping[str, torch.Tensor],
                    skip_axis: int | None = None) -> torch.Tensor:
    for p, ref in axes:
        if ref.axis != skip_axis:
            t = t.index_select(ref.axis, _block_index(perms[p].to(t.device), ref.block))
    return t


def permute_state_dict(sd: Mapping[str, torch.Tensor], spec: PermutationSpec,
                       perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply ``perms`` (``{name: LongTensor (n,)}``) to every axis ``spec`` lists; key order kept."""
    return {k: _permute_tensor(v, spec.axes_of(k), perms) if spec.axes_of(k) else v for k, v in sd.items()}


def random_permutations(sd: Mapping[str, torch.Tensor], spec: PermutationSpec,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One uniformly random permutation per entry of ``spec``."""
    return {p: torch.randperm(spec.size(p, sd), generator=generator) for p in spec.perms}


def sequential_permutation_spec(sd: Mapping[str, torch.Tensor],
                                flatten_spatial: int | None = None) -> PermutationSpec:
    """Permutation spec of a plain sequential stack of Linear / Conv1d / Conv2d layers.

    Layers are the modules (in key order) with a ``weight`` of 2+ dims; the output units of every
    layer but the last get a permutation ``P{k}`` (axis 0 of its weight and bias, and of the 1-D
    tensors of any following norm layer: weight, bias, running_mean, running_var), which also
    indexes axis 1 of the next layer's weight. A linear layer after a conv sees the flattened
    ``(C, *spatial)`` output, so the channel permutation acts in blocks of ``prod(spatial)``.

    Args:
        sd: the state dict (e.g. of ``nn.Sequential(Conv2d, ReLU, Flatten, Linear, ...)``).
        flatten_spatial: spatial positions per channel at the flatten; inferred as
            ``in_features // channels`` when None.

    Raises:
        CanonicalizationError: a layer's input size does not match the previous layer's output.
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        modules.setdefault(module_of(k), {})[k.rsplit(".", 1)[-1]] = v
    layers = [m for m, ts in modules.items() if "weight" in ts and ts["weight"].dim() >= 2]
    if len(layers) < 2:
        raise CanonicalizationError(f"a sequential stack needs at least 2 layers with a weight, found {layers}")
    perms: dict[str, list[AxisRef]] = {}
    current: str | None = None  # permutation of the running hidden units
    width = 0
    for i, mod in enumerate(modules):
        ts = modules[mod]
        if mod not in layers:
            # A norm layer (1-D tensors the size of the running hidden units) follows the permutation.
            if current is not None:
                for leaf, t in ts.items():
                    if t.dim() == 1 and t.shape[0] == width:
                        perms[current].append(AxisRef(f"{mod}.{leaf}", 0))
            continue
        w = ts["weight"]
        li = layers.index(mod)
        if current is not None:
            prev_w = modules[layers[li - 1]]["weight"]
            block = 1
            if w.dim() == 2 and prev_w.dim() >= 3:
                block = flatten_spatial if flatten_spatial is not None else w.shape[1] // max(width, 1)
            if w.shape[1] != width * block:
                raise CanonicalizationError(
                    f"'{mod}.weight' has {w.shape[1]} input features, expected {width} (outputs of "
                    f"'{layers[li - 1]}') x {block} spatial positions; not a plain sequential stack")
            perms[current].append(AxisRef(f"{mod}.weight", 1, block))
        if li == len(layers) - 1:
            current = None
            continue
        current = f"P{li}"
        width = w.shape[0]
        perms[current] = [AxisRef(f"{mod}.weight", 0)]
        if "bias" in ts:
            perms[current].append(AxisRef(f"{mod}.bias", 0))
    return PermutationSpec({p: tuple(refs) for p, refs in perms.items()})


# ------------------------------------------------------------------------- weight matching
def weight_matching(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                    spec: PermutationSpec, max_sweeps: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    """Permutations that bring ``other`` closest (in L2) to ``reference``.

    Git Re-Basin weight matching (Ainsworth et al. 2023, Alg. 1): maximise
    ``sum_l <W_l^ref, P_l W_l^other P_{l-1}^T>`` by coordinate descent; with all other permutations
    fixed, the best ``P_l`` solves a linear assignment problem on ``C = sum_axes W_ref W_other^T``.
    Sweeps visit the permutations in a seeded random order until a sweep improves nothing.

    Returns:
        ``{perm name: LongTensor (n,)}`` for :func:`permute_state_dict` applied to ``other``.
    """
    ref64 = {k: v.detach().to(torch.float64) for k, v in reference.items() if v.is_floating_point()}
    oth64 = {k: v.detach().to(torch.float64) for k, v in other.items() if v.is_floating_point()}
    perms = {p: torch.arange(spec.size(p, reference)) for p in spec.perms}
    rng = np.random.default_rng(seed)
    names = list(spec.perms)
    for _ in range(max_sweeps):
        improved = False
        for p in rng.permutation(names):
            n = perms[p].shape[0]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for ref in spec.perms[p]:
                if ref.tensor not in ref64:
                    continue
                w_a = ref64[ref.tensor].movedim(ref.axis, 0).reshape(n, -1)
                w_b = _permute_tensor(oth64[ref.tensor], spec.axes_of(ref.tensor), perms, skip_axis=ref.axis)
                w_b = w_b.movedim(ref.axis, 0).reshape(n, -1)
                cost += w_a @ w_b.T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            old_score = cost[torch.arange(n), perms[p]].sum()
            new_score = cost[torch.arange(n), new].sum()
            # A strict, scale-aware margin: ties between equally good assignments must not loop.
            if new_score > old_score + 1e-12 * max(1.0, float(old_score.abs())):
                perms[p] = new
                improved = True
        if not improved:
            break
    else:
        logger.info("weight matching stopped after max_sweeps=%d sweeps without converging", max_sweeps)
    return perms


def align_to_reference(sd: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                       spec: PermutationSpec, **kwargs: int) -> dict[str, torch.Tensor]:
    """``sd`` with its hidden units permuted to match ``reference`` (same function as ``sd``)."""
    return permute_state_dict(sd, spec, weight_matching(reference, sd, spec, **kwargs))


def canonicalize(sd: Mapping[str, torch.Tensor], kind: Literal["full", "lora"],
                 reference: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Canonical form of one checkpoint of a zoo of ``kind``; the network's function is unchanged.

    ``"lora"``: every (A, B) pair in the SVD gauge (:func:`canonicalize_lora`). ``"full"``:
    hidden units permuted to match ``reference`` by weight matching (unchanged without one).
    """
    if kind == "lora":
        return canonicalize_lora(sd)
    if reference is None:
        return dict(sd)
    return align_to_reference(sd, reference, sequential_permutation_spec(reference))


class RunAlignment:
    """Canonical forms of a zoo's entries in which every checkpoint of one training run shares a
    permutation: the one that aligns the run's last checkpoint (in ``rows`` order) to ``reference``.

    The checkpoints of a run are one network at several times, with its hidden units in one order.
    Aligned one by one to an unrelated reference, weight matching (a local search) can put two of
    them into different orders, and a run's four late checkpoints then look as far apart as
    independent networks (measured on the MNIST-1D zoo: 1.21 z-scored RMS where they are 0.17).

    Args:
        rows: the zoo's entries (``id``, ``run_id``), in order.
        load: entry id -> its state dict.
        reference: the state dict every run is aligned to.
    """

    def __init__(self, rows: Sequence[Mapping[str, object]], load: Callable[[str], Mapping[str, torch.Tensor]],
                 reference: Mapping[str, torch.Tensor]) -> None:
        self.reference = dict(reference)
        self.spec = sequential_permutation_spec(self.reference)
        self._load = load
        self._last = {str(r["run_id"]): str(r["id"]) for r in rows}   # the last entry of each run
        self._perms: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, sd: Mapping[str, torch.Tensor], run_id: str) -> dict[str, torch.Tensor]:
        """``sd`` (a checkpoint of run ``run_id``) permuted as its run's last checkpoint aligns."""
        if run_id not in self._last:
            raise CanonicalizationError(f"run '{run_id}' has no entry among the rows this alignment was built on")
        if run_id not in self._perms:
            self._perms[run_id] = weight_matching(self.reference, self._load(self._last[run_id]), self.spec)
        return permute_state_dict(sd, self.spec, self._perms[run_id])
