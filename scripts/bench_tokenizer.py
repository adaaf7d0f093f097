"""Tokenizer throughput against a plain memory copy of the same bytes, measured in one run.

Encodes and decodes a population of checkpoints (copies of a mixed-size state dict with odd
tensor sizes, about ``--megabytes`` of float32 in total) with normalisation on, and times
``torch.Tensor.copy_`` of the same bytes into a preallocated buffer. Best of ``--repeats`` each,
timed round-robin so that every ratio compares functions measured under the same load.

Headline keys (each ``*_ratio`` is memcpy time / path time, from the same round-robin):

- ``encode`` / ``decode``: the stacked paths, ``encode_batch`` of a ``(B, P)`` tensor and
  ``decode_float``, into preallocated outputs; encode includes its NaN/Inf check.
- ``encode_state_dicts`` / ``decode_state_dicts``: state dicts in and out, ``encode_batch`` of a
  list of state dicts (into a preallocated ``out``, NaN/Inf check included) and ``decode_batch``
  returning a list of state dicts (fresh tensors, NaN/Inf check included).

Also reported: encode without the NaN/Inf check and, from a second round-robin, the paths that
allocate one fresh ``(B, L, D)`` or ``(B, P)`` output (``*_alloc``; on CPU dominated by the
first-touch page faults of a ~50-100 MB buffer, which no tokenizer code can avoid).
``state_dict_paths_match`` says whether the state-dict paths gave the same bits as the stacked ones.

    python scripts/bench_tokenizer.py --json runs/bench_tokenizer.json --megabytes 100
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from weightdiff.weights.tokenizer import WeightTokenizer


def realistic_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """~1.1 M float32 parameters: convs, norms, odd-sized linears, a LoRA pair, tiny vectors."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "stem.weight": (37, 3, 5, 5), "stem.bias": (37,),
        "bn0.weight": (37,), "bn0.bias": (37,), "bn0.running_mean": (37,), "bn0.running_var": (37,),
        "conv1.weight": (71, 37, 3, 3), "conv1.bias": (71,),
        "conv2.weight": (129, 71, 3, 3), "conv2.bias": (129,),
        "proj.weight": (517, 129 * 3), "proj.bias": (517,),
        "norm.weight": (517,), "norm.bias": (517,),
        "mlp.fc1.weight": (1031, 517), "mlp.fc1.bias": (1031,),
        "mlp.fc1.lora_A.weight": (13, 517), "mlp.fc1.lora_B.weight": (1031, 13),
        "mlp.fc2.weight": (311, 1031), "mlp.fc2.bias": (311,),
        "head.weight": (10, 311), "head.bias": (10,), "scale": (1,),
    }
    return {k: 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` round-robin rounds.

    Round-robin (memcpy, encode, decode, memcpy, ...) rather than one function after another, so
    that load from other processes and frequency drift hit every measurement alike and the
    ratios stay meaningful on a shared machine.
    """
    for fn in fns.values():
        fn()  # warm-up: caches, allocator, lazy layout buffers
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--megabytes", type=float, default=100.0, help="float32 bytes of the whole population")
    parser.add_argument("--token-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 avoids waiting on "
                             "descheduled worker threads when other jobs share the cores")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    sd = realistic_state_dict()
    params = sum(v.numel() for v in sd.values())
    batch = max(1, round(args.megabytes * 1e6 / (4 * params)))
    population = [{k: v + 0.01 * i for k, v in sd.items()} for i in range(batch)]
    tok = WeightTokenizer.from_state_dict(sd, token_size=args.token_size).fit(population[: min(batch, 8)])
    lay = tok.layout
    nbytes = batch * lay.num_params * 4

    flat = tok.flatten_batch(population)  # (B, P)
    tokens = torch.empty(batch, lay.num_tokens, lay.token_size)
    tokens_sd = torch.empty_like(tokens)  # encode_batch(list) writes here
    decoded = torch.empty(batch, lay.num_params)
    copy_dst = torch.empty_like(flat)

    t = best_times({
        "memcpy": lambda: copy_dst.copy_(flat),
        "encode": lambda: tok.encode_batch(flat, out=tokens),
        "decode": lambda: tok.decode_float(tokens, out=decoded),
        "encode_unchecked": lambda: tok.encode_batch(flat, out=tokens, check_finite=False),
        "encode_state_dicts": lambda: tok.encode_batch(population, out=tokens_sd),
        "decode_state_dicts": lambda: tok.decode_batch(tokens),
    }, args.repeats)
    # Secondary paths, for the record: one fresh output allocation each.
    t.update(best_times({
        "encode_alloc": lambda: tok.encode_batch(flat),
        "decode_alloc": lambda: tok.decode_float(tokens),
        "encode_state_dicts_alloc": lambda: tok.encode_batch(population),
    }, max(1, args.repeats // 2)))

    max_err = float((decoded - flat).abs().max())
    views = tok.decode_float(tokens)  # {name: (B, *shape)}
    match = torch.equal(tokens_sd, tokens) and all(
        torch.equal(sd_b[k], views[k][b]) for b, sd_b in enumerate(tok.decode_batch(tokens)) for k in sd_b)
    gbps = lambda t: nbytes / t / 1e9  # noqa: E731 - a unit conversion, named for the table below
    result = {
        "encode_gbps": gbps(t["encode"]),
        "decode_gbps": gbps(t["decode"]),
        "memcpy_gbps": gbps(t["memcpy"]),
        "encode_ratio": t["memcpy"] / t["encode"],
        "decode_ratio": t["memcpy"] / t["decode"],
        "encode_state_dicts_gbps": gbps(t["encode_state_dicts"]),
        "decode_state_dicts_gbps": gbps(t["decode_state_dicts"]),
        "encode_state_dicts_ratio": t["memcpy"] / t["encode_state_dicts"],
        "decode_state_dicts_ratio": t["memcpy"] / t["decode_state_dicts"],
        "encode_unchecked_gbps": gbps(t["encode_unchecked"]),
        "encode_unchecked_ratio": t["memcpy"] / t["encode_unchecked"],
        **{f"{k}_gbps": gbps(t[k]) for k in ("encode_alloc", "decode_alloc", "encode_state_dicts_alloc")},
        "roundtrip_max_abs_error": max_err,
        "state_dict_paths_match": match,
        "normalize": lay.normalize,
        "checkpoints": batch,
        "params_per_checkpoint": lay.num_params,
        "tensors_per_checkpoint": lay.num_tensors,
        "tokens_per_checkpoint": lay.num_tokens,
        "token_size": lay.token_size,
        "padding_fraction": 1 - lay.num_params / (lay.num_tokens * lay.token_size),
        "bytes": nbytes,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
