"""Baselines of the honest protocol that need no training: they all return batched params.

Every function returns weights ``{name: (S, *shape)}`` ready for
:func:`weightdiff.evaluate.weights.evaluate_params` (or, for the floor, predictions directly).

* zoo checkpoints of a task, and the *retrieval* baseline: the checkpoints of the training task
  nearest to the requested one, by **Euclidean (L2) distance between task codes** (for
  ``rotdigits`` the code is ``[cos A, sin A, ±1]``, so this is the nearest angle with the same flip);
* *average*: the mean checkpoint;
* *gaussian*: samples from a per-parameter Gaussian fitted to checkpoints;
* *noise-added*: checkpoints plus Gaussian noise at a fraction of each tensor's std;
* *polished*: weight sets after a few full-batch Adam steps of the task's cross-entropy on its
  training split (:func:`polished_params`), to show what continued training alone buys in
  accuracy and in distance from the zoo;
* *base without adapter*: the zero adapter (``B = 0`` gives ``ΔW = 0``: the frozen base alone);
* *floor*: the majority class of the training labels.

Averages and Gaussians are taken over *canonicalised* checkpoints (:func:`canonical_params`): for
LoRA the SVD gauge form of each ``(A, B)`` pair, for whole networks hidden units aligned to a
reference checkpoint. Without it, averaging independent runs mixes unrelated hidden units and the
baseline would be a straw man.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from weightdiff.targets import Target
from weightdiff.tasks import Task
from weightdiff.weights.canonical import (
    PermutationSpec, align_to_reference, canonicalize_lora, permute_state_dict, sequential_permutation_spec,
    weight_matching,
)

NOISE_SCALES = (0.01, 0.05, 0.1, 0.2, 0.5)


def stack_params(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack S state dicts with equal keys into ``{name: (S, *shape)}`` float32 (first dict's key order)."""
    if not state_dicts:
        raise ValueError("no state dicts to stack")
    keys = list(state_dicts[0])
    return {k: torch.stack([sd[k].float() for sd in state_dicts]) for k in keys}


