"""Export a trained generator: a Lightning checkpoint -> the diffusers-style generator folder.

A Lightning ``.ckpt`` is for resuming training only; it is read here with
``torch.load(..., weights_only=True)`` (nothing is unpickled beyond tensors and plain
containers). Everything the export needs is in the checkpoint: the EMA weights, the model's
hyper-parameters, and the datamodule's state — the tokenizer with the statistics fitted at
training time and a record of the zoo (absolute path, counts, the base network's sha256). The
zoo's current contents are never re-read, except the base network's weights of a LoRA zoo, from
the recorded absolute path and checked against the recorded hash. The folder
(:class:`~weightdiff.models.generator.GeneratorArtefact`)::

    <out>/
      model_index.json       components, format_version, default sampler + steps, model id, provenance
      generator/             config.json + diffusion_pytorch_model.safetensors (EMA weights)
      scheduler/             scheduler_config.json of the training scheduler (DDPMScheduler, or
                             FlowMatchEulerDiscreteScheduler for flow matching)
      tokenizer/             layout.json + layout_stats.safetensors (as fitted at training time)
      base/                  (LoRA zoos) model.safetensors + adapter_config.json (+ the zoo's base_spec.json, config.json)
      descriptions.json      (text generators) the descriptions trained on and the held-out paraphrases,
                             from the checkpoint (absent for checkpoints that did not save them)
      README.md              model card
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import torch

from weightdiff.errors import WeightFileError
from weightdiff.io import check_writable, read_json
from weightdiff.models.conditioning import TEST_TIME_SPLIT
from weightdiff.models.generator import GeneratorArtefact, WeightGenerator, check_descriptions
from weightdiff.training.datamodule import ZooDataModule, tokenizer_from_state
from weightdiff.training.module import build_generator, latent_config, schedule_of

_EMA_PREFIX = "ema.module."
_TRAINING_KEYS = ("functional_loss_weight", "functional_weighting", "cond_dropout", "text_dropout", "lr",
                  "weight_decay", "warmup_steps", "ema_decay", "prediction_type", "latent_tokens",
                  "autoencoder_functional_weight", "mean_head", "mean_functional_weight", "mean_clip")
_CARD_ROWS = ("zoo (original)", "generated", "retrieval", "average", "base without adapter", "floor")


def read_lightning_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint safely (``weights_only=True``); errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise WeightFileError(f"{path} is a folder, not a Lightning checkpoint file: give the .ckpt that "
                              "`weightdiff fit` wrote (e.g. <run>/checkpoints/last.ckpt); an exported "
                              "generator folder is already what `sample --model` takes")
    if not path.is_file():
        raise WeightFileError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is a bad file for the user
        raise WeightFileError(f"{path} is not a readable Lightning checkpoint (weights_only=True): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _plain(obj: Any) -> Any:
    """A JSON-ready copy (tuples -> lists; anything else JSON does not know -> str)."""
    return json.loads(json.dumps(obj, default=str))


def export_checkpoint(ckpt: str | Path, out: str | Path, *, results: str | Path | None = None) -> Path:
    """Write the exported generator folder for a Lightning checkpoint (atomically). Returns ``out``.

    Args:
        ckpt: a checkpoint written by ``weightdiff fit``.
        out: the folder to write (replaced as a whole if it exists).
        results: optional benchmark ``results.json`` whose numbers go into the model card.

    Raises:
        WeightFileError: an unreadable checkpoint, one without EMA weights or saved tokenizer, or
            (LoRA) base weights missing or changed since training (naming the file).
        OutputPathError: ``out`` cannot be written (checked first; a disk filling up while writing
            raises it too, and leaves nothing at ``out``).
    """
    check_writable(out, "generator folder")
    state = read_lightning_checkpoint(ckpt)
    dm_key = ZooDataModule.__qualname__
    for key in ("state_dict", "hyper_parameters", "datamodule_hyper_parameters"):
        if key not in state:
            raise WeightFileError(f"{ckpt}: missing '{key}' (not a checkpoint written by `weightdiff fit`)")
    if dm_key not in state:
        raise WeightFileError(f"{ckpt}: missing '{dm_key}' (the tokenizer fitted at training time); the checkpoint "
                              "was written by an older weightdiff, which did not save it: train again to export")
    # LightningCLI stores private keys (e.g. "_instantiator") beside the init arguments.
    hp = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}
    data_hp = {k: v for k, v in state["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    ema = {k[len(_EMA_PREFIX):]: v for k, v in state["state_dict"].items() if k.startswith(_EMA_PREFIX)}
    if not ema:
        raise WeightFileError(f"{ckpt}: no EMA weights (keys '{_EMA_PREFIX}*') in the state dict")
    tokenizer = tokenizer_from_state(state[dm_key]["tokenizer"], str(ckpt))
    zoo: dict[str, Any] = state[dm_key]["zoo"]
    descriptions = state[dm_key].get("descriptions")
    if descriptions is not None:
        descriptions = check_descriptions(_plain(descriptions), f"{ckpt}: '{dm_key}.descriptions'")

    generator = build_generator(hp["spec"], hp["hidden"], hp["depth"], hp["heads"], hp["mlp_ratio"],
                                hp["cross_attention"], hp["condition"], hp.get("text_dropout", 0.0), latent_config(hp),
                                hp.get("window"), hp.get("center_tokens", False), hp.get("mean_head", 0),
                                hp.get("mean_input", "embedding"))
    try:
        generator.load_state_dict(ema, strict=True)
    except RuntimeError as exc:
        raise WeightFileError(f"{ckpt}: the EMA weights do not match the model's hyper-parameters: {exc}") from None
    if generator.autoencoder is not None and not bool(generator.autoencoder.ready):
        raise WeightFileError(f"{ckpt}: a latent generator saved at step {int(state.get('global_step', 0))}, before "
                              f"its autoencoder finished ({hp['autoencoder_steps']} steps): its diffusion is untrained; "
                              "train on and export a later checkpoint")
    generator.eval()
    schedule = schedule_of(hp)
    info: dict[str, Any] = {
        "sampling": {"sampler": schedule.default_sampler(hp.get("sampler")), "steps": hp["num_inference_steps"],
                     "latent_noise": float(hp.get("sampling_latent_noise", 0.0))},
        "zoo": {k: v for k, v in zoo.items() if k not in ("base", "adapter_config")},
        "training": {k: hp.get(k) for k in _TRAINING_KEYS},
        "data": data_hp,
        "global_step": int(state.get("global_step", 0)),
    }
    base_file = adapter_config = None
    if zoo["kind"] == "lora":
        base_file = Path(zoo["base"]["file"])
        info["base"] = {"sha256": zoo["base"]["sha256"], "source": str(base_file)}
        adapter_config = zoo["adapter_config"]
    info = _plain(info)
    bench = read_json(results, "benchmark results") if results is not None else None
    artefact = GeneratorArtefact(generator, schedule.training_scheduler(), tokenizer, info, base_file=base_file,
                                 adapter_config=adapter_config, card=model_card(info, generator, bench, descriptions),
                                 descriptions=descriptions)
    return artefact.save_pretrained(out)


def model_card(info: dict[str, Any], generator: WeightGenerator, results: dict[str, Any] | None = None,
               descriptions: dict[str, Any] | None = None) -> str:
    """The README.md of an exported generator: what it was trained on, how to sample it, its numbers.

    Args:
        descriptions: the ``descriptions.json`` record; an imported zoo's own descriptions give the
            example request.
    """
    zoo, cfg, sampling = info["zoo"], generator.config, info["sampling"]
    what = "LoRA adapters" if zoo["kind"] == "lora" else "whole networks"
    condition = {"text": "a free-text task description", "code": "a task code",
                 "examples": "a few labelled examples of the task",
                 "unlabelled": "a set of unlabelled inputs of the task's domain (no labels)",
                 "none": "nothing (unconditional)"}[cfg.condition]
    own = descriptions is not None and descriptions["source"] == "zoo"
    example = next(iter(descriptions["tasks"].values()))["train"][0] if own else \
        "handwritten digits rotated by 40 degrees"
    request = json.dumps(example, ensure_ascii=False) if cfg.condition == "text" else "task=\"<task>\""
    cli_request = f"--description {shlex.quote(example)}" if cfg.condition == "text" else "--task '<task>'"
    k = info.get("data", {}).get("num_examples")
    unlabelled = [
        "",
        f"The generator reads the inputs alone: {k} of them per condition in training, drawn from each task's "
        f"training split. `--task` draws them from the task's `{TEST_TIME_SPLIT}` split (the batch a "
        "test-time-adaptation method would see; `--examples K` for another K); your own unlabelled inputs of a "
        "new domain go in with `inputs=x` (`(K, *input_shape)`) or `--inputs inputs.safetensors` (or `.npz`).",
    ] if cfg.condition == "unlabelled" else []
    trained = sum(len(t["train"]) for t in descriptions["tasks"].values()) if own else 0
    lines = [
        f"# weightdiff generator: {zoo['name']}",
        "",
        f"A conditional diffusion transformer over weight tokens that generates {what} of the "
        f"`{zoo['family']}` family, conditioned on {condition}.",
        "",
        "| | |", "|---|---|",
        f"| zoo | `{zoo['name']}` ({zoo['kind']}, family `{zoo['family']}`) |",
        f"| training tasks / checkpoints | {zoo.get('num_train_tasks')} / {zoo.get('num_train_checkpoints')} |",
        f"| held-out tasks (never trained on) | {zoo.get('num_heldout_tasks')} |",
        f"| training steps | {info['global_step']} |",
        f"| condition | `{cfg.condition}` |",
        *([f"| descriptions | the zoo's own ({trained} trained on, in `descriptions.json`) |"] if own else []),
        f"| denoiser | DiT, hidden {cfg.hidden}, depth {cfg.depth}, heads {cfg.heads}, "
        f"{cfg.num_tokens} tokens of {cfg.token_size} |",
        f"| sampler | `{sampling['sampler']}`, {sampling['steps']} steps"
        f"{', latent noise ' + format(sampling['latent_noise'], 'g') if sampling.get('latent_noise') else ''} |",
        "",
        "## Use",
        "",
        "```python",
        "from weightdiff.sampling import WeightDiffusionPipeline",
        "",
        "pipe = WeightDiffusionPipeline.from_pretrained(\"<this folder>\")",
        f"out = pipe({request}, num_samples=4, seed=0)",
        "out.save(\"samples/\")  # one folder per sample" + (" (PEFT adapter)" if zoo["kind"] == "lora" else ""),
        "```",
        "",
        "```",
        f"weightdiff sample --model <this folder> {cli_request} --num 4 --out samples/",
        "```",
        *unlabelled,
    ]
    if zoo["kind"] == "lora":
        lines += ["", "Each sample loads with `PeftModel.from_pretrained(base, sample_dir)` on the base network "
                      "in `base/model.safetensors`."]
    if results:
        lines += ["", "## Benchmark (test accuracy, mean over tasks)", "", "| row | seen tasks | unseen tasks |",
                  "|---|---|---|"]
        fmt = lambda section, row: (f"{100 * results[section][row]['mean']:.1f} %"  # noqa: E731
                                    if results.get(section, {}).get(row, {}).get("mean") is not None else "–")
        for row in _CARD_ROWS:
            if row in results.get("seen", {}) or row in results.get("unseen", {}):
                lines.append(f"| {row} | {fmt('seen', row)} | {fmt('unseen', row)} |")
    return "\n".join(lines) + "\n"
