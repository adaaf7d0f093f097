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
from weightdiff.weights.layout import LAYOUT_FILE
from weightdiff.models.schedule import ScheduleConfig
from weightdiff.weights.tokenizer import WeightTokenizer

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
    from weightdiff.training.datamodule import ZooDataModule

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
