"""Is the denoiser a denoiser? Diagnostics of a trained generator at every noise level.

A generator is judged by more than its final samples (DESIGN.md, "The denoiser must be a
denoiser"). For zoo entries noised to level t, x_t = a_t x0 + s_t ε (DDPM eq. 4: a_t = sqrt(ᾱ_t),
s_t = sqrt(1 - ᾱ_t); flow matching: a = 1 - σ, s = σ with σ = t / T; see
:class:`~weightdiff.models.schedule.NoiseLevel`), :func:`noise_level_report` compares the model's
clean estimate x̂0(x_t, t, c) with two references:

- **identity**: x_t / a_t, what returning the noisy input gives. A model worse than it at
  low noise has not learnt to denoise there;
- **oracle**: the exact posterior mean of the training entries of the same task,
  E[x0 | x_t] = Σ_i w_i x0_i with w ∝ N(x_t; a_t x0_i, s_t² I) ∝ exp(-|x_t - a_t x0_i|² / (2 s_t²)).
  It is the minimiser of the training loss on the empirical data, and it reproduces zoo entries:
  the memorising oracle.

and measures the accuracy of x̂0 in the target network per level. :func:`path_report` follows a
sampler from noise to sample and reports, per step, the accuracy of the current x̂0 and its
distance to the nearest training entry (on valid entries). A model whose one-step estimate beats
its own multi-step sampler is a regressor, not a generative model.

Everything is measured in the space the generator diffuses in: normalised weight tokens, for a
centred generator (``center_tokens``) their residuals ``(x0 - center) / scale``, for one with a
conditional mean (``mean_head``) each entry's residual ``x0 - μ(c)`` from the mean of its task's
condition, for a latent one the autoencoder's latents of the entries; each is turned back into
tokens only to be scored in the target network (a latent's accuracy is then that of its decoding).
Distances to the zoo are measured in that space too, except with a conditional mean: residuals of
different tasks are around different means, so a path's distances are between weight tokens.

Plain torch; no trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightdiff.errors import WeightDiffError
from weightdiff.evaluate.report import _save_figure
from weightdiff.io import write_json
from weightdiff.models.generator import mean_tokens
from weightdiff.models.schedule import NoiseLevel, as_noise_level, denoise, predicted_x0
from weightdiff.sampling import make_condition
from weightdiff.tasks import get_task
from weightdiff.weights.canonical import RunAlignment, canonicalize

log = logging.getLogger(__name__)

DEFAULT_TIMESTEPS = (0, 10, 25, 50, 100, 175, 250, 400, 550, 700, 850, 999)
DEFAULT_PATH_STEPS = (10, 20)  # the sampler paths followed unless told otherwise


def masked_mse(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error over valid entries, per sample: a, b (N, L, D), valid (L, D) -> (N,)."""
    diff = (a - b).pow(2) * valid
    return diff.flatten(1).sum(1) / valid.sum()


