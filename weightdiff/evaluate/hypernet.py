"""Deterministic hypernetwork baselines: condition → weights by ridge regression or an MLP.

Both map a task's condition vector (its task code, optionally text features) to the flattened,
per-tensor normalised weights of a checkpoint (:class:`ParamCodec`), fitted on the zoo's
training checkpoints (canonicalised like the generator's inputs: see
:func:`weightdiff.evaluate.baselines.canonical_params`). They answer "does a diffusion model
beat a plain regression from condition to weights?".

* :class:`RidgeHypernet`: closed-form ridge regression (scikit-learn), regularisation chosen by
  grouped (leave-tasks-out) cross-validation on the training tasks.
* :class:`MLPHypernet`: a Text-to-LoRA-style MLP (Charakorn et al. 2025) trained with the
  generator's two losses: MSE to the zoo weights in normalised space, plus the task's
  cross-entropy of the predicted weights run inside the target network (the functional loss).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_squared_error
from sklearn.model_selection import PredefinedSplit, cross_val_predict
from torch import nn
from tqdm.auto import tqdm

from weightdiff.targets import Target

log = logging.getLogger(__name__)

#: Above this many head weights (hidden · P), a hypernetwork of one distinct training condition is
#: trained as its one output vector (:class:`MLPHypernet` ``constant``): a 1.1M-weight target's
#: 288M-weight head took 4.4 s per Adam step on one core, 2.5 h for the default 2,000 steps.
MAX_HEAD_WEIGHTS = 64_000_000

DEFAULT_ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)


class ParamCodec:
    """Flatten weight sets ``{name: (S, *shape)}`` to ``(S, P)`` and back, normalised per tensor.

    Normalisation: each tensor is shifted by its mean and divided by its standard deviation, both
    scalars over all entries of that tensor in the fitting checkpoints (as the tokenizer does), so
    every tensor weighs alike in a squared loss. Example: shapes ``{"w": (2, 3), "b": (2,)}`` give
    ``P = 8``, with ``w`` in columns 0–5 (row-major) and ``b`` in columns 6–7.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], mean: Mapping[str, float] | None = None,
                 std: Mapping[str, float] | None = None) -> None:
        self.shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        self.sizes = {k: math.prod(s) for k, s in self.shapes.items()}
        self.mean = {k: float(mean[k]) if mean else 0.0 for k in self.shapes}
        self.std = {k: float(std[k]) if std else 1.0 for k in self.shapes}

    @classmethod
    def fit(cls, params: Mapping[str, torch.Tensor]) -> ParamCodec:
        """Codec with statistics of ``params`` ``{name: (Z, *shape)}``."""
        shapes = {k: tuple(v.shape[1:]) for k, v in params.items()}
        mean = {k: float(v.double().mean()) for k, v in params.items()}
        std = {k: max(float(v.double().std()) if v.numel() > 1 else 1.0, 1e-8) for k, v in params.items()}
        return cls(shapes, mean, std)

    @property
    def num_params(self) -> int:
        return sum(self.sizes.values())

    def flatten(self, params: Mapping[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """``{name: (S, *shape)}`` → ``(S, P)``; differentiable."""
        parts = []
        for k in self.shapes:
            v = params[k].flatten(1).float()
            parts.append((v - self.mean[k]) / self.std[k] if normalize else v)
        return torch.cat(parts, dim=1)

    def unflatten(self, flat: torch.Tensor, normalized: bool = True) -> dict[str, torch.Tensor]:
        """``(S, P)`` → ``{name: (S, *shape)}``; differentiable."""
        out, offset = {}, 0
        for k, shape in self.shapes.items():
            v = flat[:, offset:offset + self.sizes[k]]
            offset += self.sizes[k]
            if normalized:
                v = v * self.std[k] + self.mean[k]
            out[k] = v.reshape(flat.shape[0], *shape)
        if offset != flat.shape[1]:
            raise ValueError(f"flat weights have {flat.shape[1]} columns, expected {offset}")
        return out


class Standardizer:
    """Feature standardisation ``(x - mean) / std`` fitted on training conditions ``(n, C)``.

    Constant features (std 0, e.g. the one-value code of a single-task zoo) are only centred.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.mean = x.double().mean(0)
        std = x.double().std(0) if x.shape[0] > 1 else torch.ones(x.shape[1], dtype=torch.float64)
        self.std = torch.where(std > 1e-12, std, torch.ones_like(std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) / self.std


class RidgeHypernet:
    """Ridge regression from conditions ``(n, C)`` to flat weights ``(n, P)``, with an intercept.

    ``W = (X^T X + α I)^-1 X^T (Y - ȳ)`` on standardised, centred features (closed form by
    :class:`sklearn.linear_model.Ridge`; the intercept is not penalised). ``α`` is chosen from
    ``alphas`` by K-fold cross-validation with whole tasks held out per fold (``groups``; tasks are
    dealt to folds in a seeded random order), scored by the mean squared error over all held-out
    rows; with fewer than two groups the smallest ``α`` is used.

    Args:
        alphas: candidate regularisation strengths.
        folds: number of cross-validation folds (capped at the number of groups).

    Attributes (after :meth:`fit`):
        alpha_: the chosen ``α``.
        cv_mse_: ``{α: cross-validated MSE}`` (empty when no cross-validation ran).
        w_, b_: ``(C, P)`` and ``(P,)`` float64 coefficients on the standardised features.
    """

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, folds: int = 5) -> None:
        self.alphas = tuple(float(a) for a in alphas)
        self.folds = folds
        self.alpha_: float | None = None
        self.cv_mse_: dict[float, float] = {}

    def _task_folds(self, groups: Sequence[str], k: int) -> PredefinedSplit:
        """Each row's fold: the sorted task names in a seeded random order, dealt round-robin."""
        names = sorted(set(groups))
        perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(0)).tolist()
        fold_of = {names[j]: i % k for i, j in enumerate(perm)}
        return PredefinedSplit([fold_of[g] for g in groups])

    def fit(self, features: torch.Tensor, targets: torch.Tensor, groups: Sequence[str] | None = None) -> RidgeHypernet:
        """Fit on ``features (n, C)`` and ``targets (n, P)``; ``groups`` names each row's task."""
        self.scaler = Standardizer(features)
        x, y = self.scaler(features).cpu().numpy(), targets.detach().double().cpu().numpy()
        groups = list(groups) if groups is not None else [str(i) for i in range(x.shape[0])]
        k = min(self.folds, len(set(groups)))
        if k < 2 or len(self.alphas) == 1:
            self.alpha_ = min(self.alphas)
        else:
            folds = self._task_folds(groups, k)
            for alpha in self.alphas:
                held_out = cross_val_predict(Ridge(alpha=alpha, solver="cholesky"), x, y, cv=folds)
                self.cv_mse_[alpha] = float(mean_squared_error(y, held_out))
            self.alpha_ = min(self.cv_mse_, key=self.cv_mse_.__getitem__)
        ridge = Ridge(alpha=self.alpha_, solver="cholesky").fit(x, y)
        self.w_ = torch.from_numpy(ridge.coef_.T.copy()).to(features.device)  # (C, P)
        self.b_ = torch.from_numpy(np.asarray(ridge.intercept_, dtype=np.float64)).to(features.device)  # (P,)
        log.info("ridge hypernetwork: alpha=%g (cv mse %s)", self.alpha_,
                 {a: round(v, 4) for a, v in self.cv_mse_.items()})
        return self

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Flat weights ``(m, P)`` float32 for conditions ``(m, C)``."""
        return (self.scaler(features) @ self.w_ + self.b_).float()


class MLPHypernet(nn.Module):
    """MLP from a condition ``(B, C)`` to normalised flat weights ``(B, P)``.

    The output layer starts at zero, so training starts from the zoo's mean checkpoint (in the
    normalised space of :class:`ParamCodec`).

    Args:
        cond_dim: C.
        num_params: P.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        constant: the training conditions are all one vector (a suite of one task). An MLP of
            them then has one output, whatever its weights: the model is that output itself, a
            ``(P,)`` vector trained with the same losses. Same function class, at the cost of P
            weights instead of the head's ``hidden · P`` (288 M for a million-weight network).
    """

    def __init__(self, cond_dim: int, num_params: int, hidden: int = 256, depth: int = 2,
                 constant: bool = False) -> None:
        super().__init__()
        self.constant = constant
        if constant:
            self.value = nn.Parameter(torch.zeros(num_params))  # set to the zoo's mean by train_mlp_hypernet
            self.register_buffer("cond_mean", torch.zeros(cond_dim))
            self.register_buffer("cond_std", torch.ones(cond_dim))
            return
        layers: list[nn.Module] = []
        width = cond_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_params)
        nn.init.zeros_(self.head.weight)  # start at the mean checkpoint
        nn.init.zeros_(self.head.bias)
        self.register_buffer("cond_mean", torch.zeros(cond_dim))
        self.register_buffer("cond_std", torch.ones(cond_dim))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if self.constant:
            return self.value.expand(cond.shape[0], -1)  # (B, P)
        return self.head(self.body((cond - self.cond_mean) / self.cond_std))  # (B, P)


@dataclass(frozen=True)
class HypernetTrainConfig:
    """Training settings of :func:`train_mlp_hypernet` (defaults: ~10–30 s on one CPU core)."""

    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 32
    functional_loss_weight: float = 1.0
    functional_batch: int = 64
    hidden: int = 256
    depth: int = 2
    weight_decay: float = 0.0
    seed: int = 0


def train_mlp_hypernet(target: Target, codec: ParamCodec, conds: torch.Tensor, flat: torch.Tensor,
                       row_task: torch.Tensor, task_data: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       config: HypernetTrainConfig = HypernetTrainConfig(), progress: bool = False
                       ) -> tuple[MLPHypernet, list[float]]:
    """Train an :class:`MLPHypernet` with the weight loss and the functional loss.

    Args:
        target: the target network the weights run in (functional loss).
        codec: normalisation of the weights (``flat`` is in its normalised space).
        conds: condition of each training checkpoint ``(n, C)``.
        flat: normalised flat weights of each training checkpoint ``(n, P)``.
        row_task: index into ``task_data`` of each checkpoint's task ``(n,)``.
        task_data: per task, training inputs and labels ``(x (M, ...), y (M,))``.
        config: optimisation settings; ``functional_loss_weight = 0`` trains on the weight loss only.
        progress: a progress bar over the ``config.steps`` steps on stderr (only when it is a terminal).

    Returns:
        The trained model (eval mode) and the total loss of every step.
    """
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # One distinct condition (a one-task suite): the MLP's output is one vector; train it as
        # that vector when the head would be too large to train on this machine.
        constant = bool((conds == conds[:1]).all()) and config.hidden * flat.shape[1] > MAX_HEAD_WEIGHTS
        model = MLPHypernet(conds.shape[1], flat.shape[1], config.hidden, config.depth, constant=constant)
    if constant:  # start from the zoo's mean checkpoint: the one output that fits the weight loss best
        model.value.data.copy_(flat.mean(0))
    scaler = Standardizer(conds)
    model.cond_mean.copy_(scaler.mean.float())
    model.cond_std.copy_(scaler.std.float())
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    n = conds.shape[0]
    history = []
    model.train()
    # disable=None: tqdm shows the bar only on a terminal (no carriage-return noise in log files)
    for _ in tqdm(range(config.steps), total=config.steps, desc="MLP hypernetwork", unit="step",
                  disable=None if progress else True):
        idx = torch.randint(n, (min(config.batch_size, n),), generator=gen)
        pred = model(conds[idx])                                   # (B, P)
        loss = F.mse_loss(pred, flat[idx])
        if config.functional_loss_weight > 0:
            xs, ys = [], []
            for t in row_task[idx].tolist():
                x, y = task_data[t]
                pick = torch.randint(x.shape[0], (config.functional_batch,), generator=gen)
                xs.append(x[pick])
                ys.append(y[pick])
            if constant:  # B copies of one network: run it once on all B · n inputs (the same mean)
                logits = target.forward_each(codec.unflatten(pred[:1]), torch.cat(xs)[None])  # (1, B · n, C)
            else:
                logits = target.forward_each(codec.unflatten(pred), torch.stack(xs))  # (B, n, C)
            ce = F.cross_entropy(logits.flatten(0, 1), torch.stack(ys).flatten())
            loss = loss + config.functional_loss_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
    return model.eval(), history
