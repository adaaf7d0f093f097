"""Pipeline subcommands of the ``weightdiff`` CLI: ``sample``, ``evaluate`` and ``demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from weightdiff.errors import ConditionError



def _cmd_sample(args: argparse.Namespace) -> int:
    from weightdiff.models.generator import load_generator
    from weightdiff.sampling import SamplerSettings, make_condition, sample, select_best

    if args.num < 1:
        raise ConditionError(f"--num must be at least 1, got {args.num}")
    if args.examples is not None and args.task is None:
        raise ConditionError("--examples K draws K labelled examples of a task: give --task too")
    gen = load_generator(args.model)
    cond = make_condition(gen, task=args.task, description=args.description, examples=args.examples,
                          seed=args.seed)
    sampling = gen.config.get("sampling", {})  # the sampler the generator was validated with
    settings = SamplerSettings(steps=args.steps or sampling.get("steps", 20),
                               sampler=args.sampler or sampling.get("sampler", "ddim"),
                               guidance=args.guidance, seed=args.seed, temperature=args.temperature)
    if args.select_with is not None:
        if args.task is None:
            raise ConditionError("--select-with needs --task (the labelled examples come from the task)")
        dirs, info = select_best(gen, cond, args.num, settings, args.out, task=args.task,
                                 examples=args.select_with, candidates=args.candidates,
                                 use_cache=not args.no_cache)
    else:
        dirs, info = sample(gen, cond, args.num, settings, args.out, use_cache=not args.no_cache,
                            batch_size=args.batch_size)
    src = "cache" if info["from_cache"] else f"{info['seconds']:.2f} s"
    print(f"wrote {len(dirs)} samples to {args.out} ({src})")
    return 0


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample weights for a task, a free-text description or labelled examples")
    p.add_argument("--model", required=True, help="exported generator directory (`weightdiff export`)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--task", help="task string, e.g. 'rotdigits:angle=70,flip=0'")
    g.add_argument("--description", help="free-text task description (text-conditioned generators)")
    p.add_argument("--examples", type=int, default=None,
                   help="labelled examples of --task fed to an examples-conditioned generator")
    p.add_argument("--num", type=int, default=4, help="number of samples")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the generator's)")
    p.add_argument("--sampler", choices=["ddim", "dpm", "x0"], default=None,
                   help="ddim / dpm (DPM-Solver++) / x0 (one-step clean estimate); default: the generator's")
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the initial noise")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--select-with", type=int, default=None, metavar="K",
                   help="best-of-k: score candidates on K labelled training examples of --task, keep the best")
    p.add_argument("--candidates", type=int, default=8, help="candidates per kept sample with --select-with")
    p.add_argument("--no-cache", action="store_true", help="bypass the generated-weights cache")
    p.add_argument("--out", required=True, help="output directory (one sub-directory per sample)")
    p.set_defaults(func=_cmd_sample)


def _cmd_demo(args: argparse.Namespace) -> int:
    from weightdiff.demo import run_demo

    run_demo(Path(args.run_dir), zoo_config=Path(args.zoo_config), fit_config=Path(args.fit_config),
             workers=args.workers, quick=args.quick)
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: build the default zoo, train, sample from text, benchmark")
    p.add_argument("--run-dir", default="runs/demo", help="run folder for every output")
    p.add_argument("--zoo-config", default="configs/zoo/rotdigits-lora.yaml")
    p.add_argument("--fit-config", default="configs/rotdigits-lora.yaml")
    p.add_argument("--workers", type=int, default=2, help="zoo build processes (one per core)")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds; used by the tests)")
    p.set_defaults(func=_cmd_demo)


def add_pipeline_parsers(sub) -> None:
    add_sample_parser(sub)
    from weightdiff.evaluate.weights import add_evaluate_parser

    add_evaluate_parser(sub)
    add_demo_parser(sub)