def unstack(params: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample ``i`` of batched params (no S dimension)."""
    return {k: v[i] for k, v in params.items()}


def select(params: Mapping[str, torch.Tensor], index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``index`` of batched params."""
    idx = torch.as_tensor(list(index) if not isinstance(index, torch.Tensor) else index, dtype=torch.long)
    return {k: v.index_select(0, idx) for k, v in params.items()}


def sort_hidden_units(sd: Mapping[str, torch.Tensor], spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """Order every layer's hidden units by decreasing norm of their incoming weights (and bias).

    The norm of a unit's incoming weights does not depend on how the other layers are permuted,
    so the result is the same for every hidden-unit permutation of ``sd`` (barring exact ties).
    Weight matching (a local search) then starts from the same point for any permuted copy, which
    makes the alignment of a copy exactly the alignment of its original.
    """
    return permute_state_dict(sd, spec, hidden_unit_order(sd, spec))


def hidden_unit_order(sd: Mapping[str, torch.Tensor], spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """The permutations :func:`sort_hidden_units` applies: ``{perm name: LongTensor (n,)}``."""
    perms = {}
    for name, refs in spec.perms.items():
        first = refs[0]  # the producing layer's weight, units on axis 0 (sequential_permutation_spec)
        w = sd[first.tensor].movedim(first.axis, 0).flatten(1).double()
        norm = w.pow(2).sum(1)
        bias = first.tensor.rsplit(".", 1)[0] + ".bias"
        if bias in sd and sd[bias].dim() == 1 and sd[bias].shape[0] == norm.shape[0]:
            norm = norm + sd[bias].double().pow(2)
        perms[name] = torch.argsort(norm, descending=True, stable=True)
    return perms


def align_full(sd: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
               spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """``sd`` with hidden units sorted (:func:`sort_hidden_units`), then weight-matched to ``reference``."""
    return align_to_reference(sort_hidden_units(sd, spec), reference, spec)


def align_group(members: Sequence[Mapping[str, torch.Tensor]], reference: Mapping[str, torch.Tensor],
                spec: PermutationSpec) -> list[dict[str, torch.Tensor]]:
    """Checkpoints of one training run, all permuted as its last one aligns to ``reference``.

    The checkpoints of one run share their hidden units' order (they are one network at several
    times), so they must share one permutation too. Aligned one by one, weight matching (a local
    search) can put two nearly equal checkpoints into different orders, which turns the small
    distance between them into the distance between unrelated networks.
    """
    last = members[-1]
    order = hidden_unit_order(last, spec)
    match = weight_matching(reference, permute_state_dict(last, spec, order), spec)
    return [permute_state_dict(permute_state_dict(m, spec, order), spec, match) for m in members]


def canonical_params(params: Mapping[str, torch.Tensor], kind: Literal["full", "lora"],
                     reference: Mapping[str, torch.Tensor] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Remove weight-space symmetries from S checkpoints, keeping each one's function.

    Args:
        params: ``{name: (S, *shape)}``.
        kind: ``"lora"`` (canonical SVD gauge of every pair) or ``"full"`` (hidden units aligned
            by weight matching to ``reference``, by default the first checkpoint).

    Returns:
        ``(canonical params (S, *shape), reference)``; the reference is ``None`` for LoRA.
    """
    s = next(iter(params.values())).shape[0]
    if kind == "lora":
        return stack_params([canonicalize_lora(unstack(params, i)) for i in range(s)]), None
    ref = dict(reference) if reference is not None else unstack(params, 0)
    spec = sequential_permutation_spec(ref)
    return stack_params([align_full(unstack(params, i), ref, spec) for i in range(s)]), ref


def average_params(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean checkpoint ``{name: (1, *shape)}`` of ``{name: (S, *shape)}``."""
    return {k: v.mean(0, keepdim=True) for k, v in params.items()}


def gaussian_params(params: Mapping[str, torch.Tensor], num: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``num`` samples from independent per-parameter Gaussians fitted to ``{name: (S, *shape)}``.

    Each scalar weight gets the mean and the (unbiased) std of its S values; with S = 1 the std
    is 0 and every sample equals the checkpoint.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in params.items():
        mean = v.mean(0)
        std = v.std(0) if v.shape[0] > 1 else torch.zeros_like(mean)
        out[k] = mean + std * torch.randn((num, *mean.shape), generator=gen)
    return out


def noise_added_params(params: Mapping[str, torch.Tensor], scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Checkpoints plus Gaussian noise: tensor ``t`` of sample ``s`` gets ``N(0, (scale · std(t_s))²)``.

    ``std(t_s)`` is the standard deviation of that tensor's entries in that checkpoint, so the
    noise is relative to each tensor's own magnitude (a 1-element tensor uses ``|t_s|``).
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in params.items():
        flat = v.flatten(1)
        std = flat.std(1) if flat.shape[1] > 1 else flat.abs()[:, 0]        # (S,)
        std = std.view(-1, *([1] * (v.dim() - 1)))
        out[k] = v + scale * std * torch.randn(v.shape, generator=gen)
    return out


def polished_params(target: Target, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    steps: int, lr: float = 1e-3, chunk_size: int = 64) -> dict[str, torch.Tensor]:
    """``steps`` full-batch Adam steps of each weight set's own cross-entropy on ``(x, y)``.

    Each of the S sets is trained independently (Adam acts elementwise, and each set's loss reads
    only its own weights), in chunks of ``chunk_size`` sets at once.

    Args:
        target: the network the weights run in (whole networks or adapters).
        params: weights ``{name: (S, *shape)}``.
        x, y: the training inputs ``(N, ...)`` and class labels ``(N,)``.
        steps: Adam steps (0 returns copies of ``params``).
        lr: Adam's learning rate.

    Returns:
        The polished weights ``{name: (S, *shape)}`` float32, detached.
    """
    if steps < 0:
        raise ValueError(f"polished_params: steps must be >= 0, got {steps}")
    s = target.check(params, batched=True)
    parts = []
    for i in range(0, s, chunk_size):
        p = {k: v[i:i + chunk_size].detach().float().clone().requires_grad_(True) for k, v in params.items()}
        opt = torch.optim.Adam(p.values(), lr=lr)
        for _ in range(steps):
            logits = target.forward_batched(p, x)  # (s, N, C)
            # the sum over sets of each set's mean loss: every set gets its own mean loss's gradient
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]),
                                                     reduction="sum") / len(y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        parts.append({k: v.detach() for k, v in p.items()})
    return {k: torch.cat([part[k] for part in parts]) for k in params}


def zero_adapter(target: Target, num: int = 1) -> dict[str, torch.Tensor]:
    """All-zero adapter tensors ``(num, *shape)``: ``ΔW = scaling · B A = 0``, the base network alone.

    Raises:
        ValueError: ``target`` is not a LoRA target, or adapts ``modules_to_save`` (whose zero
            would not be the base).
    """
    if target.kind != "lora":
        raise ValueError("the base-without-adapter baseline needs a lora target")
    shapes = target.param_shapes()
    extra = [k for k in shapes if ".lora_A." not in k and ".lora_B." not in k]
    if extra:
        raise ValueError(f"adapter tensor '{extra[0]}' is not a LoRA factor; its zero is not the base network")
    return {k: torch.zeros((num, *s)) for k, s in shapes.items()}


def nearest_task(code: torch.Tensor, candidates: Mapping[str, torch.Tensor]) -> str:
    """Name of the candidate whose code ``(C,)`` is nearest to ``code`` in L2 (ties: first by name)."""
    if not candidates:
        raise ValueError("no candidate tasks for retrieval")
    names = sorted(candidates)
    codes = torch.stack([candidates[n].float() for n in names])       # (T, C)
    d = (codes - code.float()[None]).pow(2).sum(1)
    return names[int(torch.argmin(d))]


def floor_predictions(task: Task, split: str = "test") -> torch.Tensor:
    """Predictions ``(1, N)`` of the trivial predictor: the majority class of the training labels."""
    data = task.data()
    majority = int(torch.bincount(data.y_train, minlength=task.num_classes).argmax())
    x, _ = data.split(split)
    return torch.full((1, x.shape[0]), majority, dtype=torch.long)
