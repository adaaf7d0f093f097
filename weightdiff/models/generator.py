"""The generator: denoiser + condition provider, and an exported generator ready to sample.

:class:`Generator` is everything a sampler needs (and what EMA averages); :func:`sample_tokens`
runs the reverse process for a batch of raw conditions; :func:`load_generator` rebuilds an
exported generator directory strictly. Plain torch: no trainer is needed to sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightdiff.errors import ModelDirError
from weightdiff.io import load_weights, read_json
from weightdiff.models.conditioning import ConditionKind, build_condition
from weightdiff.models.dit import WeightDiT
from weightdiff.models.schedule import SamplerName, ScheduleConfig, denoise
from weightdiff.weights.layout import LAYOUT_FILE
from weightdiff.weights.tokenizer import WeightTokenizer
from weightdiff.targets import Target, make_lora_config

EXPORT_VERSION = 1


class Generator(nn.Module):
    """Denoiser + condition provider: everything a sampler needs, and what EMA averages.

    Args:
        spec: sizes known only after data loading (token size, layout id ranges, raw condition
            sizes); produced by :attr:`weightdiff.data.ZooDataModule.spec`.
    """

    def __init__(self, spec: dict[str, Any], hidden: int, depth: int, heads: int, mlp_ratio: float,
                 cross_attention: bool, condition: ConditionKind, text_dropout: float = 0.0):
        super().__init__()
        self.condition_kind = condition
        extra = {"text_dropout": text_dropout} if condition == "text" else {}
        self.cond = build_condition(condition, hidden, **spec["condition_dims"], **extra)
        self.denoiser = WeightDiT(token_size=spec["token_size"], num_tensors=spec["num_tensors"],
                                  max_chunks=spec["max_chunks"], max_depth=spec["max_depth"],
                                  num_kinds=spec["num_kinds"], hidden=hidden, depth=depth, heads=heads,
                                  mlp_ratio=mlp_ratio, cross_attention=cross_attention)
        ids = spec["token_ids"]
        for key in ("tensor_index", "chunk_index", "depth", "kind"):
            self.register_buffer(f"ids_{key}", torch.as_tensor(ids[key], dtype=torch.long), persistent=False)
        length = torch.as_tensor(spec["token_length"], dtype=torch.long)
        # (L, D) False on the padding at the end of each tensor's last token.
        self.register_buffer("valid", torch.arange(spec["token_size"])[None, :] < length[:, None], persistent=False)

    def embed_condition(self, raw: Any, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Raw condition (see :mod:`weightdiff.conditioning`) -> (B, hidden)."""
        return self.cond(raw, drop)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x_t: (B, L, D), t: (B,), c: (B, hidden) -> (B, L, D)."""
        return self.denoiser(x_t, t, c, tensor_index=self.ids_tensor_index, chunk_index=self.ids_chunk_index,
                             depth=self.ids_depth, kind=self.ids_kind)

    def guided_fn(self, c: torch.Tensor, null: torch.Tensor, guidance: float):
        """Model closure for :func:`weightdiff.schedule.denoise` with classifier-free guidance.

        out = out_null + g · (out_cond - out_null) (Ho & Salimans 2022); g = 1 is plain conditional.
        ``c`` and ``null`` are (B, hidden): the embedded condition and the null embedding.
        """
        if guidance == 1.0 or self.condition_kind == "none":
            return lambda x, t: self(x, t, c)

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            both = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, null]))
            cond_out, null_out = both.chunk(2)
            return null_out + guidance * (cond_out - null_out)

        return fn


@torch.no_grad()
def sample_tokens(net: Generator, raw_cond: Any, num: int, schedule: ScheduleConfig, *, token_size: int,
                  num_tokens: int, steps: int, sampler: SamplerName, guidance: float,
                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Generate ``num`` samples for each row of a raw condition batch.

    Args:
        raw_cond: raw condition batch with R rows (see :mod:`weightdiff.condinputs`).
        noise: optional initial noise (R * num, L, D); otherwise drawn from ``generator``.
    Returns:
        tokens (R * num, L, D), ordered condition-major (all samples of row 0 first).
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    c = net.embed_condition(raw_cond, None)  # (R, H)
    null = net.embed_condition(raw_cond, torch.ones(c.shape[0], dtype=torch.bool, device=device))
    c, null = c.repeat_interleave(num, dim=0), null.repeat_interleave(num, dim=0)  # (R * num, H)
    tokens = denoise(net.guided_fn(c, null, guidance), (c.shape[0], num_tokens, token_size), schedule, steps=steps,
                     sampler=sampler, generator=generator, device=device, noise=noise, valid=net.valid)
    net.train(was_training)
    return tokens


@dataclass
class LoadedGenerator:
    """An exported generator ready to sample: modules, schedule, tokenizer and config."""

    net: Any  # weightdiff.diffusion.Generator (EMA weights)
    schedule: ScheduleConfig
    tokenizer: WeightTokenizer
    config: dict[str, Any]
    path: Path

    @property
    def model_id(self) -> str:
        return self.config["model_id"]

    @property
    def kind(self) -> str:
        return self.config["zoo"]["kind"]

    def base_state(self) -> dict[str, torch.Tensor] | None:
        p = self.path / "base" / "model.safetensors"
        return load_weights(p) if p.exists() else None

    def adapter_config(self) -> dict[str, Any]:
        return read_json(self.path / "base" / "adapter_config.json", "adapter config")

    def target(self, task):
        """The :class:`~weightdiff.nets.Target` that runs this generator's samples on ``task``."""
        net = task.build_network()
        if self.kind != "lora":
            return Target.full(net)
        net.load_state_dict(self.base_state(), strict=True)
        known = set(make_lora_config({}).__dataclass_fields__)
        cfg = {k: v for k, v in self.adapter_config().items() if k in known}
        return Target.lora(net.eval().requires_grad_(False), make_lora_config(cfg))


