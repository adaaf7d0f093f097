"""Compare sampler settings of one generator on seen and held-out tasks (a quick probe).

    python scripts/sampler_sweep.py --model runs/gen --zoo checkpoints_zoo/rotdigits-lora \
        --setting steps=20 --setting sampler=x0 --setting steps=20,guidance=2

Each setting is ``key=value[,key=value]`` over SamplerSettings fields (steps, sampler, guidance,
seed, temperature, latent_noise); steps and sampler left out are the generator's own (``model_index.json``).
Samples are conditioned on held-out free-text paraphrases; prints the mean test accuracy over
held-out tasks (and per held-out kind) and over every 40th training task. Choose settings on the
seen tasks; the full benchmark (scripts/benchmark.py) is the number to report.
"""

from __future__ import annotations

import argparse
import time

from dataclasses import replace

from weightdiff.evaluate.benchmark import heldout_description
from weightdiff.sampling import (
    SamplerSettings,
    WeightDiffusionPipeline,
    generate_tokens,
    make_condition,
    parse_sampler_setting,
)
from weightdiff.tasks import get_task
from weightdiff.zoo import Zoo



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--zoo", required=True)
    p.add_argument("--setting", type=parse_sampler_setting, action="append", required=True)
    p.add_argument("--num", type=int, default=8, help="samples per task")
    p.add_argument("--seen-stride", type=int, default=40)
    args = p.parse_args()
    gen = WeightDiffusionPipeline.from_pretrained(args.model)
    zoo = Zoo.open(args.zoo)
    kinds = {r["task"]: r.get("heldout_kind") or "unseen" for r in zoo.rows("heldout")}
    groups = {"unseen": sorted(kinds), "seen": sorted({r["task"] for r in zoo.rows("train")})[::args.seen_stride]}
    for kwargs in args.setting:
        settings: SamplerSettings = replace(gen.settings(), **kwargs)
        t0 = time.perf_counter()
        means, by_kind = {}, {}
        for group, names in groups.items():
            accs = []
            for name in names:
                task = get_task(name)
                cond = make_condition(gen, description=heldout_description(task))
                tokens, _ = generate_tokens(gen, cond, args.num, settings, use_cache=False, progress=False)
                x, y = task.data().split("test")
                accs.append(gen.target(task).accuracy(gen.tokenizer.decode_float(tokens), x, y).mean().item())
                if group == "unseen":
                    by_kind.setdefault(kinds[name], []).append(accs[-1])
            means[group] = round(100 * sum(accs) / len(accs), 1)
        means.update({kind: round(100 * sum(a) / len(a), 1) for kind, a in sorted(by_kind.items())})
        print(settings, means, f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
