"""Sample weights for a task, a free-text description, a few labelled examples or unlabelled inputs.

:class:`WeightDiffusionPipeline` is the exported generator as a callable, diffusers-style
pipeline (plain torch)::

    >>> pipe = WeightDiffusionPipeline.from_pretrained("runs/demo/generator")
    >>> out = pipe("handwritten digits rotated by 40 degrees", num_samples=4, seed=0)
    >>> out.save("samples/")   # sample_0000/ ... : PEFT adapter folders (or model.safetensors)

Samples are drawn in batches bounded by ``batch_size``. Sample ``i`` starts from noise drawn from
its own seed (``seed + i``), so a sample never depends on how samples were batched or split over
devices, and the same request gives bit-identical weights. Large jobs can spread over several
devices through Lightning's predict loop (:func:`weightdiff.training.predict.predict_tokens`, passed
to :func:`generate_tokens` as ``generate``) around
the same core; ``import weightdiff.sampling`` itself never imports Lightning.

The functions :func:`make_condition`, :func:`generate_tokens`, :func:`sample` and
:func:`select_best` work on any loaded generator (:func:`weightdiff.models.generator.load_generator`).
:func:`generate_tokens` caches tokens under ``$WEIGHTDIFF_CACHE/samples/`` (default
``~/.cache/weightdiff``), keyed by (model id, condition, sampler settings, number), so a repeated
request returns at once; an unreadable cache file is discarded and an unwritable cache folder
skipped, with a warning (a cache is never needed).

:func:`sample` streams: it generates and writes ``batch_size`` samples at a time, so memory holds
one batch whatever ``num`` (at most :data:`MAX_SAMPLES`). It writes only into an empty or new
folder (``overwrite=True`` replaces a non-empty one as a whole, atomically), so samples of two
requests never mix. Each sample directory is written under a temporary name and renamed when
complete: an interrupted run, Ctrl-C or SIGTERM, never leaves a half-written sample visible, and
temporaries that a killed run left behind are removed by the next run into the same folder.
A windowed generator's samples (:mod:`weightdiff.models.windows`) are written span by span as
they are denoised, so memory holds one span of a batch, whatever the size of the network.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from weightdiff.errors import ConditionError, ModelDirError, WeightDiffError
from weightdiff.io import atomic_path, load_weights, save_weights, write_json
from weightdiff.models.conditioning import (
    DEFAULT_NUM_EXAMPLES, TEST_TIME_SPLIT, check_description, check_unlabelled_inputs, examples_condition,
    none_condition, text_condition, unlabelled_inputs,
)
from weightdiff.models.generator import (
    GeneratorArtefact,
    sample_tokens,
    seeded_latent_noise,
    seeded_noise,
    seeded_step_noise,
)
from weightdiff.models.schedule import DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_SAMPLER, SamplerName
from weightdiff.models.windows import sample_windows
from weightdiff.outputs import output_folder, terminate_as_exit
from weightdiff.targets import (
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, BASE_PATH_FIELD, FULL_WEIGHTS_FILE, base_path_for,
)
from weightdiff.tasks import get_family, get_task
from weightdiff.tasks.numeric import numeric_reader
from weightdiff.weights.stream import StreamingWeightWriter

log = logging.getLogger(__name__)

#: ``(gen, cond, num, settings, *, batch_size, progress) -> tokens (num, L, D)``: a sampling core.
TokenGenerator = Callable[..., torch.Tensor]

#: safetensors metadata of every written weight file (as transformers / diffusers / PEFT write it).
WEIGHTS_METADATA = {"format": "pt"}
SAMPLE_FILE = "sample.json"
MAX_SAMPLES = 100_000  # samples one request may ask for (--num; --num x --candidates with --select-with)
SEED_LIMIT = 2 ** 63  # torch.Generator.manual_seed takes seeds below this; sample i uses seed + i
INPUT_SUFFIXES = (".safetensors", ".npz")  # files of unlabelled inputs that --inputs reads
INPUTS_KEY = "x"  # the array --inputs takes from a file that holds several
#: Unlabelled inputs ``(K, *input_shape)`` or ``(K, x_dim)``, or a file of them (:func:`read_inputs`).
UnlabelledInputs = torch.Tensor | str | os.PathLike

ACCEPTED_REQUESTS = {  # what a request may give, per condition kind of the generator
    "text": "--description, or --task (whose first description is used)",
    "code": "--task (its task code)",
    "examples": "--task with optional --examples K (K labelled examples of it)",
    "unlabelled": (f"--task with optional --examples K (K unlabelled inputs of its {TEST_TIME_SPLIT} split), or "
                   "--inputs FILE (unlabelled inputs of your own)"),
    "none": "--task (only its family is checked: the generator is unconditional)",
}


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplerSettings:
    """How samples are drawn.

    ``temperature`` scales the initial noise x_T (1 = the trained prior; < 1 trades diversity
    for samples nearer the conditional mode; 0 with the ``x0`` sampler is deterministic).
    ``latent_noise`` (latent generators only): std of Gaussian noise added to each sampled latent
    before the decoder (in the diffused latent's units, unit std over the zoo); 0 = off.
    """

    steps: int = DEFAULT_NUM_INFERENCE_STEPS
    sampler: SamplerName = DEFAULT_SAMPLER
    guidance: float = 1.0
    seed: int = 0
    temperature: float = 1.0
    latent_noise: float = 0.0

    def __post_init__(self) -> None:
        if not _whole(self.steps) or self.steps < 1:
            raise ConditionError(f"--steps must be a whole number of at least 1, got {self.steps!r}")
        if not _whole(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise ConditionError(f"--seed must be a whole number in [0, 2**63), got {self.seed!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConditionError(f"--temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (math.isfinite(self.latent_noise) and self.latent_noise >= 0):
            raise ConditionError(f"--latent-noise must be a finite number >= 0, got {self.latent_noise!r}")
        if not math.isfinite(self.guidance):
            raise ConditionError(f"--guidance must be a finite number, got {self.guidance!r}")


@dataclass
class Condition:
    """One condition row and a JSON description of where it came from."""

    raw: Any  # raw condition batch with one row
    info: dict[str, Any]


@dataclass
class WeightSamples:
    """Generated weight sets, with the condition and settings that produced them.

    Attributes:
        state_dicts: one state dict per sample, with the zoo's tensor names, shapes and dtypes
            (PEFT adapter keys for LoRA generators).
        condition: where the condition came from (task, description, examples, inputs).
        settings: the sampler settings.
        seeds: the seed of each sample's initial noise.
        kind: ``"lora"`` (PEFT adapters) or ``"full"`` (whole networks).
        adapter_config: (LoRA) the PEFT ``adapter_config.json`` written beside each adapter.
        model_id, model_dir: the generator that made them.
        family: the task family of the generator's zoo (``rotdigits``), so a sample says which tasks
            it is for.
        base_sha256: (LoRA) sha256 of the base network the adapters were generated for.
        seconds: generation wall time for all samples.
    """

    state_dicts: list[dict[str, torch.Tensor]]
    condition: dict[str, Any]
    settings: SamplerSettings
    seeds: list[int]
    kind: str
    model_id: str
    model_dir: str | None
    seconds: float
    adapter_config: dict[str, Any] | None = None
    tokens: torch.Tensor | None = field(default=None, repr=False)  # (S, L, D) normalised tokens
    family: str | None = None
    base_sha256: str | None = None

    def __len__(self) -> int:
        return len(self.state_dicts)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The samples batched: ``{name: (S, *shape)}`` (what :class:`~weightdiff.targets.Target` evaluates)."""
        return {k: torch.stack([sd[k] for sd in self.state_dicts]) for k in self.state_dicts[0]}

    def save(self, out_dir: str | Path, prefix: str = "sample", first: int = 0) -> list[Path]:
        """Write ``<out_dir>/<prefix>_0000`` ... , each atomically; returns the directories.

        LoRA samples are PEFT adapter folders (``adapter_model.safetensors`` +
        ``adapter_config.json``) loadable with ``PeftModel.from_pretrained`` on the base network;
        ``base_model_name_or_path`` names the generator's ``base/`` relative to the sample folder
        when both are on one tree (:func:`~weightdiff.targets.base_path_for`), so a folder tree
        holding both can be moved. Whole networks are ``model.safetensors``. Each folder also
        holds ``sample.json``.
        ``first`` is the index of the first sample (a batch of a longer request).
        """
        out = Path(out_dir)
        dirs = []
        for i, state in enumerate(self.state_dicts):
            dest = out / f"{prefix}_{first + i:04d}"
            with atomic_path(dest, directory=True) as tmp:
                self.write_folder(tmp, dest, i, first, self.seconds / len(self.state_dicts),
                                  lambda path, state=state: save_weights(path, state, metadata=WEIGHTS_METADATA))
            dirs.append(dest)
        return dirs

    def write_folder(self, tmp: Path, dest: Path, i: int, first: int, seconds: float,
                     write_weights: Callable[[Path], None]) -> None:
        """Fill the temporary folder ``tmp`` of sample ``first + i`` (published as ``dest``):
        ``write_weights(path)`` writes its weight file; the adapter config and ``sample.json`` are written here."""
        if self.kind == "lora":
            assert self.adapter_config is not None
            write_weights(tmp / ADAPTER_WEIGHTS_FILE)
            base = base_path_for(self.adapter_config.get(BASE_PATH_FIELD), dest)  # tmp is dest's sibling
            write_json(tmp / ADAPTER_CONFIG_FILE, {**self.adapter_config, BASE_PATH_FIELD: base})
        else:
            write_weights(tmp / FULL_WEIGHTS_FILE)
        write_json(tmp / SAMPLE_FILE, {
            "condition": self.condition, "seed": self.seeds[i], "index": first + i,
            "sampler": asdict(self.settings), "model_id": self.model_id, "model_dir": self.model_dir,
            "kind": self.kind, "family": self.family, "base_sha256": self.base_sha256,
            "generation_seconds": seconds,
        })


class WeightDiffusionPipeline(GeneratorArtefact):
    """An exported generator as a callable pipeline: ``from_pretrained`` / ``save_pretrained`` / ``__call__``.

    ``WeightDiffusionPipeline.from_pretrained(path)`` loads and checks an exported folder
    (:class:`~weightdiff.models.generator.GeneratorArtefact`); ``save_pretrained(path)`` writes it
    atomically. The sampler defaults (``model_index.json``, ``sampling``) are those the
    generator was trained and validated with.
    """

    def condition(self, description: str | None = None, *, task: str | None = None,
                  examples: tuple[torch.Tensor, torch.Tensor] | None = None, num_examples: int | None = None,
                  inputs: UnlabelledInputs | None = None, seed: int = 0) -> Condition:
        """The raw condition of one request (exactly one of ``description``, ``task``, ``examples``, ``inputs``).

        Args:
            description: free text (text-conditioned generators); a task never seen in the zoo is fine.
            task: a task string: its first description, its code, ``num_examples`` labelled
                examples drawn with ``seed`` from its training split, as the generator was trained, or
                ``num_examples`` unlabelled inputs drawn with ``seed`` from its test split
                (:func:`~weightdiff.models.conditioning.unlabelled_inputs`).
            examples: labelled examples ``(x (K, ...), y (K,))`` (examples-conditioned generators).
            inputs: unlabelled inputs ``(K, ...)``, or a ``.safetensors`` / ``.npz`` file of them
                (:func:`read_inputs`), for unlabelled-conditioned generators.
        """
        if sum(v is not None for v in (description, task, examples, inputs)) != 1:
            raise ConditionError("give exactly one of description, task, examples or inputs")
        if examples is None:
            return _condition(self, task=task, description=description, examples=num_examples, inputs=inputs,
                              seed=seed)
        kind = self.config["model"]["condition"]
        if kind != "examples":
            hint = "; pass unlabelled inputs alone as inputs=x" if kind == "unlabelled" else ""
            raise ConditionError(f"this generator is conditioned on '{kind}', not on labelled examples{hint}")
        x, y = (torch.as_tensor(v) for v in examples)
        if x.dim() < 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ConditionError(f"examples must be (x (K, ...), y (K,)), got x {tuple(x.shape)} and y {tuple(y.shape)}")
        return Condition((x.flatten(1).float()[None], y.long()[None]), {"examples": int(x.shape[0])})

    def settings(self, num_inference_steps: int | None = None, sampler: SamplerName | None = None,
                 guidance_scale: float = 1.0, seed: int = 0, temperature: float = 1.0,
                 latent_noise: float | None = None) -> SamplerSettings:
        """Sampler settings, defaulting to the generator's own sampler, number of steps and latent noise."""
        default = self.info["sampling"]
        settings = SamplerSettings(steps=default["steps"] if num_inference_steps is None else num_inference_steps,
                                   sampler=sampler or default["sampler"], guidance=guidance_scale, seed=seed,
                                   temperature=temperature,
                                   latent_noise=default.get("latent_noise", 0.0) if latent_noise is None
                                   else latent_noise)
        check_settings_fit(self, settings)
        return settings

    def __call__(self, description: str | None = None, *, task: str | None = None,
                 examples: tuple[torch.Tensor, torch.Tensor] | None = None, num_samples: int = 1,
                 num_inference_steps: int | None = None, sampler: SamplerName | None = None,
                 guidance_scale: float = 1.0, seed: int = 0, temperature: float = 1.0,
                 latent_noise: float | None = None, batch_size: int = 64,
                 num_examples: int | None = None, inputs: UnlabelledInputs | None = None,
                 progress: bool = False) -> WeightSamples:
        """Generate ``num_samples`` weight sets for one condition.

        Args:
            description, task, examples, num_examples, inputs: the condition (see :meth:`condition`).
            num_inference_steps, sampler: default: the generator's (``model_index.json``).
            guidance_scale: classifier-free guidance scale (1 = plain conditional).
            seed: sample ``i`` starts from noise drawn from seed ``seed + i``.
            temperature: scale of the initial noise.
            latent_noise: (latent generators) std of the noise added to each latent before decoding
                (default: the generator's).
            batch_size: samples per forward batch (bounds memory; results do not depend on it).
        Returns:
            :class:`WeightSamples` (``.save(out_dir)`` writes them).
        """
        cond = self.condition(description, task=task, examples=examples, num_examples=num_examples,
                              inputs=inputs, seed=seed)
        settings = self.settings(num_inference_steps, sampler, guidance_scale, seed, temperature, latent_noise)
        t0 = time.perf_counter()
        tokens = _generate(self, cond, num_samples, settings, batch_size=batch_size, progress=progress)
        return _samples(self, tokens, cond, settings, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ conditions
def make_condition(gen: GeneratorArtefact, *, task: str | None = None, description: str | None = None,
                   examples: int | None = None, inputs: UnlabelledInputs | None = None, seed: int = 0) -> Condition:
    """Build the raw condition the generator was trained with, from one kind of request.

    ``task``: a task string; the text provider uses its first description (the first one the
    generator was trained on when it recorded them, e.g. an imported zoo's own; else the family's),
    the code provider its code, the examples provider draws ``examples`` (default: the training
    setting, :func:`num_examples`) labelled examples of its training split, the unlabelled provider
    ``examples`` unlabelled inputs of its test split (:data:`~weightdiff.models.conditioning.TEST_TIME_SPLIT`,
    drawn by :func:`~weightdiff.models.conditioning.unlabelled_inputs` with ``seed``).
    ``description``: free text (text provider only); a task never seen in the zoo is fine.
    ``inputs``: (unlabelled provider) unlabelled inputs ``(K, ...)`` of a domain, or a
    ``.safetensors`` / ``.npz`` file of them (:func:`read_inputs`); no task needed.
    """
    if sum(v is not None for v in (task, description, inputs)) != 1:
        raise ConditionError("give exactly one of --task, --description or --inputs")
    return _condition(gen, task=task, description=description, examples=examples, inputs=inputs, seed=seed)


def num_examples(gen: GeneratorArtefact) -> int:
    """The examples (labelled or unlabelled) per condition the generator was trained with."""
    return int(gen.config["data"].get("num_examples", DEFAULT_NUM_EXAMPLES))


def read_inputs(path: str | os.PathLike) -> torch.Tensor:
    """The unlabelled inputs in a ``.safetensors`` or ``.npz`` file: its only array, or the one named ``x``.

    Nothing is unpickled (``.npz`` is read with ``allow_pickle=False``).

    Raises:
        ConditionError: naming the file: missing, of another suffix, unreadable, holding no real-valued
            array, or several arrays none of which is named ``x``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise ConditionError(f"--inputs {path}: expected a {' or '.join(INPUT_SUFFIXES)} file of unlabelled "
                             "inputs (K, *input_shape)")
    if not path.is_file():
        raise ConditionError(f"--inputs {path}: no such file")
    try:
        if suffix == ".safetensors":
            arrays = load_weights(path, check_nonfinite=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
    except WeightDiffError as exc:
        raise ConditionError(f"--inputs {exc}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConditionError(f"--inputs {path}: cannot be read as {suffix}: {' '.join(str(exc).split())}") from None
    if len(arrays) != 1 and INPUTS_KEY not in arrays:
        raise ConditionError(f"--inputs {path}: holds arrays {sorted(arrays)}; expected one array, or one named "
                             f"'{INPUTS_KEY}', of unlabelled inputs (K, *input_shape)")
    name, x = (INPUTS_KEY, arrays[INPUTS_KEY]) if INPUTS_KEY in arrays else next(iter(arrays.items()))
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iuf":
            raise ConditionError(f"--inputs {path}: array '{name}' has dtype {x.dtype}, expected real numbers")
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x


def _condition(gen: GeneratorArtefact, *, task: str | None, description: str | None, examples: int | None,
               inputs: UnlabelledInputs | None, seed: int) -> Condition:
    kind = gen.config["model"]["condition"]
    family = gen.config["zoo"]["family"]
    accepts = f"this generator is conditioned on '{kind}' and accepts {ACCEPTED_REQUESTS.get(kind, '--task')}"
    if description is not None and kind != "text":
        raise ConditionError(f"--description: {accepts}; use --task instead")
    if inputs is not None and kind != "unlabelled":
        raise ConditionError(f"--inputs: {accepts}")
    if examples is not None and kind not in ("examples", "unlabelled"):
        raise ConditionError(f"--examples {examples}: {accepts}")
    if examples is not None and (not _whole(examples) or examples < 1):
        raise ConditionError(f"--examples must be a whole number of at least 1, got {examples!r}")
    if inputs is not None:
        if examples is not None:
            raise ConditionError(f"--examples {examples} draws inputs of a --task; --inputs gives them: give one")
        given = isinstance(inputs, (str, os.PathLike))
        source = str(inputs) if given else "inputs"
        x = check_unlabelled_inputs(read_inputs(inputs) if given else inputs, gen.generator.cond.x_dim, source)
        return Condition(x[None], {"inputs": source, "examples": int(x.shape[0]),
                                   "model_input": f"{x.shape[0]} unlabelled inputs given in {source}"})
    if description is not None:
        return _text(gen, check_description(description, name="--description"), {"description": description}, family)
    t = get_task(task)
    if t.family != family:
        raise ModelDirError(f"task '{t.name}' is of family '{t.family}', but the generator at {gen.path} was "
                            f"trained on a '{family}' zoo")
    info: dict[str, Any] = {"task": t.name}
    if kind == "text":
        desc = gen.task_description(t.name) or t.descriptions()[0]
        return _text(gen, desc, {**info, "description": desc}, family)
    if kind == "code":
        code = t.code().float()
        return Condition(code[None], {**info, "model_input": f"task code {_rounded(code)}"})
    k = examples if examples is not None else num_examples(gen)
    if kind == "examples":
        d = t.data()
        x, y = examples_condition(d.x_train, d.y_train, k, torch.Generator().manual_seed(seed))
        return Condition((x[None], y[None]), {**info, "examples": k, "model_input": f"{k} labelled training examples "
                                              f"of the task (drawn with seed {seed})"})
    if kind == "unlabelled":
        x = unlabelled_inputs(t, k, seed, TEST_TIME_SPLIT)
        return Condition(x.flatten(1)[None], {**info, "examples": k, "split": TEST_TIME_SPLIT, "seed": seed,
                                              "model_input": f"{k} unlabelled inputs of the task's {TEST_TIME_SPLIT} "
                                                             f"split (drawn with seed {seed}; no labels)"})
    return Condition(none_condition(1), {**info, "model_input": "nothing (unconditional generator)"})


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in values]


def _text(gen: GeneratorArtefact, description: str, info: dict[str, Any], family: str) -> Condition:
    """The text condition of one description, recording what was read from it and what reaches the model.

    The family reads the numbers of the description (``Task.description_features``, named by
    ``Task.NUMERIC_FIELDS``; what it read, ``Task.description_numbers``, is recorded) and says
    why it cannot condition its tasks (``Task.description_problem``, e.g. ``rotdigits``: no
    readable angle, which would reach the model as ``has_angle = 0``, never seen in training):
    refused when the model reads the numbers, a warning when it reads the text alone.
    """
    numeric_dim = gen.generator.cond.numeric_dim
    reader = numeric_reader(family, numeric_dim)  # the family's own, or the angle/mirror one it was trained with
    numeric = getattr(gen.generator.cond, "numeric_mlp", None) is not None
    problem = get_family(family).description_problem(description)
    if problem is not None:
        if numeric:
            raise ConditionError(f"--{problem}")
        log.warning("--%s; this generator reads the text embedding alone, so it samples anyway, conditioned on a "
                    "text unlike its training descriptions", problem)
    raw = text_condition([description], family, numeric_dim)
    features = raw[0, raw.shape[1] - numeric_dim:] if numeric else None
    model_input = (f"text embedding + numeric features [{', '.join(reader.fields)}] = {_rounded(features)}"
                   if numeric else "text embedding only (this generator does not read numeric features)")
    return Condition(raw, {**info, "parsed": reader.numbers(description), "model_input": model_input})


# ------------------------------------------------------------------------------- the sampling core
#: The type of each :class:`SamplerSettings` field, for :func:`parse_sampler_setting`.
SETTING_TYPES: dict[str, type] = {"steps": int, "sampler": str, "guidance": float, "seed": int,
                                  "temperature": float, "latent_noise": float}


def parse_sampler_setting(text: str) -> dict[str, Any]:
    """``key=value[,key=value]`` over :class:`SamplerSettings` fields → keyword arguments, e.g.
    ``"sampler=ddpm,steps=20"`` → ``{"sampler": "ddpm", "steps": 20}``. Raises
    :class:`argparse.ArgumentTypeError` naming an unknown key or a bad value (an argparse ``type=``)."""
    kwargs: dict[str, Any] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in SETTING_TYPES:
            raise argparse.ArgumentTypeError(f"unknown sampler setting {key!r}; expected one of {sorted(SETTING_TYPES)}")
        try:
            kwargs[key] = SETTING_TYPES[key](value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"sampler setting {key}={value!r} is not a {SETTING_TYPES[key].__name__}") \
                from None
    return kwargs


def check_request(num: int, settings: SamplerSettings, batch_size: int, option: str = "--num") -> None:
    """Raise :class:`ConditionError` naming the option unless ``num`` samples can be drawn.

    ``num`` must be in ``[1, MAX_SAMPLES]``, ``batch_size`` at least 1, and the last sample's seed
    ``settings.seed + num - 1`` below :data:`SEED_LIMIT`.
    """
    if not _whole(num) or not 1 <= num <= MAX_SAMPLES:
        raise ConditionError(f"{option} must be a whole number in [1, {MAX_SAMPLES}], got {num!r}")
    if not _whole(batch_size) or batch_size < 1:
        raise ConditionError(f"--batch-size must be a whole number of at least 1, got {batch_size!r}")
    if settings.seed + num - 1 >= SEED_LIMIT:
        raise ConditionError(f"--seed {settings.seed} with {option} {num}: sample i uses seed + i, and the last "
                             f"seed, {settings.seed + num - 1}, must be below 2**63")


def check_settings_fit(gen: GeneratorArtefact, settings: SamplerSettings) -> None:
    """Raise :class:`ConditionError` for settings the generator cannot take: latent noise without a
    latent, the ``ddpm`` sampler's per-step noise with windows (drawn per window it would differ
    from the whole-sequence draw)."""
    if settings.sampler == "ddpm" and gen.generator.config.window is not None:
        raise ConditionError("--sampler ddpm: a windowed generator samples window by window; use ddim or dpm")
    if settings.latent_noise > 0 and gen.generator.autoencoder is None:
        raise ConditionError(f"--latent-noise {settings.latent_noise:g}: this generator diffuses weight tokens, "
                             "not a latent; latent noise is for latent generators (model.latent_tokens > 0)")


def _to_device(raw: Any, device: torch.device) -> Any:
    return tuple(r.to(device) for r in raw) if isinstance(raw, tuple) else raw.to(device)


def _generate(gen: GeneratorArtefact, cond: Condition, num: int, settings: SamplerSettings, *,
              batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Tokens (num, L, D) on the CPU, in batches of at most ``batch_size``, on the generator's device."""
    check_request(num, settings, batch_size)
    net = gen.generator
    device = next(net.parameters()).device
    raw = _to_device(cond.raw, device)
    shape = net.sample_shape
    out = []
    for start in tqdm(range(0, num, batch_size), desc="sampling", disable=not progress, leave=False):
        seeds = range(settings.seed + start, settings.seed + min(num, start + batch_size))
        noise = seeded_noise(seeds, shape, settings.temperature, net.config.window).to(device)
        latent = seeded_latent_noise(seeds, shape, settings.latent_noise) if settings.latent_noise > 0 else None
        steps = seeded_step_noise(seeds, shape, settings.steps) if settings.sampler == "ddpm" else None
        out.append(sample_tokens(net, raw, len(seeds), gen.schedule, steps=settings.steps, sampler=settings.sampler,
                                 guidance=settings.guidance, noise=noise, latent_noise=latent,
                                 step_noise=steps).cpu())
    return torch.cat(out)


def _samples(gen: GeneratorArtefact, tokens: torch.Tensor, cond: Condition, settings: SamplerSettings, *,
             seconds: float, seeds: list[int] | None = None) -> WeightSamples:
    """Decode tokens (S, L, D) into state dicts (original shapes and dtypes)."""
    return _record(gen, [gen.tokenizer.decode(tokens[i], base=None) for i in range(tokens.shape[0])], cond,
                   settings, seconds=seconds,
                   seeds=seeds if seeds is not None else [settings.seed + i for i in range(tokens.shape[0])],
                   tokens=tokens)


def _record(gen: GeneratorArtefact, state_dicts: list[dict[str, torch.Tensor]], cond: Condition,
            settings: SamplerSettings, *, seconds: float, seeds: list[int],
            tokens: torch.Tensor | None = None) -> WeightSamples:
    return WeightSamples(
        state_dicts=state_dicts, condition=cond.info, settings=settings, seeds=seeds, kind=gen.kind,
        model_id=gen.model_id, model_dir=str(gen.path.resolve()) if gen.path is not None else None,
        seconds=seconds, adapter_config=gen.adapter_config() if gen.kind == "lora" else None, tokens=tokens,
        family=gen.info["zoo"].get("family"), base_sha256=gen.info.get("base", {}).get("sha256"))


def _stream_batch(gen: GeneratorArtefact, cond: Condition, settings: SamplerSettings, folder: Path, start: int,
                  num: int, windows_per_span: int = 4) -> None:
    """(Windowed generators) Write samples ``[start, start + num)`` span by span.

    Each span of windows is denoised for all ``num`` samples (:func:`~weightdiff.models.windows.sample_windows`),
    decoded and written into every sample's weight file at once
    (:class:`~weightdiff.weights.stream.StreamingWeightWriter`), so memory holds one span of ``num``
    samples, never a whole network. Every folder is published only when all of it is written.
    """
    net = gen.generator
    seeds = list(range(settings.seed + start, settings.seed + start + num))
    raw = _to_device(cond.raw, next(net.parameters()).device)
    record = _record(gen, [], cond, settings, seconds=0.0, seeds=seeds)
    name = ADAPTER_WEIGHTS_FILE if gen.kind == "lora" else FULL_WEIGHTS_FILE
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        dests = [folder / f"sample_{start + i:04d}" for i in range(num)]
        tmps = [stack.enter_context(atomic_path(dest, directory=True)) for dest in dests]
        with contextlib.ExitStack() as files:
            writers = [files.enter_context(StreamingWeightWriter(tmp / name, gen.tokenizer.layout,
                                                                 metadata=WEIGHTS_METADATA)) for tmp in tmps]
            for first, tokens in sample_windows(net, raw, seeds, gen.schedule, steps=settings.steps,
                                                sampler=settings.sampler, guidance=settings.guidance,
                                                temperature=settings.temperature, windows_per_span=windows_per_span):
                for writer, sample_tokens_ in zip(writers, tokens):
                    writer.write_tokens(sample_tokens_, first)
        seconds = (time.perf_counter() - t0) / num
        for i, (tmp, dest) in enumerate(zip(tmps, dests)):
            record.write_folder(tmp, dest, i, start, seconds, lambda path: None)


# ------------------------------------------------------------------------------------------ cache
def _cond_bytes(raw: Any) -> bytes:
    parts = raw if isinstance(raw, tuple) else (raw,)
    return b"".join(p.detach().contiguous().numpy().tobytes() for p in parts)


def cache_key(gen: GeneratorArtefact, cond: Condition, settings: SamplerSettings, num: int) -> str:
    h = hashlib.sha256()
    h.update(gen.model_id.encode())
    h.update(_cond_bytes(cond.raw))
    h.update(json.dumps({**asdict(settings), "num": num}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _cache_dir() -> Path:
    return Path(os.environ.get("WEIGHTDIFF_CACHE", Path.home() / ".cache" / "weightdiff")) / "samples"


def _read_cache(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Cached tokens of ``shape``, or None; an unreadable or mismatched file is deleted with a warning."""
    try:
        if not path.is_file():
            return None
        tokens = load_weights(path).get("tokens")
        if tokens is not None and tuple(tokens.shape) == shape and tokens.dtype == torch.float32:
            return tokens
        why = f"expected one float32 tensor 'tokens' of shape {shape}"
    except (WeightDiffError, OSError) as exc:
        why = str(exc)
    log.warning("discarding the unusable sample-cache file %s (%s); generating anew", path, why)
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def _write_cache(path: Path, tokens: torch.Tensor) -> None:
    """Cache tokens; a cache folder that cannot be written is skipped with a warning."""
    try:
        save_weights(path, {"tokens": tokens})
    except (WeightDiffError, OSError) as exc:
        log.warning("cannot write the sample cache %s (%s); going on without caching", path, exc)


# ------------------------------------------------------------------------------------ public API
def generate_tokens(gen: GeneratorArtefact, cond: Condition, num: int, settings: SamplerSettings, *,
                    batch_size: int = 64, use_cache: bool = True, progress: bool = True,
                    generate: TokenGenerator | None = None) -> tuple[torch.Tensor, bool]:
    """Tokens (num, L, D) for one condition; returns (tokens, from_cache).

    Plain torch on the generator's device. ``generate`` replaces that core with another function of
    the same arguments, e.g. ``functools.partial(weightdiff.training.predict.predict_tokens,
    devices=N)`` to run it in Lightning's predict loop over N devices.
    """
    check_request(num, settings, batch_size)
    check_settings_fit(gen, settings)
    path = _cache_dir() / f"{cache_key(gen, cond, settings, num)}.safetensors"
    net = gen.generator.config
    cached = _read_cache(path, (num, net.num_tokens, net.token_size)) if use_cache else None
    if cached is not None:
        return cached, True
    tokens = (generate or _generate)(gen, cond, num, settings, batch_size=batch_size, progress=progress)
    if use_cache:
        _write_cache(path, tokens)
    return tokens, False


def write_samples(gen: GeneratorArtefact, tokens: torch.Tensor, cond: Condition, settings: SamplerSettings,
                  out: str | Path, *, seconds: float, prefix: str = "sample",
                  seeds: list[int] | None = None) -> list[Path]:
    """Decode tokens and write one directory per sample (atomically). Returns the directories.

    See :meth:`WeightSamples.save` for the files.
    """
    return _samples(gen, tokens, cond, settings, seconds=seconds, seeds=seeds).save(out, prefix)


def sample(gen: GeneratorArtefact, cond: Condition, num: int, settings: SamplerSettings, out: str | Path, *,
           use_cache: bool = True, batch_size: int = 64, progress: bool = True,
           generate: TokenGenerator | None = None, overwrite: bool = False) -> tuple[list[Path], dict]:
    """Generate, decode and write ``num`` samples, ``batch_size`` at a time. Returns (directories, timing info).

    Each batch is generated (or read from the cache: batch ``[b, b + n)`` is the request of ``n``
    samples from seed ``seed + b``; a ``generate`` core is called once per batch) and written
    before the next, so memory holds one batch.

    Args:
        gen, cond, num, settings: the request (``num`` at most :data:`MAX_SAMPLES`).
        out: a new or empty folder; a non-empty one only with ``overwrite`` (replaced as a whole).
        use_cache, batch_size, progress, generate: as for :func:`generate_tokens`.
    """
    check_request(num, settings, batch_size)
    gen.schedule.check_sampler(settings.sampler)  # before the output folder is touched
    check_settings_fit(gen, settings)
    t0 = time.perf_counter()
    hits = []
    with terminate_as_exit(), output_folder(out, overwrite=overwrite) as folder:
        for start in tqdm(range(0, num, batch_size), desc="sampling", disable=not progress, leave=False):
            part = replace(settings, seed=settings.seed + start)
            n = min(batch_size, num - start)
            b0 = time.perf_counter()
            if gen.generator.config.window is not None and generate is None:
                _stream_batch(gen, cond, settings, Path(folder), start, n)
                hits.append(False)
                continue
            tokens, hit = generate_tokens(gen, cond, n, part, batch_size=batch_size, use_cache=use_cache,
                                          progress=False, generate=generate)
            _samples(gen, tokens, cond, settings, seconds=time.perf_counter() - b0,
                     seeds=list(range(part.seed, part.seed + n))).save(folder, first=start)
            hits.append(hit)
    seconds = time.perf_counter() - t0
    dirs = [Path(out) / f"sample_{i:04d}" for i in range(num)]
    return dirs, {"seconds": seconds, "from_cache": all(hits), "num": num}


def select_best(gen: GeneratorArtefact, cond: Condition, num: int, settings: SamplerSettings, out: str | Path, *,
                task: str, examples: int, candidates: int = 8, use_cache: bool = True,
                batch_size: int = 64, overwrite: bool = False) -> tuple[list[Path], dict]:
    """Best-of-k: generate ``num * candidates`` samples, keep the ``num`` most accurate on
    ``examples`` labelled training examples of ``task``. This uses labelled data, so its results
    are reported as their own row, never mixed with zero-shot samples. ``out`` is as for :func:`sample`.
    """
    if not (_whole(examples) and _whole(candidates)) or examples < 1 or candidates < 1:
        raise ConditionError(f"--select-with and --candidates must be positive, got {examples} and {candidates}")
    check_request(num * candidates, settings, batch_size, option="--num x --candidates")
    gen.schedule.check_sampler(settings.sampler)
    check_settings_fit(gen, settings)
    t0 = time.perf_counter()
    with terminate_as_exit(), output_folder(out, overwrite=overwrite) as folder:
        tokens, cached = generate_tokens(gen, cond, num * candidates, settings, use_cache=use_cache,
                                         batch_size=batch_size, progress=False)
        t = get_task(task)
        d = t.data()
        idx = torch.randperm(d.x_train.shape[0], generator=torch.Generator().manual_seed(settings.seed))[:examples]
        params = gen.tokenizer.decode_float(tokens)
        acc = gen.target(t).accuracy(params, d.x_train[idx], d.y_train[idx])  # (num * candidates,)
        keep = torch.argsort(acc, descending=True, stable=True)[:num]
        seconds = time.perf_counter() - t0
        cond = Condition(cond.raw, {**cond.info, "selected_with_examples": examples, "candidates": num * candidates})
        write_samples(gen, tokens[keep], cond, settings, folder, seconds=seconds,
                      seeds=[settings.seed + int(i) for i in keep])
    dirs = [Path(out) / f"sample_{i:04d}" for i in range(num)]
    return dirs, {"seconds": seconds, "from_cache": cached, "num": num,
                  "selection_accuracy": acc[keep].tolist()}
