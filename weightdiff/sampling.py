"""Sample weights for a task, a free-text description or a few labelled examples.

Samples are generated through the Lightning Trainer's predict loop (so many samples spread over
devices the way training does), in batches bounded by ``batch_size``. Sample ``i`` starts from
noise drawn from its own seed (``seed + i``), so a sample never depends on how samples were
batched or split over devices, and the same request gives bit-identical weights.

Generated tokens are cached under ``$WEIGHTDIFF_CACHE/samples/`` (default
``~/.cache/weightdiff``), keyed by (model id, condition embedding, sampler settings, seed), so a
repeated request returns at once. Each sample directory is written under a temporary name and
renamed when complete: an interrupted run never leaves a half-written sample visible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from weightdiff.models.conditioning import examples_condition, none_condition, text_condition
from weightdiff.models.generator import sample_tokens
from weightdiff.errors import ConditionError, ModelDirError
from weightdiff.models.generator import LoadedGenerator
from weightdiff.io import atomic_path, load_weights, save_weights, write_json
from weightdiff.models.schedule import SamplerName
from weightdiff.tasks import get_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSettings:
    """How samples are drawn.

    ``temperature`` scales the initial noise x_T (1 = the trained prior; < 1 trades diversity
    for samples nearer the conditional mode; 0 with the ``x0`` sampler is deterministic).
    """

    steps: int = 20
    sampler: SamplerName = "ddim"
    guidance: float = 1.0
    seed: int = 0
    temperature: float = 1.0


@dataclass
class Condition:
    """One condition row and a JSON description of where it came from."""

    raw: Any  # raw condition batch with one row
    info: dict[str, Any]


def make_condition(gen: LoadedGenerator, *, task: str | None = None, description: str | None = None,
                   examples: int | None = None, seed: int = 0) -> Condition:
    """Build the raw condition the generator was trained with, from one kind of request.

    ``task``: a task string; the text provider uses its first description, the code provider its
    code, the examples provider draws ``examples`` (default: the training setting) labelled examples.
    ``description``: free text (text provider only); a task never seen in the zoo is fine.
    """
    kind = gen.config["model"]["condition"]
    if sum(v is not None for v in (task, description)) != 1:
        raise ConditionError("give exactly one of --task or --description")
    if description is not None:
        if kind != "text":
            raise ConditionError(f"this generator is conditioned on '{kind}', not on text descriptions; "
                                 "use --task instead")
        return Condition(text_condition([description]), {"description": description})
    t = get_task(task)
    if t.family != _zoo_task_family(gen):
        raise ModelDirError(f"task '{t.name}' is of family '{t.family}', but the generator at {gen.path} was "
                            f"trained on a '{_zoo_task_family(gen)}' zoo")
    info: dict[str, Any] = {"task": t.name}
    if kind == "text":
        desc = t.descriptions()[0]
        info["description"] = desc
        return Condition(text_condition([desc]), info)
    if kind == "code":
        return Condition(t.code().float()[None], info)
    if kind == "examples":
        k = examples or int(gen.config["data"].get("num_examples", 16))
        d = t.data()
        x, y = examples_condition(d.x_train, d.y_train, k, torch.Generator().manual_seed(seed))
        info["examples"] = k
        return Condition((x[None], y[None]), info)
    return Condition(none_condition(1), info)


def _zoo_task_family(gen: LoadedGenerator) -> str:
    return gen.config["zoo"]["family"]


def _cond_bytes(raw: Any) -> bytes:
    parts = raw if isinstance(raw, tuple) else (raw,)
    return b"".join(p.detach().contiguous().numpy().tobytes() for p in parts)


def cache_key(gen: LoadedGenerator, cond: Condition, settings: SamplerSettings, num: int) -> str:
    h = hashlib.sha256()
    h.update(gen.model_id.encode())
    h.update(_cond_bytes(cond.raw))
    h.update(json.dumps({**asdict(settings), "num": num}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _cache_dir() -> Path:
    return Path(os.environ.get("WEIGHTDIFF_CACHE", Path.home() / ".cache" / "weightdiff")) / "samples"


class _SeedDataset(Dataset):
    def __init__(self, num: int):
        self.num = num

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> int:
        return i


class SamplerModule(L.LightningModule):
    """Predict-loop wrapper: each batch is a list of sample indices; returns their tokens."""

    def __init__(self, gen: LoadedGenerator, cond: Condition, settings: SamplerSettings):
        super().__init__()
        self.net = gen.net
        self.gen, self.cond, self.settings = gen, cond, settings

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        spec = self.gen.config["spec"]
        shape = (len(spec["token_length"]), spec["token_size"])
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(self.settings.seed + int(i)))
                             for i in batch]) * self.settings.temperature
        raw = self.cond.raw
        return sample_tokens(self.net, _to_device(raw, self.device), len(batch), self.gen.schedule,
                             token_size=shape[1], num_tokens=shape[0], steps=self.settings.steps,
                             sampler=self.settings.sampler, guidance=self.settings.guidance,
                             noise=noise.to(self.device)).cpu()


def _to_device(raw: Any, device: torch.device) -> Any:
    return tuple(r.to(device) for r in raw) if isinstance(raw, tuple) else raw.to(device)


def generate_tokens(gen: LoadedGenerator, cond: Condition, num: int, settings: SamplerSettings, *,
                    batch_size: int = 64, use_cache: bool = True, progress: bool = True,
                    trainer_kwargs: dict | None = None) -> tuple[torch.Tensor, bool]:
    """Tokens (num, L, D) for one condition, through the predict loop; returns (tokens, from_cache)."""
    if num < 1:
        raise ConditionError(f"--num must be at least 1, got {num}")
    key = cache_key(gen, cond, settings, num)
    path = _cache_dir() / f"{key}.safetensors"
    if use_cache and path.exists():
        return load_weights(path)["tokens"], True
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, **(trainer_kwargs or {}))
    loader = DataLoader(_SeedDataset(num), batch_size=batch_size, shuffle=False,
                        collate_fn=lambda idx: torch.tensor(idx))
    outs = trainer.predict(SamplerModule(gen, cond, settings), loader)
    tokens = torch.cat(outs)
    if use_cache:
        save_weights(path, {"tokens": tokens})
    return tokens, False


def write_samples(gen: LoadedGenerator, tokens: torch.Tensor, cond: Condition, settings: SamplerSettings,
                  out: str | Path, *, seconds: float, prefix: str = "sample") -> list[Path]:
    """Decode tokens and write one directory per sample (atomically). Returns the directories.

    Whole networks are written as ``model.safetensors``; LoRA samples as a PEFT adapter directory
    (``adapter_model.safetensors`` + ``adapter_config.json``) loadable with
    ``PeftModel.from_pretrained`` on the zoo's base network.
    """
    out = Path(out)
    adapter_config = gen.adapter_config() if gen.kind == "lora" else None
    dirs = []
    for i in range(tokens.shape[0]):
        state = gen.tokenizer.decode(tokens[i], base=None)
        dest = out / f"{prefix}_{i:04d}"
        with atomic_path(dest, directory=True) as tmp:
            if gen.kind == "lora":
                save_weights(tmp / "adapter_model.safetensors", state)
                write_json(tmp / "adapter_config.json", adapter_config)
            else:
                save_weights(tmp / "model.safetensors", state)
            write_json(tmp / "sample.json", {
                "condition": cond.info, "seed": settings.seed + i, "index": i,
                "sampler": asdict(settings), "model_id": gen.model_id, "model_dir": str(gen.path.resolve()),
                "kind": gen.kind, "generation_seconds": seconds / tokens.shape[0],
            })
        dirs.append(dest)
    return dirs


def sample(gen: LoadedGenerator, cond: Condition, num: int, settings: SamplerSettings, out: str | Path, *,
           use_cache: bool = True, batch_size: int = 64, progress: bool = True) -> tuple[list[Path], dict]:
    """Generate, decode and write ``num`` samples. Returns (directories, timing info)."""
    t0 = time.perf_counter()
    tokens, cached = generate_tokens(gen, cond, num, settings, batch_size=batch_size, use_cache=use_cache,
                                     progress=progress)
    seconds = time.perf_counter() - t0
    dirs = write_samples(gen, tokens, cond, settings, out, seconds=seconds)
    return dirs, {"seconds": seconds, "from_cache": cached, "num": num}


def select_best(gen: LoadedGenerator, cond: Condition, num: int, settings: SamplerSettings, out: str | Path, *,
                task: str, examples: int, candidates: int = 8, use_cache: bool = True) -> tuple[list[Path], dict]:
    """Best-of-k: generate ``num * candidates`` samples, keep the ``num`` most accurate on
    ``examples`` labelled training examples of ``task``. This uses labelled data, so its results
    are reported as their own row, never mixed with zero-shot samples.
    """
    if examples < 1 or candidates < 1:
        raise ConditionError(f"--select-with and --candidates must be positive, got {examples} and {candidates}")
    t0 = time.perf_counter()
    tokens, cached = generate_tokens(gen, cond, num * candidates, settings, use_cache=use_cache)
    t = get_task(task)
    d = t.data()
    idx = torch.randperm(d.x_train.shape[0], generator=torch.Generator().manual_seed(settings.seed))[:examples]
    params = gen.tokenizer.decode_float(tokens)
    acc = gen.target(t).accuracy(params, d.x_train[idx], d.y_train[idx])  # (num * candidates,)
    keep = torch.argsort(acc, descending=True, stable=True)[:num]
    seconds = time.perf_counter() - t0
    cond = Condition(cond.raw, {**cond.info, "selected_with_examples": examples, "candidates": num * candidates})
    dirs = write_samples(gen, tokens[keep], cond, settings, out, seconds=seconds)
    return dirs, {"seconds": seconds, "from_cache": cached, "num": num,
                  "selection_accuracy": acc[keep].tolist()}
