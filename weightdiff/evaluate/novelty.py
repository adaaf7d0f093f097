"""Novelty of models relative to a zoo: in function (wrong-prediction IoU) and in weights.

Generators of weights are known to memorise their training checkpoints, so an accurate sample
means little until it is shown to differ from the zoo. Two measures:

* **Wrong-set IoU** (function space). For each model, the set of test examples it gets wrong is
  compared with that of every zoo checkpoint by intersection-over-union, and the largest IoU is
  kept: 1 means the model errs exactly where some zoo checkpoint errs (a copy), lower is more
  novel. The IoU of two empty sets (two perfect models) is defined as 0 here: no shared error is
  evidence of copying, and a perfect model cannot be told apart from a copy by its errors anyway.
* **Nearest-zoo distance** (weight space). RMS distance to the nearest zoo checkpoint in the zoo's
  per-tensor z-scored space, after removing weight-space symmetries (:class:`ComparisonSpace`):
  hidden-unit permutations for whole networks (alignment to each training run of the zoo), the
  LoRA gauge for adapters (the merged update ``ΔW = scaling · B A`` of each module is compared). It is
  reported also as a ratio to :meth:`ComparisonSpace.spacing`, the median nearest-neighbour
  distance among the zoo's own checkpoints, so 1 means "as far from the zoo as zoo checkpoints are
  from each other".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch.func import vmap

from weightdiff.evaluate.baselines import align_full, align_group
from weightdiff.targets import Target
from weightdiff.weights.canonical import PermutationSpec, sequential_permutation_spec


def wrong_set_iou(preds: torch.Tensor, labels: torch.Tensor, zoo_preds: torch.Tensor,
                  exclude: Sequence[int | None] | None = None) -> torch.Tensor:
    """Largest IoU between each model's wrong-prediction set and any zoo checkpoint's.

    Args:
        preds: predicted labels ``(S, N)`` of the models.
        labels: true labels ``(N,)``.
        zoo_preds: predicted labels ``(Z, N)`` of the zoo checkpoints on the same inputs.
        exclude: per model, the index of a zoo checkpoint not to compare with (the model itself,
            for zoo rows), or ``None``. Length S.

    Returns:
        ``(S,)`` float32 in [0, 1]; NaN for a model with no zoo checkpoint left to compare with.
        IoU(∅, ∅) = 0 (see the module docstring).

    Example: labels ``[0, 0, 0, 0]``, a model predicting ``[1, 1, 0, 0]`` (wrong on {0, 1}) and a
    zoo checkpoint predicting ``[0, 1, 1, 0]`` (wrong on {1, 2}) give IoU 1/3.
    """
    wrong = (preds != labels[None]).float()            # (S, N)
    zoo_wrong = (zoo_preds != labels[None]).float()    # (Z, N)
    inter = wrong @ zoo_wrong.T                        # (S, Z)
    union = wrong.sum(1, keepdim=True) + zoo_wrong.sum(1)[None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))
    if exclude is not None:
        if len(exclude) != preds.shape[0]:
            raise ValueError(f"exclude has {len(exclude)} entries, expected one per model ({preds.shape[0]})")
        for i, j in enumerate(exclude):
            if j is not None:
                iou[i, j] = float("-inf")
    if iou.shape[1] == 0:
        return torch.full((preds.shape[0],), float("nan"))
    best = iou.max(1).values
    return torch.where(torch.isinf(best), torch.full_like(best, float("nan")), best)


class ComparisonSpace:
    """The symmetry-free, z-scored space in which weight-space distances to the zoo are measured.

    LoRA: each adapted module is represented by its merged update ``ΔW = scaling · B A`` (gauge
    invariant, exact), divided by that module's standard deviation of ΔW over the zoo.

    Full networks: the distance to a zoo checkpoint is taken after permuting the model's hidden
    units to match it (:func:`~weightdiff.evaluate.baselines.align_full`: sort units, then
    weight matching), each tensor divided by its standard deviation over the zoo. Any alignment
    gives an upper bound of the true minimum over permutations, and the smallest found is kept:

    * every model and zoo checkpoint aligned to one reference checkpoint (cheap, all pairs);
    * with ``groups`` (the training run of each zoo checkpoint): the checkpoints of a run share
      one permutation (:func:`~weightdiff.evaluate.baselines.align_group`), and each model is
      aligned to every run's last checkpoint and compared with all of that run's checkpoints.
      Weight matching towards an unrelated reference is a local search that can send two
      checkpoints of one run to different orders, so without groups a run's checkpoints can look
      as far apart as independent networks (measured on the MNIST-1D zoo: 1.21 where they are
      0.17 apart), and a model next to one of them can be reported far from all;
    * without groups: for the ``refine`` nearest candidates of each model, the model aligned to
      that candidate directly.

    ``align=False`` measures full networks as they are: for a zoo whose runs all fine-tune one
    parent, whose hidden units therefore correspond already (and whose million-weight layers would
    make weight matching of every pair take hours).

    Args:
        target: the target network.
        zoo_params: the zoo's checkpoints ``{name: (Z, *shape)}`` that define the space.
        refine: candidates re-aligned pairwise per model (full networks without groups).
        align: (full networks) permute hidden units before measuring.
        groups: (full networks) the training run of each zoo checkpoint, in order; a run's last
            checkpoint is the one its others are aligned with.
    """

    def __init__(self, target: Target, zoo_params: Mapping[str, torch.Tensor], refine: int = 5,
                 align: bool = True, groups: Sequence[str] | None = None) -> None:
        self.target = target
        self.kind = target.kind
        self.align = align
        self.zoo_params = {k: v.float() for k, v in zoo_params.items()}
        z = next(iter(self.zoo_params.values())).shape[0]
        if groups is not None and len(groups) != z:
            raise ValueError(f"groups has {len(groups)} entries, expected one per zoo checkpoint ({z})")
        self.groups: dict[str, list[int]] = {}
        if self.kind == "full" and align and groups is not None:
            for i, g in enumerate(groups):
                self.groups.setdefault(g, []).append(i)
        self.refine = refine if align and not self.groups else 0
        self.spec: PermutationSpec | None = None
        self.reference: dict[str, torch.Tensor] | None = None
        self._group_refs: dict[str, dict[str, torch.Tensor]] = {}
        self._zoo_rows: dict[bytes, int] = {}
        self._zoo_distances: dict[int, torch.Tensor] = {}
        if self.kind == "full" and align:
            first = {k: v[0] for k, v in self.zoo_params.items()}
            self.spec = sequential_permutation_spec(first)
            self.reference = align_full(first, first, self.spec)
        # Base parameters an adapter changes: adapted weights (ΔW) and modules_to_save tensors.
        self._lora_names = target.adapted_names() if self.kind == "lora" else []
        if self.groups:
            assert self.spec is not None and self.reference is not None
            aligned: list[dict[str, torch.Tensor] | None] = [None] * z
            for g, members in self.groups.items():
                out = align_group([{k: v[i] for k, v in self.zoo_params.items()} for i in members],
                                  self.reference, self.spec)
                for i, a in zip(members, out):
                    aligned[i] = a
                self._group_refs[g] = out[-1]
            raw = {k: torch.stack([a[k] for a in aligned]) for k in self.zoo_params}  # type: ignore[index]
            self._zoo_rows = {self._key({k: v[i] for k, v in self.zoo_params.items()}): i for i in range(z)}
        else:
            raw = self._raw(self.zoo_params)
        self.scale = {k: v.std().clamp_min(1e-12) for k, v in raw.items()}
        self.points = self._zscore(raw)                                           # (Z, P')

    def _raw(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Symmetry-free tensors ``{name: (S, ...)}`` before z-scoring."""
        if self.kind == "lora":
            merged = vmap(self.target.merged_params)(dict(params))  # base name -> (S, *shape)
            base = dict(self.target.module.named_parameters())
            return {name: merged[name] - base[name] for name in self._lora_names}
        if not self.align:
            return {k: v.float() for k, v in params.items()}
        assert self.reference is not None
        return self._aligned(params, [self.reference] * next(iter(params.values())).shape[0])

    def _aligned(self, params: Mapping[str, torch.Tensor], refs: list[Mapping[str, torch.Tensor]]
                 ) -> dict[str, torch.Tensor]:
        assert self.spec is not None
        out = [align_full({k: v[i] for k, v in params.items()}, ref, self.spec) for i, ref in enumerate(refs)]
        return {k: torch.stack([a[k] for a in out]) for k in params}

    def _zscore(self, raw: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([(v / self.scale[k]).flatten(1) for k, v in raw.items()], dim=1).float()

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weight sets ``{name: (S, *shape)}`` → points ``(S, P')`` (full networks: reference-aligned)."""
        return self._zscore(self._raw(params))

    def nearest_distance(self, params: Mapping[str, torch.Tensor],
                         exclude: Sequence[int | None] | None = None) -> torch.Tensor:
        """RMS distance ``(S,)`` from each model to its nearest zoo checkpoint (see the class docstring)."""
        return self.nearest(params, exclude)[0]

    @staticmethod
    def _key(sd: Mapping[str, torch.Tensor]) -> bytes:
        return b"".join(v.detach().float().contiguous().numpy().tobytes() for v in sd.values())

    def _group_distances(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(S, Z)`` distances, each model aligned to every run (see the class docstring)."""
        assert self.spec is not None
        s = next(iter(params.values())).shape[0]
        d = torch.empty(s, self.points.shape[0], dtype=torch.float64)
        for i in range(s):
            sd = {k: v[i].float() for k, v in params.items()}
            key = self._key(sd)
            row = self._zoo_rows.get(key)
            if row is not None and row in self._zoo_distances:   # a zoo checkpoint, measured before
                d[i] = self._zoo_distances[row]
                continue
            for g, members in self.groups.items():
                a = self._zscore({k: v[None] for k, v in align_full(sd, self._group_refs[g], self.spec).items()})
                d[i, members] = ((self.points[members].double() - a.double()).norm(dim=1)
                                 / self.points.shape[1] ** 0.5)
            if row is not None:
                self._zoo_distances[row] = d[i].clone()
        return d

    def nearest(self, params: Mapping[str, torch.Tensor],
                exclude: Sequence[int | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distance (S,), index (S,))`` of each model's nearest zoo checkpoint (index -1 when none)."""
        pts = self(params)
        d = torch.cdist(pts.double(), self.points.double()) / pts.shape[1] ** 0.5    # (S, Z)
        if self.groups:
            d = torch.minimum(d, self._group_distances(params))
        if exclude is not None:
            for i, j in enumerate(exclude):
                if j is not None:
                    d[i, j] = float("inf")
        if self.kind == "full" and self.refine > 0:
            k = min(self.refine, d.shape[1])
            cand = d.topk(k, dim=1, largest=False).indices                            # (S, k)
            for c in range(k):
                js = cand[:, c].tolist()
                ok = [i for i, j in enumerate(js) if math.isfinite(float(d[i, j]))]
                if not ok:
                    continue
                sub = {n: v[ok] for n, v in params.items()}
                refs = [{n: v[js[i]] for n, v in self.zoo_params.items()} for i in ok]
                aligned = self._zscore(self._aligned(sub, refs))
                ref_pts = self._zscore({n: torch.stack([r[n] for r in refs]) for n in self.zoo_params})
                pair = (aligned.double() - ref_pts.double()).norm(dim=1) / pts.shape[1] ** 0.5
                for row, i in enumerate(ok):
                    d[i, js[i]] = min(float(d[i, js[i]]), float(pair[row]))
        if d.shape[1] == 0:
            return torch.full((pts.shape[0],), float("nan")), torch.full((pts.shape[0],), -1, dtype=torch.long)
        best, index = d.min(1)
        missing = torch.isinf(best)
        return (torch.where(missing, torch.full_like(best, float("nan")), best).float(),
                torch.where(missing, torch.full_like(index, -1), index))

    def within_group_spacing(self, groups: Sequence[str]) -> float:
        """Median over zoo checkpoints of the RMS distance to the nearest checkpoint of the same group
        (e.g. the same training run: the scale of variation inside one basin); NaN without pairs."""
        d = torch.cdist(self.points.double(), self.points.double()) / self.points.shape[1] ** 0.5
        same = torch.tensor([[a == b for b in groups] for a in groups])
        d = d.masked_fill(~same | torch.eye(len(groups), dtype=torch.bool), float("inf")).min(1).values
        d = d[torch.isfinite(d)]
        return float(d.quantile(0.5)) if len(d) else float("nan")

    def spacing(self) -> float:
        """Median over zoo checkpoints of the distance to their nearest other checkpoint."""
        z = self.points.shape[0]
        if z < 2:
            return float("nan")
        return float(self.nearest_distance(self.zoo_params, exclude=list(range(z))).double().quantile(0.5))
