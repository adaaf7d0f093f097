"""Export a trained generator: EMA weights + tokenizer layout + config, as safetensors/JSON.

A Lightning ``.ckpt`` is for resuming training only; it is read here with
``torch.load(..., weights_only=True)`` (nothing is unpickled beyond tensors and plain
containers). The exported directory is the artefact that ``weightdiff sample`` loads::

    <out>/
      config.json            model hyper-parameters, spec, noise schedule, zoo info, model id
      generator.safetensors  EMA weights of the denoiser + condition provider
      tokenizer/             TokenLayout JSON + normalisation statistics (safetensors)
      base/model.safetensors (LoRA zoos) the frozen base network the adapters plug into

Loading (:func:`load_generator`) rebuilds the modules from ``config.json`` and loads the weights
strictly, so a directory whose files disagree raises an error naming the key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightdiff.errors import ModelDirError, WeightFileError
from weightdiff.io import atomic_path, load_weights, read_json, save_weights, write_json
from weightdiff.layout import LAYOUT_FILE
from weightdiff.schedule import ScheduleConfig
from weightdiff.tokenizer import WeightTokenizer

EXPORT_VERSION = 1
_EMA_PREFIX = "ema.module."


def read_lightning_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint safely (``weights_only=True``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a bad file for the user
        raise WeightFileError(f"{path} is not a readable Lightning checkpoint (weights_only=True): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Write the exported generator directory for a Lightning checkpoint. Returns ``out``."""
    # Imported here: the zoo/datamodule are needed only to rebuild the tokenizer and base.
    from weightdiff.data import ZooDataModule

    state = read_lightning_checkpoint(ckpt)
    for key in ("state_dict", "hyper_parameters", "datamodule_hyper_parameters"):
        if key not in state:
            raise WeightFileError(f"{ckpt}: missing '{key}' (not a checkpoint written by `weightdiff fit`)")
    # LightningCLI stores private keys (e.g. "_instantiator") beside the init arguments.
    hp = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}
    data_hp = {k: v for k, v in state["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    ema = {k[len(_EMA_PREFIX):]: v for k, v in state["state_dict"].items() if k.startswith(_EMA_PREFIX)}
    if not ema:
        raise WeightFileError(f"{ckpt}: no EMA weights (keys '{_EMA_PREFIX}*') in the state dict")
    ema.pop("n_averaged", None)
    dm = ZooDataModule(**data_hp)
    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        save_weights(tmp / "generator.safetensors", ema)
        dm.tokenizer.save(tmp / "tokenizer")
        zoo = dm.zoo
        if zoo.kind == "lora":
            save_weights(tmp / "base" / "model.safetensors", zoo.base_state())
            write_json(tmp / "base" / "adapter_config.json", zoo.adapter_config())
        model_id = hashlib.sha256((tmp / "generator.safetensors").read_bytes()).hexdigest()[:16]
        schedule = ScheduleConfig(hp["num_train_timesteps"], hp["beta_schedule"], hp["prediction_type"])
        config = {
            "format_version": EXPORT_VERSION,
            "model_id": model_id,
            "model": {k: hp[k] for k in ("hidden", "depth", "heads", "mlp_ratio", "cross_attention", "condition")},
            "spec": hp["spec"],
            "schedule": schedule.to_dict(),
            "sampling": {"sampler": hp["val_sampler"], "steps": hp["val_steps"]},
            "training": {k: hp.get(k) for k in ("functional_loss_weight", "functional_weighting", "cond_dropout",
                                                "text_dropout", "lr", "ema_decay")},
            "data": data_hp,
            "zoo": {**hp["spec"]["zoo"], "recipe": zoo.recipe},
            "global_step": int(state.get("global_step", 0)),
        }
        write_json(tmp / "config.json", json.loads(json.dumps(config, default=str)))
    return out


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
        from weightdiff.nets import Target, make_lora_config

        net = task.build_network()
        if self.kind != "lora":
            return Target.full(net)
        net.load_state_dict(self.base_state(), strict=True)
        known = set(make_lora_config({}).__dataclass_fields__)
        cfg = {k: v for k, v in self.adapter_config().items() if k in known}
        return Target.lora(net.eval().requires_grad_(False), make_lora_config(cfg))


def load_generator(path: str | Path) -> LoadedGenerator:
    """Load an exported generator directory, checking every file and key."""
    from weightdiff.diffusion import Generator

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
