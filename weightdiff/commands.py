"""The subcommands of ``weightdiff`` other than LightningCLI's ``fit`` and ``validate``.

Each is a typed function that :mod:`weightdiff.cli` turns into a jsonargparse subcommand: its
signature is the subcommand's options and their defaults, its docstring's ``Args:`` their help.
Each imports its library code inside its body, so building the parser imports no torch and
``weightdiff --help`` takes a fraction of a second instead of several.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from json import dumps
from pathlib import Path
from typing import Literal

from weightdiff.errors import ConditionError, ManifestError

MAX_TASK_LINES = 20  # `zoo info` lists tasks one per line up to this many (all of them with --json)
# weightdiff.models.schedule.SamplerName, spelled here so that --help imports no torch
# (tests/test_cli.py checks that the two agree).
Sampler = Literal["ddim", "ddpm", "dpm", "euler", "x0"]
Split = Literal["train", "val", "test"]


def _rank_zero() -> bool:
    """Whether this process is the first (or only) one of a distributed launch (torchrun, Lightning's DDP)."""
    return all(int(os.environ.get(name, "0")) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


# ------------------------------------------------------------------------------------ zoo
def zoo_build(config: str, root: str = "checkpoints_zoo", shard: str = "0/1", workers: int = 1,
              no_progress: bool = False) -> None:
    """Train the checkpoints of a zoo recipe (resumable, shardable).

    Args:
        config: recipe YAML, e.g. configs/zoo/rotdigits-lora.yaml.
        root: folder holding zoos.
        shard: i/n: build the runs with index i modulo n.
        workers: training processes, one per core.
        no_progress: no progress bar.
    """
    from weightdiff.zoo import load_recipe, parse_shard, run_build

    shard_range = parse_shard(shard)
    report = run_build(load_recipe(config), root, shard=shard_range, workers=workers, progress=not no_progress)
    accs = report.test_accs
    acc = (f"; test acc of new entries mean {sum(accs) / len(accs):.4f}, min {min(accs):.4f}, max {max(accs):.4f}"
           if accs else "")
    print(f"zoo {report.zoo_dir}: shard {shard} has {report.shard_runs} of {report.planned_runs} runs; "
          f"{report.skipped_runs} already built, {report.trained_runs} trained ({report.entries_written} entries) "
          f"in {report.seconds:.1f} s{acc}")


def zoo_import(manifest: str, base: str | None = None, name: str | None = None, root: str = "checkpoints_zoo",
               no_progress: bool = False, base_config: str | None = None) -> None:
    """Build a zoo from existing checkpoints listed in a manifest (resumable).

    Every row is checked before anything is written; a bad row is one error naming the line and field.

    Args:
        manifest: JSONL or CSV file, one row per checkpoint: path (a PEFT adapter folder or a
            .safetensors state dict), task, split (train/heldout), descriptions; optional
            heldout_kind, code, metrics, seed, checkpoint (see weightdiff.zoo.importer).
        base: base network of a LoRA family: a .safetensors state dict, a folder holding
            model.safetensors, or a Hugging Face model folder (config.json + model.safetensors)
            (null for full families).
        name: zoo name (null: the manifest's file name without its suffix).
        root: folder holding zoos.
        no_progress: no progress bar.
        base_config: YAML of the base architecture, recorded in the zoo: class_path + init_args
            (any nn.Module; weights from --base) or pretrained (a local Hugging Face folder) +
            auto_class (null: the family's network).
    """
    from weightdiff.zoo import import_zoo

    report = import_zoo(manifest, base, name=name, root=root, progress=not no_progress, base_config=base_config)
    print(f"zoo {report.zoo_dir}: {report.rows} checkpoints in {manifest}; {report.skipped} already imported, "
          f"{report.written} imported in {report.seconds:.1f} s")


def _score_label(key: str) -> str:
    """``test_acc`` → "test acc", ``test_mse`` → "test mse"."""
    return "test acc" if key == "test_acc" else key.replace("_", " ", 1)


def _fmt_score(stats: dict[str, float | None], key: str = "test_acc") -> str:
    label = _score_label(key)
    if not stats["n"]:
        return f"{label} –"
    return f"{label} mean {stats['mean']:.4f} min {stats['min']:.4f} max {stats['max']:.4f}"


def zoo_info(path: str, json: bool = False) -> None:
    """Counts and test score (accuracy, or the metric the entries record) per split, held-out kind and task.

    Args:
        path: zoo folder, e.g. checkpoints_zoo/rotdigits-lora.
        json: print the full numbers as JSON.
    """
    from weightdiff.zoo import Zoo

    info = Zoo.open(path).info()
    if json:
        print(dumps(info, indent=2))
        return
    key = info["metric"]
    lines = [f"zoo {info['name']} ({info['kind']}, family {info['family']}) at {info['path']}",
             f"  {info['entries']} of {info['planned_entries']} planned entries, {info['runs']} runs, "
             f"{info['tasks']} tasks, {info['num_params']} parameters per entry; {_fmt_score(info[key], key)}"]
    if "base" in info and key in info["base"]:
        lines.append(f"  base network: {_score_label(key)} {info['base'][key]:.4f}")
    for split, s in info["splits"].items():
        lines.append(f"  split {split}: {s['entries']} entries, {s['tasks']} tasks; {_fmt_score(s[key], key)}")
    for kind, s in info["heldout_kinds"].items():
        lines.append(f"    held-out {kind}: {s['entries']} entries, {s['tasks']} tasks; {_fmt_score(s[key], key)}")
    if len(info["per_task"]) <= MAX_TASK_LINES:
        for task, s in info["per_task"].items():
            lines.append(f"  {task} [{s['split']}]: {s['entries']} entries; {_fmt_score(s[key], key)}")
    else:
        lines.append(f"  ({len(info['per_task'])} tasks: use --json for per-task numbers)")
    if info["temporary_dirs"]:
        lines.append(f"  {info['temporary_dirs']} temporary folder(s) from interrupted builds under entries/")
    print("\n".join(lines))


def zoo_verify(path: str) -> None:
    """Re-hash every entry and check that it loads strictly; exit 2 on problems.

    Args:
        path: zoo folder, e.g. checkpoints_zoo/rotdigits-lora.
    """
    from weightdiff.zoo import Zoo

    zoo = Zoo.open(path)
    problems = zoo.verify()
    for entry_id, why in problems:
        print(f"{entry_id}: {why}")
    if problems:
        raise ManifestError(f"zoo {path}: {len(problems)} problem(s) found (listed above)")
    print(f"zoo {path}: {len(zoo.rows())} entries verified")


# ------------------------------------------------------------------------- generator, samples
def export(ckpt: str, out: str) -> None:
    """Export EMA weights + layout + config from a Lightning checkpoint.

    Args:
        ckpt: Lightning checkpoint written by `weightdiff fit`.
        out: output directory (the generator `sample` loads).
    """
    from weightdiff.training.export import export_checkpoint

    print(f"exported generator to {export_checkpoint(ckpt, out)}")


def sample(model: str, out: str, task: str | None = None, description: str | None = None,
           examples: int | None = None, num: int = 4, steps: int | None = None, sampler: Sampler | None = None,
           temperature: float = 1.0, latent_noise: float | None = None, guidance: float = 1.0, seed: int = 0,
           batch_size: int = 64, select_with: int | None = None, candidates: int = 8, no_cache: bool = False, devices: int = 1,
           overwrite: bool = False, inputs: str | None = None) -> None:
    """Sample weights for a task, a free-text description, labelled examples or unlabelled inputs.

    Args:
        model: exported generator directory (`weightdiff export`).
        out: output directory (one sub-directory per sample): new or empty, unless --overwrite.
        task: task string, e.g. 'rotdigits:angle=70,flip=0' (give one of --task, --description, --inputs).
        description: free-text task description (text-conditioned generators).
        examples: K examples of --task: labelled training examples for an examples-conditioned
            generator, unlabelled test-split inputs for an unlabelled-conditioned one (null: as trained).
        num: number of samples, at most 100000 (weightdiff.sampling.MAX_SAMPLES); written as they
            are generated, --batch-size at a time.
        steps: sampler steps (null: the generator's).
        sampler: ddim, ddpm (ancestral: fresh noise at every step) or dpm (DPM-Solver++) for ddpm
            generators, euler for flow-matching ones, x0
            (one-step clean estimate) for both; null: the generator's.
        temperature: scale of the initial noise.
        latent_noise: (latent generators) std of the Gaussian noise added to each sampled latent
            before decoding (null: the generator's, model_index.json; 0: off).
        guidance: classifier-free guidance scale (1 = off).
        seed: sample i starts from the noise of seed + i (0 <= seed, seed + num - 1 < 2**63).
        batch_size: samples generated at once.
        select_with: best-of-k: score candidates on this many labelled training examples of --task,
            keep the best.
        candidates: candidates per kept sample with --select-with.
        no_cache: bypass the generated-weights cache.
        devices: sample over this many devices through Lightning's predict loop (1: plain torch).
        overwrite: replace a non-empty --out folder as a whole (atomically, when every sample is written).
        inputs: a .safetensors or .npz file of K unlabelled inputs (K, *input_shape) of a new domain
            (its only array, or the one named 'x'), for an unlabelled-conditioned generator.
    """
    from weightdiff.models.conditioning import check_description
    from weightdiff.outputs import check_output_folder
    from weightdiff.sampling import (
        SamplerSettings,
        WeightDiffusionPipeline,
        check_request,
        make_condition,
        select_best,
    )
    from weightdiff.sampling import sample as sample_weights

    if sum(v is not None for v in (task, description, inputs)) != 1:
        raise ConditionError("give exactly one of --task, --description and --inputs")
    if description is not None:
        check_description(description, name="--description")
    if steps is not None and steps < 1:
        raise ConditionError(f"--steps must be at least 1, got {steps}")
    check_request(num, SamplerSettings(guidance=guidance, seed=seed, temperature=temperature,
                                       latent_noise=0.0 if latent_noise is None else latent_noise), batch_size)
    if devices < 1:
        raise ConditionError(f"--devices must be at least 1, got {devices}")
    if examples is not None and task is None:
        raise ConditionError("--examples K draws K examples of a task: give --task too")
    if select_with is not None and task is None:
        raise ConditionError("--select-with needs --task (the labelled examples come from the task)")
    check_output_folder(out, overwrite=overwrite)
    gen = WeightDiffusionPipeline.from_pretrained(model)
    cond = make_condition(gen, task=task, description=description, examples=examples, inputs=inputs, seed=seed)
    # the generator's own sampler, steps and latent noise where none is given
    settings = gen.settings(steps, sampler, guidance, seed, temperature, latent_noise)
    if select_with is not None:
        dirs, info = select_best(gen, cond, num, settings, out, task=task, examples=select_with,
                                 candidates=candidates, use_cache=not no_cache, batch_size=batch_size,
                                 overwrite=overwrite)
    else:
        generate = None
        if devices > 1:
            from functools import partial

            from weightdiff.training.predict import (
                predict_tokens,  # lightning: imported only for this case
            )

            generate = partial(predict_tokens, devices=devices)
        dirs, info = sample_weights(gen, cond, num, settings, out, use_cache=not no_cache, batch_size=batch_size,
                                    generate=generate, overwrite=overwrite)
    src = "cache" if info["from_cache"] else f"{info['seconds']:.2f} s"
    if _rank_zero():  # with --devices N every rank runs the command; one reports it
        print(f"wrote {len(dirs)} samples to {out} ({src})")


# -------------------------------------------------------------------------------- evaluation
def evaluate(task: str, weights: list[str] | str, base: str | None = None, split: Split = "test",
             chunk: int = 64, json: str | None = None) -> None:
    """Evaluate weights (samples, zoo entries) on a split of a task.

    Args:
        task: task string, e.g. 'rotdigits:angle=70,flip=0'.
        weights: checkpoint directory (a sample, a zoo entry), directory of checkpoint directories,
            zoo directory or a quoted glob pattern; several as a list, e.g. '[samples/, zoo/]'. Not
            an exported generator: sample from it first.
        base: base network (model.safetensors or its directory) for LoRA adapters; null: from the
            sample's sample.json or the zoo the entries are in.
        split: the task's data split.
        chunk: networks evaluated at once.
        json: write the per-checkpoint scores (the task's metric: accuracy unless the task names
            another) and summary to this JSON file.
    """
    from weightdiff.errors import OutputPathError
    from weightdiff.evaluate.weights import evaluate_weights
    from weightdiff.io import check_writable, write_json

    if chunk < 1:
        raise ConditionError(f"--chunk must be at least 1, got {chunk}")
    if json is not None:
        if Path(json).is_dir():
            raise OutputPathError(f"cannot write --json {json}: it is a folder; name a file in it, "
                                  f"e.g. {Path(json) / 'eval.json'}")
        check_writable(json, "--json")  # before the evaluation, not after it
    result = evaluate_weights(task, [weights] if isinstance(weights, str) else weights, base, split=split,
                              chunk=chunk)
    width = max(len(row["id"]) for row in result["weights"])
    metric = result["metric"]
    for row in result["weights"]:  # printed first: a failing --json write loses none of it
        print(f"{row['id']:<{width}}  {row[metric]:.4f}")
    direction = "" if result["higher_is_better"] else ", lower is better"
    print(f"{result['task']} ({split}, {result['num']} {result['kind']} checkpoints, {metric}{direction}): "
          f"best {result['best']:.4f}  mean {result['mean']:.4f}  median {result['median']:.4f}")
    if json is not None:
        try:
            write_json(json, result)
        except OSError as exc:
            raise OutputPathError(f"cannot write --json {json}: {exc.strerror or exc}; the results are printed "
                                  "above") from None
        print(f"wrote {json}")


def benchmark(suite: str, zoo: str, out: str, model: str | list[str] | None = None, num: int = 32,
              steps: int | None = None, sampler: Sampler | None = None, guidance: float = 1.0,
              latent_noise: float | None = None, seed: int = 0,
              from_description: bool = False, max_seen_tasks: int | None = 8, max_unseen_tasks: int | None = None,
              sgd_tasks: int | None = None, sgd_ks: Sequence[int | str] = (1, 5, 10, 50, "all"),
              hypernet_steps: int | None = None, functional_loss_weight: float | None = None, batch_size: int = 64,
              select_per_class: int | None = 10, ensemble: bool = True, adaptation: bool = True,
              multitask_steps: int | None = None, polish_steps: int = 0, polish_lr: float = 1e-3,
              threads: int | None = None) -> None:
    """The honest benchmark of one suite: a generator beside every baseline, in one run.

    Writes results.json, results.md, predictions/*.npz and PNG plots under --out.

    Args:
        suite: a shipped suite (digits-cnn, mnist1d-cnn, digits-mlp, adapt-lora, cordigits-lora) or a
            suite YAML file (weightdiff.tasks.suites).
        zoo: zoo directory (its training split is what the generator saw).
        out: output directory.
        model: exported generator directory (null: the baselines alone), or a list of them, e.g.
            '[runs/text/model, runs/unlabelled/model]': generators of the zoo with different
            conditions, each a row of the same run (the first is 'generated').
        num: samples per task.
        steps: sampler steps (null: the generator's).
        sampler: ddim / ddpm / dpm (ddpm generators), euler (flow matching), x0 (null: the generator's).
        guidance: classifier-free guidance scale.
        latent_noise: (latent generators) std of the noise added to each sampled latent before
            decoding (null: the generator's).
        seed: sampling and baseline seed.
        from_description: condition the generator on a held-out free-text paraphrase of each task.
        max_seen_tasks: evenly spread training tasks evaluated (null: all).
        max_unseen_tasks: evenly spread held-out tasks evaluated (null: all).
        sgd_tasks: unseen tasks (seen for full suites) that get few-shot SGD (null: all; 0: skip).
        sgd_ks: labelled examples per class of few-shot SGD, e.g. '[1, 5, all]'.
        hypernet_steps: MLP hypernetwork steps (null: as many as the generator's, at least 2000).
        functional_loss_weight: MLP hypernetwork functional loss weight (null: the generator's own).
        batch_size: generator batch size.
        select_per_class: labelled examples per class for the 'generated best-of-N' row (0: no such row).
        ensemble: the row 'generated ensemble of N' (the samples' mean softmax as one model).
        adaptation: (adapter suites) the multi-task LoRA, kNN LoRA average and test-time adaptation
            rows, and generate-then-refine beside few-shot SGD.
        multitask_steps: steps of the multi-task adapter (null: the recipe's steps per task times the tasks).
        polish_steps: (whole-network suites) add the rows 'generated + K task-loss steps' and 'zoo + K
            task-loss steps': full-batch Adam on the task's training split (0: off).
        polish_lr: learning rate of those steps.
        threads: torch CPU threads (null: the global `weightdiff --threads`, else torch's choice).
    """
    import torch

    from weightdiff.evaluate.benchmark import run_benchmark
    from weightdiff.io import check_writable

    check_writable(out, "benchmark folder")
    if threads:
        torch.set_num_threads(threads)
    run_benchmark(suite, model, zoo, out, num=num, steps=steps, sampler=sampler, guidance=guidance,
                  latent_noise=latent_noise, seed=seed,
                  from_description=from_description, max_seen_tasks=max_seen_tasks,
                  max_unseen_tasks=max_unseen_tasks, sgd_tasks=sgd_tasks, sgd_ks=sgd_ks,
                  hypernet_steps=hypernet_steps, functional_loss_weight=functional_loss_weight,
                  batch_size=batch_size, select_per_class=select_per_class, ensemble=ensemble, adaptation=adaptation,
                  multitask_steps=multitask_steps, polish_steps=polish_steps, polish_lr=polish_lr)
    print(f"wrote {out}/results.json and results.md")


def diagnose(model: str, zoo: str, out: str, paths: Sequence[str] | None = None, task: str | None = None,
             max_entries: int | None = 64, num: int = 16, seed: int = 0) -> None:
    """Judge the denoiser at every noise level and along its sampler's path (diagnose.json, diagnose.png).

    Per noise level, on noised training and held-out zoo entries: the x̂0 error of the model against
    returning the noisy input (identity) and against the exact posterior mean of the training
    entries (the memorising oracle), and the accuracy of x̂0; then, along each sampler's path from
    noise, the accuracy of x̂0 and its distance to the nearest training entry.

    Args:
        model: exported generator directory.
        zoo: the zoo it was trained on.
        out: output directory.
        paths: samplers to follow, as sampler:steps, e.g. '[ddim:10, dpm:20]' (a flow-matching
            generator: '[euler:10, euler:20]'); null: the generator's own multi-step sampler at 10
            and 20 steps (ddim, or euler for flow matching).
        task: task the paths sample for (null: the zoo's first training task).
        max_entries: zoo entries per split at each noise level (null: all).
        num: samples per path.
        seed: noise seed.
    """
    from weightdiff.evaluate.diagnose import diagnose_generator, write_report
    from weightdiff.io import check_writable
    from weightdiff.models.generator import load_generator
    from weightdiff.zoo import Zoo

    check_writable(out, "diagnose folder")
    specs = [] if paths is None else list(paths)
    parsed = []
    for spec in specs:
        name, _, steps = spec.partition(":")
        if name not in ("ddim", "ddpm", "dpm", "euler") or not steps.isdigit() or int(steps) < 1:
            raise ConditionError(f"--paths: {spec!r} is not sampler:steps with sampler ddim, ddpm, dpm or euler and "
                                 "steps >= 1")
        parsed.append((name, int(steps)))
    if num < 1:
        raise ConditionError(f"--num must be at least 1, got {num}")
    gen = load_generator(model)
    for spec, (name, _) in zip(specs, parsed):
        try:
            gen.schedule.check_sampler(name)
        except ConditionError as exc:
            raise ConditionError(f"--paths {spec!r}: {exc}") from None
    report = diagnose_generator(gen, Zoo.open(zoo), paths=None if paths is None else parsed, task=task,
                                max_entries=max_entries, num=num, seed=seed)
    json_path, png = write_report(out, report)
    train = report["noise_levels"]["train"]
    t = report["noise_levels"]["timesteps"]
    print(f"x̂0 MSE on training entries at t = {t[0]}: model {train['model_mse'][0]:.4g}, identity "
          f"{train['identity_mse'][0]:.4g}; at t = {t[-1]}: model {train['model_mse'][-1]:.4g}")
    for name, p in report["paths"].items():
        print(f"{name}: final accuracy {100 * p['final_accuracy']:.1f} %, nearest-zoo distance "
              f"{p['final_distance']:.3g} (zoo spacing {p['zoo_spacing']:.3g})")
    print(f"wrote {json_path} and {png}")


def demo(run_dir: str = "runs/demo", zoo_config: str = "configs/zoo/rotdigits-lora.yaml",
         fit_config: str = "configs/rotdigits-lora.yaml", workers: int = 2, quick: bool = False) -> None:
    """The main job: build the default zoo, train, sample from text, benchmark.

    Args:
        run_dir: run folder for every output.
        zoo_config: zoo recipe YAML.
        fit_config: LightningCLI fit config YAML.
        workers: zoo build processes (one per core).
        quick: every stage at test size: tiny zoo, short fit, small benchmark protocol (seconds).
    """
    from weightdiff.demo import run_demo

    run_demo(Path(run_dir), zoo_config=Path(zoo_config), fit_config=Path(fit_config), workers=workers, quick=quick)


ZOO_COMMANDS: dict[str, Callable[..., None]] = {"build": zoo_build, "import": zoo_import, "info": zoo_info,
                                                "verify": zoo_verify}
COMMANDS: dict[str, Callable[..., None]] = {"export": export, "sample": sample, "evaluate": evaluate,
                                            "benchmark": benchmark, "diagnose": diagnose, "demo": demo}
POSITIONAL = (zoo_import, zoo_info, zoo_verify)  # `weightdiff zoo info PATH`: the required argument is positional