def load_generator(path: str | Path) -> LoadedGenerator:
    """Load an exported generator directory, checking every file and key."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory not found: {path}")
    for name in ("config.json", "generator.safetensors", "tokenizer"):
        if not (path / name).exists():
            raise ModelDirError(f"{path} is not an exported generator: missing '{name}' "
                                "(create one with `weightdiff export --ckpt <ckpt> --out <dir>`)")
    config = read_json(path / "config.json", "generator config")
    if config.get("format_version") != EXPORT_VERSION:
        raise ModelDirError(f"{path / 'config.json'}: format_version {config.get('format_version')!r}, "
                            f"expected {EXPORT_VERSION}")
    m = config["model"]
    net = Generator(config["spec"], m["hidden"], m["depth"], m["heads"], m["mlp_ratio"], m["cross_attention"],
                    m["condition"])
    weights = load_weights(path / "generator.safetensors")
    expected = net.state_dict()
    for key, value in weights.items():
        if key in expected and value.shape != expected[key].shape:
            raise ModelDirError(f"{path / 'generator.safetensors'}: tensor '{key}' has shape {tuple(value.shape)}, "
                                f"expected {tuple(expected[key].shape)} from config.json")
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelDirError(f"{path / 'generator.safetensors'} does not match config.json: "
                            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    net.eval()
    tokenizer = WeightTokenizer.load(path / "tokenizer")
    spec, layout = config["spec"], tokenizer.layout
    if (layout.token_size, layout.token_length.tolist()) != (spec["token_size"], spec["token_length"]):
        # A layout of another network would only fail after sampling, when decoding the tokens.
        raise ModelDirError(f"{path / 'tokenizer' / LAYOUT_FILE} does not match config.json: the layout has "
                            f"{layout.num_tokens} tokens of size {layout.token_size}, expected "
                            f"{len(spec['token_length'])} tokens of size {spec['token_size']} with the same "
                            "per-token lengths (is the tokenizer from another network?)")
    return LoadedGenerator(net=net, schedule=ScheduleConfig(**config["schedule"]), tokenizer=tokenizer,
                           config=config, path=path)
