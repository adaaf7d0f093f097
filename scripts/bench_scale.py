"""Sampling cost against target size: seconds per network, peak resident memory, parameters per second.

For targets of about 10K, 100K, 1M, 10M, 25M and (``--max-params``) more parameters, a windowed
generator (:mod:`weightdiff.models.windows`) samples one whole network window span by window
span and streams each span into a safetensors file (:class:`weightdiff.weights.stream.StreamingWeightWriter`),
so memory is bounded by the span, not by the target. Every size runs in a fresh subprocess, so
its peak RSS (``ru_maxrss``) is its own; all sizes run in one invocation, on one machine.

The targets are layouts of real architectures: the digits MLPs of the ``rotdigits`` base and the
``digits-mlp`` family (a trained zoo exists for those), and ViT-style transformer encoders
above them, laid out from modules built on the meta device (no memory for their weights). The
generator is freshly initialised with the DiT of ``configs/digits-mlp.yaml``: its cost does not
depend on what it learnt, but its samples here are not trained networks.

Writes JSON with ``sizes`` (a list of ``{"params", "seconds", "peak_rss_bytes", ...}``) and
``slope`` (least-squares slope of log seconds on log params over the sizes >= ``--slope-from``),
and a log-log PNG beside it. ``--generator`` also times a trained windowed generator (the
``digits-mlp`` one) through :func:`weightdiff.sampling.sample`, its real path. ``--whole`` also
measures, up to ``--whole-max-params``, the same generator sampled in one piece (every window at
once, decoded at the end), for comparison.

    python scripts/bench_scale.py --json runs/bench_scale.json --threads 1 --whole \
        --generator runs/digits-mlp/generator
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

#: name -> a callable building the target module (on the meta device).
ARCHITECTURES = ("mlp-10k", "mlp-100k", "mlp-1m", "vit-10m", "vit-25m", "vit-86m")


class ViTEncoder(nn.Module):
    """A ViT-style encoder for 8x8 inputs: patch embedding, ``depth`` pre-norm blocks, a head."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        tokens = (8 // patch) ** 2
        self.patch = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(tokens + 1, dim))
        self.cls = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(dim, heads, 4 * dim, batch_first=True,
                                                                norm_first=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)


def build_target(name: str) -> nn.Module:
    from weightdiff.tasks.networks import DigitsMLP, WideMLP

    return {
        "mlp-10k": lambda: DigitsMLP(hidden=128),
        "mlp-100k": lambda: WideMLP(width=256),
        "mlp-1m": lambda: WideMLP(width=1024),
        "vit-10m": lambda: ViTEncoder(dim=384, depth=6, heads=6),
        "vit-25m": lambda: ViTEncoder(dim=512, depth=8, heads=8),
        "vit-86m": lambda: ViTEncoder(dim=768, depth=12, heads=12),
    }[name]()


def layout_of(name: str, token_size: int):
    from weightdiff.weights.layout import TokenLayout

    with torch.device("meta"):
        module = build_target(name)
    shapes = OrderedDict((k, (tuple(v.shape), v.dtype)) for k, v in module.state_dict().items())
    return TokenLayout.from_shapes(shapes, token_size)


def generator_for(layout, args) -> torch.nn.Module:
    from weightdiff.models.generator import WeightGenerator

    torch.manual_seed(0)
    return WeightGenerator(
        token_size=layout.token_size, num_tokens=layout.num_tokens, num_tensors=layout.num_tensors,
        max_chunks=layout.max_chunks, max_depth=layout.max_depth, num_kinds=layout.num_kinds, condition="none",
        hidden=args.hidden, depth=args.depth, heads=args.heads, window=args.window,
        token_layout={"tensor_index": layout.token_tensor_index, "chunk_index": layout.token_chunk_index,
                      "depth": layout.token_depth, "kind": layout.token_kind, "length": layout.token_length}).eval()