def posterior_mean(x_t: torch.Tensor, level: NoiseLevel | float, candidates: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
    """Exact posterior mean of x0 given x_t under the empirical distribution ``candidates``.

    Args:
        x_t: (N, L, D) noisy tokens at ``level``: a :class:`NoiseLevel` of floats, or a DDPM ᾱ.
        candidates: (M, L, D) clean training tokens (the empirical data distribution).
        valid: (L, D) bool; padded entries take no part in the likelihood.
    Returns:
        (N, L, D) Σ_i softmax_i(-|x_t - a x0_i|² / (2 s²)) x0_i.
    """
    level = as_noise_level(level)
    if level.variance <= 0:
        raise ValueError("the posterior at s_t = 0 (no noise) is a point mass; use t > 0")
    xt = (x_t * valid).flatten(1).double()                         # (N, P)
    xs = (candidates * valid).flatten(1).double() * level.signal   # (M, P)
    d2 = torch.cdist(xt, xs).pow(2)                                  # (N, M)
    w = torch.softmax(-d2 / (2 * level.variance), dim=1)
    return (w @ candidates.flatten(1).double()).view_as(x_t).to(x_t.dtype)


def nearest_distance(x: torch.Tensor, zoo: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L2 distance of each of x (N, L, D) to its nearest row of zoo (M, L, D), on valid entries -> (N,)."""
    return torch.cdist((x * valid).flatten(1).double(), (zoo * valid).flatten(1).double()).min(1).values.float()


#: ``(x (N, ...), tasks)`` → ``(N, ...)``; ``tasks``, the task name of each row, is read only by a
#: generator with a conditional mean (None otherwise).
Transform = Callable[[torch.Tensor, Sequence[str] | None], torch.Tensor]


class _TaskMeans:
    """μ(c) of each task's condition as weight tokens, computed once per task: ``tasks`` → ``(N, L, D)``."""

    def __init__(self, net: Any, condition: Callable[[str], Any]) -> None:
        self.net, self.condition = net, condition
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, tasks: Sequence[str] | None) -> torch.Tensor:
        if tasks is None:
            raise WeightDiffError("diagnose: the residual of a generator with a conditional mean needs each row's task")
        for name in dict.fromkeys(tasks):
            if name not in self._cache:
                with torch.no_grad():
                    self._cache[name] = mean_tokens(self.net, self.condition(name))[0].cpu()
        return torch.stack([self._cache[name] for name in tasks])


def diffusion_space(gen: Any, condition: Callable[[str], Any] | None = None) -> tuple[Transform, Transform]:
    """``(into, back)``: weight tokens → what the generator diffuses, and back (identity unless
    centred, latent or with a conditional mean; the latent of an entry is its autoencoder's
    encoding without input noise; with a conditional mean, the residual from μ of the row's task,
    conditioned by ``condition``: task name → raw condition with one row)."""
    net = getattr(gen, "generator", None)
    if net is not None and net.mean_net is not None:
        if condition is None:
            raise WeightDiffError("diagnose: a generator with a conditional mean (mean_head > 0) diffuses residuals "
                                  "from μ(c); its diffusion space needs the condition of each task")
        means = _TaskMeans(net, condition)
        return (lambda x, tasks: net.residual(x, mean=means(tasks))), (lambda x, tasks: net.to_tokens(x, mean=means(tasks)))
    if net is not None and net.autoencoder is not None:
        return (lambda x, tasks=None: net.encode_latent(x)), (lambda x, tasks=None: net.to_tokens(x))
    if net is None or not net.config.center:
        return (lambda x, tasks=None: x), (lambda x, tasks=None: x)
    return (lambda x, tasks=None: net.residual(x)), (lambda x, tasks=None: net.to_tokens(x))


def sample_valid(gen: Any) -> torch.Tensor:
    """The (L, D) mask of the diffused entries that count: weight tokens' padding is out; latents have none."""
    net = getattr(gen, "generator", None)
    if net is None:
        return gen.tokenizer.layout.valid_mask()
    valid = net.sample_valid  # None for latents
    return valid.cpu() if valid is not None else torch.ones(net.sample_shape, dtype=torch.bool)


class ZooEntries:
    """Zoo entries of one split as the generator saw them: diffused tokens (N, L, D) and task names."""

    def __init__(self, gen: Any, zoo: Any, split: str, into: Transform) -> None:
        data = gen.config.get("data", {})
        reference = None
        if zoo.kind == "full" and data.get("canonicalize", True):
            reference = zoo.load(zoo.rows("train")[0]["id"])  # the datamodule's alignment reference

        runs = (RunAlignment(zoo.rows("train") + zoo.rows("heldout"), zoo.load, reference)
                if reference is not None and data.get("align_runs", False) else None)

        def prepared(row: dict) -> dict[str, torch.Tensor]:
            state = zoo.load(row["id"])
            if runs is not None:
                return runs(state, row["run_id"])
            return canonicalize(state, zoo.kind, reference) if data.get("canonicalize", True) else state

        rows = zoo.rows(split)
        self.tasks = [r["task"] for r in rows]
        with torch.no_grad():  # a latent generator's encoder would otherwise record a graph of every entry
            self.tokens = into(gen.tokenizer.encode_batch([prepared(r) for r in rows]), self.tasks) \
                if rows else torch.empty(0)

    def subset(self, limit: int | None, seed: int) -> ZooEntries:
        """At most ``limit`` entries, drawn without replacement (kept in zoo order)."""
        if limit is None or len(self.tasks) <= limit:
            return self
        pick = sorted(torch.randperm(len(self.tasks), generator=torch.Generator().manual_seed(seed))[:limit].tolist())
        out = object.__new__(ZooEntries)
        out.tasks, out.tokens = [self.tasks[i] for i in pick], self.tokens[pick]
        return out

    def of_task(self, name: str) -> torch.Tensor:
        """Indices (n,) of the entries of task ``name``."""
        return torch.tensor([i for i, t in enumerate(self.tasks) if t == name])


class _Scorer:
    """Accuracy of diffused tokens, decoded, in the target network; one target per task family."""

    def __init__(self, gen: Any, back: Transform, split: str = "val") -> None:
        self.gen, self.split = gen, split
        self._back = back
        self._targets: dict[str, Any] = {}

    def __call__(self, tokens: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
        """Accuracy (N,) of diffused tokens (N, L, D), each on its own task's split."""
        tokens = self._back(tokens, tasks)
        out = torch.empty(tokens.shape[0])
        for name in dict.fromkeys(tasks):
            idx = torch.tensor([i for i, t in enumerate(tasks) if t == name])
            task = get_task(name)
            if task.family not in self._targets:  # a family's tasks share their network and base
                self._targets[task.family] = self.gen.target(task)
            x, y = task.data().split(self.split)
            out[idx] = self._targets[task.family].accuracy(self.gen.tokenizer.decode_float(tokens[idx]), x, y)
        return out


@torch.no_grad()
def noise_level_report(gen: Any, zoo: Any, model_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
                       condition: Callable[[str], Any], *, timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                       max_entries: int | None = 64, accuracy: bool = True, seed: int = 0,
                       train_entries: ZooEntries | None = None) -> dict[str, Any]:
    """x̂0 error (model / identity / oracle) and x̂0 accuracy per noise level, on training and held-out entries.

    Args:
        gen: a loaded generator (``tokenizer``, ``schedule``, ``target(task)``, ``config``).
        zoo: the zoo the generator was trained on.
        model_fn: ``(x_t (B, L, D), t (B,), raw condition batch) -> denoiser output (B, L, D)``.
        condition: task name -> raw condition with one row.
        timesteps: noise levels t in [0, T) (flow matching: σ = t / T).
        max_entries: entries per split (drawn at random; ``None``: all).
        train_entries: the zoo's training entries, when the caller has encoded them already.
    Returns:
        ``{"timesteps": [...], "train": {...}, "heldout": {...}}`` with, per split, lists over t of
        ``model_mse``, ``identity_mse``, ``oracle_mse`` (train only), ``model_acc``, ``oracle_acc``.
    """
    schedule, ptype = gen.schedule, gen.schedule.prediction_type
    valid = sample_valid(gen)
    into, back = diffusion_space(gen, condition)
    all_train = train_entries if train_entries is not None else ZooEntries(gen, zoo, "train", into)
    by_task = {name: all_train.tokens[all_train.of_task(name)] for name in dict.fromkeys(all_train.tasks)}
    splits = {"train": all_train.subset(max_entries, seed)}
    if zoo.rows("heldout"):
        splits["heldout"] = ZooEntries(gen, zoo, "heldout", into).subset(max_entries, seed + 1)
    score = _Scorer(gen, back)
    report: dict[str, Any] = {"timesteps": [int(t) for t in timesteps], "prediction_type": ptype,
                              "objective": schedule.objective}
    for split, entries in splits.items():
        rows: dict[str, list[float | None]] = {k: [] for k in ("model_mse", "identity_mse", "oracle_mse",
                                                                 "model_acc", "oracle_acc")}
        g = torch.Generator().manual_seed(seed)
        conditions = {name: condition(name) for name in dict.fromkeys(entries.tasks)}
        for t in timesteps:
            level = schedule.noise_level(int(t))  # floats a_t, s_t²
            x0 = entries.tokens
            noise = torch.randn(x0.shape, generator=g)
            x_t = level.signal * x0 + level.noise * noise
            tt = torch.full((x0.shape[0],), int(t), dtype=torch.long)  # σ · T = t under flow matching
            x0_hat = torch.empty_like(x0)
            for name, raw in conditions.items():
                idx = entries.of_task(name)
                raw_rows = tuple(r.expand(len(idx), *r.shape[1:]) for r in raw) if isinstance(raw, tuple) \
                    else raw.expand(len(idx), *raw.shape[1:])
                out = model_fn(x_t[idx], tt[idx], raw_rows)
                x0_hat[idx] = predicted_x0(out, x_t[idx], schedule.noise_level(tt[idx]), ptype)
            x0_hat = x0_hat.masked_fill(~valid, 0.0)
            rows["model_mse"].append(float(masked_mse(x0_hat, x0, valid).mean()))
            rows["identity_mse"].append(float(masked_mse(x_t / level.signal, x0, valid).mean()))
            oracle = None
            if split == "train" and t > 0:
                oracle = torch.empty_like(x0)
                for name in conditions:
                    idx = entries.of_task(name)
                    oracle[idx] = posterior_mean(x_t[idx], level, by_task[name], valid)
                rows["oracle_mse"].append(float(masked_mse(oracle, x0, valid).mean()))
            else:
                rows["oracle_mse"].append(None)
            rows["model_acc"].append(float(score(x0_hat, entries.tasks).mean()) if accuracy else None)
            rows["oracle_acc"].append(float(score(oracle, entries.tasks).mean())
                                      if accuracy and oracle is not None else None)
            log.info("%s t=%d: model %.4g identity %.4g oracle %s", split, t, rows["model_mse"][-1],
                     rows["identity_mse"][-1], rows["oracle_mse"][-1])
        report[split] = rows
    return report


@torch.no_grad()
def path_report(gen: Any, zoo_tokens: torch.Tensor, task: str, sample_fn: Callable[..., torch.Tensor], *,
                num: int = 16, seed: int = 0, space: tuple[Transform, Transform] | None = None,
                zoo_tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy and nearest-zoo distance of x̂0 along one sampler's path.

    Args:
        zoo_tokens: (M, L, D) training tokens as diffused (for the nearest-entry distance).
        sample_fn: ``(record, noise) -> tokens``: runs the sampler from ``noise`` (num, L, D),
            calling ``record(x_t, t, output)`` at every model evaluation.
        space: ``(into, back)`` of :func:`diffusion_space` (None: the generator's, which a
            conditional mean does not allow).
        zoo_tasks: (with a conditional mean) the task of each row of ``zoo_tokens``.
    Returns:
        ``{"t": [...], "accuracy": [...], "nearest_distance": [...], "final_accuracy", "final_distance",
        "zoo_spacing"}`` (distances in the diffused space, between weight tokens with a conditional
        mean; spacing = median nearest-neighbour distance inside the zoo).
    """
    schedule = gen.schedule
    valid = sample_valid(gen)
    back = (space or diffusion_space(gen))[1]
    net = getattr(gen, "generator", None)
    in_tokens = net is not None and net.mean_net is not None  # residuals of other tasks are around other means
    if in_tokens:
        zoo_tokens = back(zoo_tokens, zoo_tasks)
    steps: list[tuple[float, torch.Tensor]] = []

    def record(x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> None:
        x0 = predicted_x0(out, x_t, schedule.noise_level(t), schedule.prediction_type)
        steps.append((int(t[0]) if schedule.objective == "ddpm" else float(t[0]), x0.masked_fill(~valid, 0.0)))

    shape = (num, *zoo_tokens.shape[1:])
    noise = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed + i))
                         for i in range(num)])
    final = sample_fn(record, noise)
    tasks = [task] * num
    score = _Scorer(gen, back)

    def compared(x: torch.Tensor) -> torch.Tensor:
        return back(x, tasks) if in_tokens else x

    zoo_d = torch.cdist((zoo_tokens * valid).flatten(1).double(), (zoo_tokens * valid).flatten(1).double())
    zoo_d.fill_diagonal_(float("inf"))
    return {
        "task": task,
        "t": [t for t, _ in steps],
        "accuracy": [float(score(x, tasks).mean()) for _, x in steps],
        "nearest_distance": [float(nearest_distance(compared(x), zoo_tokens, valid).median()) for _, x in steps],
        "final_accuracy": float(score(final, tasks).mean()),
        "final_distance": float(nearest_distance(compared(final), zoo_tokens, valid).median()),
        "zoo_spacing": float(zoo_d.min(1).values.median()),
    }


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Three panels: x̂0 error per noise level, x̂0 accuracy per level, and the sampler paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ts = np.asarray(report["noise_levels"]["timesteps"])
    styles = {"train": "-", "heldout": "--"}
    for split in ("train", "heldout"):
        rows = report["noise_levels"].get(split)
        if not rows:
            continue
        for key, colour in (("model_mse", "C0"), ("identity_mse", "C7"), ("oracle_mse", "C3")):
            vals = np.asarray([np.nan if v is None or v <= 0 else v for v in rows[key]], dtype=float)
            axes[0].plot(ts, vals, styles[split], color=colour, marker="o", ms=3,
                         label=f"{key.removesuffix('_mse')} ({split})")
        for key, colour in (("model_acc", "C0"), ("oracle_acc", "C3")):
            vals = np.asarray([np.nan if v is None else 100 * v for v in rows[key]], dtype=float)
            if not np.isnan(vals).all():
                axes[1].plot(ts, vals, styles[split], color=colour, marker="o", ms=3,
                             label=f"{key.removesuffix('_acc')} x̂0 ({split})")
    model_vals = [v for split in ("train", "heldout") for v in report["noise_levels"].get(split, {}).get("model_mse", [])]
    positive = [v for split in ("train", "heldout") for key in ("model_mse", "identity_mse", "oracle_mse")
                for v in report["noise_levels"].get(split, {}).get(key, []) if v]
    if positive and model_vals:  # identity explodes at t -> T and the oracle can be exactly 0: keep the model in view
        axes[0].set_ylim(max(min(positive) / 2, 1e-8), 20 * max(model_vals))
    axes[0].set(yscale="log", xlabel="noise level t", ylabel="x̂0 MSE (normalised tokens; 0 not drawn)",
                title="x̂0 error: model vs identity x_t/a_t vs posterior-mean oracle")
    axes[1].set(xlabel="noise level t", ylabel="accuracy of x̂0 (%)", title="accuracy of the clean estimate")
    twin = axes[2].twinx()
    for name, p in report.get("paths", {}).items():
        line, = axes[2].plot(range(len(p["accuracy"])), 100 * np.asarray(p["accuracy"]), marker="o", ms=3,
                             label=f"{name}: accuracy (solid), nearest-zoo distance (dotted)")
        twin.plot(range(len(p["nearest_distance"])), p["nearest_distance"], ":", color=line.get_color())
        twin.axhline(p["zoo_spacing"], color="k", lw=0.6)
    twin.set_ylabel("median nearest-zoo distance; zoo spacing (black line)")
    axes[2].set(xlabel="sampler step", ylabel="accuracy of x̂0 (%)", title="along the sampler's path")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(report.get("title", "denoiser diagnostics"))
    return _save_figure(fig, path)


def write_report(out: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """``diagnose.json`` and ``diagnose.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "diagnose.json", report)
    return out / "diagnose.json", plot_report(report, out / "diagnose.png")


def sampler_path_fn(gen: Any, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sampler: str,
                    steps: int) -> Callable[..., torch.Tensor]:
    """A ``sample_fn`` for :func:`path_report` that runs :func:`denoise` with ``model_fn`` (x_t, t) -> output."""
    valid = sample_valid(gen)

    def run(record: Callable[..., None], noise: torch.Tensor) -> torch.Tensor:
        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = model_fn(x, t)
            record(x, t, out)
            return out
        return denoise(fn, tuple(noise.shape), gen.schedule, steps=steps, sampler=sampler, noise=noise, valid=valid)

    return run


def diagnose_generator(gen: Any, zoo: Any, *, paths: Sequence[tuple[str, int]] | None = None,
                       task: str | None = None, max_entries: int | None = 64, num: int = 16,
                       timesteps: Sequence[int] = DEFAULT_TIMESTEPS, seed: int = 0) -> dict[str, Any]:
    """The whole diagnosis of a loaded generator on its zoo: noise levels, then one path per sampler.

    Args:
        gen: a loaded generator (:func:`weightdiff.models.generator.load_generator`).
        paths: ``(sampler, steps)`` pairs to follow from noise to sample (None: the objective's
            default sampler at :data:`DEFAULT_PATH_STEPS`).
        task: the task the paths are sampled for (default: the first training task).
        max_entries, num, timesteps, seed: see :func:`noise_level_report` and :func:`path_report`.
    """
    net = gen.generator
    if paths is None:
        paths = [(gen.schedule.default_sampler(), steps) for steps in DEFAULT_PATH_STEPS]
    for sampler, _ in paths:  # before the noise levels: a wrong sampler fails at once
        gen.schedule.check_sampler(sampler)

    def condition(name: str) -> Any:
        return make_condition(gen, task=name, seed=seed).raw

    def model_fn(x: torch.Tensor, t: torch.Tensor, raw: Any) -> torch.Tensor:
        cond = net.encode_condition(raw, None)
        return net.guided_fn(cond, cond, 1.0)(x, t)

    was_training = net.training
    net.eval()
    space = diffusion_space(gen, condition)
    train = ZooEntries(gen, zoo, "train", space[0])  # encoded once: the noise levels and the paths' distances use it
    levels = noise_level_report(gen, zoo, model_fn, condition, timesteps=timesteps, max_entries=max_entries,
                                seed=seed, train_entries=train)
    zoo_tokens = train.tokens
    task = task or zoo.rows("train")[0]["task"]
    cond = net.encode_condition(condition(task), None).repeat_interleave(num)
    step_fn = net.guided_fn(cond, cond, 1.0)
    report = {"title": f"{gen.path}: zoo {zoo.name}, {gen.schedule.objective}, "
                       f"{gen.schedule.prediction_type} prediction",
              "noise_levels": levels, "paths": {}}
    for sampler, steps in paths:
        report["paths"][f"{sampler}-{steps}"] = path_report(gen, zoo_tokens, task,
                                                            sampler_path_fn(gen, step_fn, sampler, steps),
                                                            num=num, seed=seed, space=space, zoo_tasks=train.tasks)
    net.train(was_training)
    return report