def rss_bytes() -> int:
    """Current resident set size (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_trained(args) -> dict:
    """Sample one network with the exported generator ``--generator`` through ``weightdiff.sampling.sample``."""
    from weightdiff.models.generator import load_generator
    from weightdiff.sampling import SamplerSettings, make_condition, sample

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = load_generator(args.generator)
    cond = make_condition(gen, task=gen.info["zoo"]["recipe"]["tasks"][0])
    settings = SamplerSettings(steps=args.steps, sampler=args.sampler, seed=0)
    rss_ready = rss_bytes()
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        t0 = time.perf_counter()
        dirs, _ = sample(gen, cond, 1, settings, Path(tmp) / "samples", use_cache=False, progress=False)
        seconds = time.perf_counter() - t0
        file_bytes = sum(f.stat().st_size for f in dirs[0].iterdir())
    lay = gen.tokenizer.layout
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"architecture": f"trained: {args.generator}", "mode": "trained", "params": lay.num_params,
            "tokens": lay.num_tokens, "windows": -(-lay.num_tokens // gen.generator.config.window),
            "seconds": seconds, "peak_rss_bytes": peak, "rss_before_sampling_bytes": rss_ready,
            "params_per_second": lay.num_params / seconds, "file_bytes": file_bytes,
            "generator_params": sum(p.numel() for p in gen.generator.parameters())}


def measure(name: str, mode: str, args) -> dict:
    """Sample one network of architecture ``name`` in this process; ``mode`` is ``stream`` or ``whole``."""
    if mode == "trained":
        return measure_trained(args)
    from weightdiff.models.generator import sample_tokens, seeded_noise
    from weightdiff.models.schedule import ScheduleConfig
    from weightdiff.models.windows import sample_windows
    from weightdiff.weights.stream import StreamingWeightWriter
    from weightdiff.weights.tokenizer import WeightTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    layout = layout_of(name, args.token_size)
    net = generator_for(layout, args)
    schedule = ScheduleConfig()
    raw = torch.zeros(1, 1)
    rss_ready = rss_bytes()
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        path = Path(tmp) / "model.safetensors"
        t0 = time.perf_counter()
        if mode == "stream":
            with StreamingWeightWriter(path, layout, metadata={"format": "pt"}) as writer:
                for start, tokens in sample_windows(net, raw, [0], schedule, steps=args.steps, sampler=args.sampler,
                                                    windows_per_span=args.windows_per_span):
                    writer.write_tokens(tokens[0], start)
        else:
            from weightdiff.io import save_weights

            noise = seeded_noise([0], net.sample_shape, 1.0, window=args.window)
            tokens = sample_tokens(net, raw, 1, schedule, steps=args.steps, sampler=args.sampler, guidance=1.0,
                                   noise=noise)
            save_weights(path, WeightTokenizer(layout).decode(tokens[0]), metadata={"format": "pt"})
        seconds = time.perf_counter() - t0
        file_bytes = path.stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"architecture": name, "mode": mode, "params": layout.num_params, "tokens": layout.num_tokens,
            "windows": -(-layout.num_tokens // args.window), "seconds": seconds, "peak_rss_bytes": peak,
            "rss_before_sampling_bytes": rss_ready, "params_per_second": layout.num_params / seconds,
            "file_bytes": file_bytes, "generator_params": sum(p.numel() for p in net.parameters())}


def fit_slope(points: list[dict], start: int) -> float | None:
    """Least-squares slope of log seconds on log params over points with ``params >= start``."""
    sel = [(math.log(p["params"]), math.log(p["seconds"])) for p in points if p["params"] >= start]
    if len(sel) < 2:
        return None
    mx = sum(x for x, _ in sel) / len(sel)
    my = sum(y for _, y in sel) / len(sel)
    return sum((x - mx) * (y - my) for x, y in sel) / sum((x - mx) ** 2 for x, _ in sel)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    ax_t, ax_m = fig.subplots(1, 2)
    for mode, marker in (("stream", "o-"), ("whole", "s--")):
        pts = [p for p in result["sizes"] + result["whole"] if p["mode"] == mode]
        if not pts:
            continue
        xs = [p["params"] for p in pts]
        ax_t.loglog(xs, [p["seconds"] for p in pts], marker, label=f"{mode}")
        ax_m.loglog(xs, [p["peak_rss_bytes"] / 2**20 for p in pts], marker, label=f"{mode}")
    for p in result["trained"]:
        ax_t.loglog([p["params"]], [p["seconds"]], "k*", markersize=12, label="trained generator (sample)")
        ax_m.loglog([p["params"]], [p["peak_rss_bytes"] / 2**20], "k*", markersize=12, label="trained generator")
    slope = result["slope"]
    ax_t.set_title(f"sampling time per network (slope {slope:.2f} from {result['slope_from']:.0e})"
                   if slope is not None else "sampling time per network")
    ax_t.set_xlabel("target parameters")
    ax_t.set_ylabel("seconds")
    ax_m.set_title("peak resident memory")
    ax_m.set_xlabel("target parameters")
    ax_m.set_ylabel("MiB")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where to write the results (a PNG goes beside it)")
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--token-size", type=int, default=1024)
    parser.add_argument("--window", type=int, default=64, help="tokens per attention window")
    parser.add_argument("--windows-per-span", type=int, default=4, help="windows denoised together")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--slope-from", type=float, default=1e6, help="fit the slope over sizes >= this")
    parser.add_argument("--whole", action="store_true", help="also sample in one piece, for comparison")
    parser.add_argument("--whole-max-params", type=float, default=3e7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads per measurement")
    parser.add_argument("--generator", type=Path, default=None,
                        help="an exported windowed generator (e.g. of the digits-mlp zoo), also timed through "
                             "`weightdiff.sampling.sample` at its own size")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the sampled files (deleted)")
    parser.add_argument("--one", nargs=2, metavar=("ARCH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child process: one measurement, JSON on stdout
        print(json.dumps(measure(args.one[0], args.one[1], args)))
        return {}

    def child(name: str, mode: str) -> dict:
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
        cmd = [sys.executable, __file__, *forwarded, "--one", name, mode]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"bench_scale: measuring {name} ({mode}) failed:\n{done.stderr[-2000:]}")
        point = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:>9} {mode:>6}: {point['params']:>11,d} params  {point['seconds']:8.2f} s  "
              f"peak RSS {point['peak_rss_bytes'] / 2**20:8.1f} MiB  {point['params_per_second']:12,.0f} params/s",
              flush=True)
        return point

    sizes = [child(name, "stream") for name in args.architectures]
    trained = [child("trained", "trained")] if args.generator is not None else []
    whole = [child(name, "whole") for name in args.architectures
             if args.whole and layout_of(name, args.token_size).num_params <= args.whole_max_params]
    result = {
        "sizes": sizes,
        "slope": fit_slope(sizes, args.slope_from),
        "slope_from": args.slope_from,
        "whole": whole,
        "trained": trained,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if k not in ("json", "one", "scratch")},
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.json.with_suffix(".png"))
    print(f"slope (sizes >= {args.slope_from:.0e}): {result['slope']}")
    return result


if __name__ == "__main__":
    main()
