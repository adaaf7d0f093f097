"""Base networks from configuration: any ``nn.Module`` by ``class_path``, or a local Hugging Face folder.

A :class:`BaseSpec` names the architecture of a LoRA target's frozen base network in one of two
ways, as a YAML/JSON mapping (the ``class_path``/``init_args`` form is LightningCLI's)::

    class_path: mypackage.nets.SmallCNN     # any importable nn.Module subclass
    init_args: {width: 32}

    pretrained: path/to/hf_folder           # config.json + model.safetensors, loaded offline
    auto_class: AutoModel                   # a transformers auto class (default AutoModel)
    output: pooler_output                   # optional: the output key scored (default: logits)
    pad_token_id: 0                         # optional: default the config's; null for no mask

How the base is *called* (:class:`BaseCall`, read by :func:`base_call`) is part of the spec too:
integer inputs (token ids) get ``attention_mask = (x != pad_token_id)``, so padded sequences are
encoded as the tokenizer meant them, and an output mapping is scored on its ``output`` key (by
default ``logits`` when it has them, else the output itself).

:func:`build_base` instantiates it: a ``class_path`` module with its own initial weights (the
trained ones are loaded afterwards, strictly), a ``pretrained`` one with
``from_pretrained(local_files_only=True)`` from its ``model.safetensors`` (pickled weights are
never read). A zoo records the spec in its ``base/`` folder (:func:`record_base_spec`): a
``base_spec.json``, and for a Hugging Face base the folder's ``config.json`` too, so that
``base/`` is itself a folder ``AutoModel.from_pretrained`` loads. :func:`recorded_base_spec` reads
it back (``None`` for zoos whose base is a task family's network).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from weightdiff.errors import TargetMismatchError, WeightFileError
from weightdiff.io import atomic_path, read_json, write_json
from weightdiff.tasks.base import import_module_class

BASE_SPEC_FILE = "base_spec.json"
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
DEFAULT_AUTO_CLASS = "AutoModel"
_FIELDS = ("class_path", "init_args", "pretrained", "auto_class", "output", "pad_token_id")
FROM_CONFIG = "config"  # pad_token_id: the network's config.pad_token_id
CALL_ATTR = "_weightdiff_call"  # where build_base leaves a module's BaseCall


@dataclass(frozen=True)
class BaseCall:
    """How a base network is called on a task's inputs, and which output is scored.

    Attributes:
        output: key of the output mapping that is scored, or None: ``logits`` when the output
            has them, else the output itself.
        pad_token_id: integer inputs equal to it are masked out with an ``attention_mask``, or
            None: no mask is passed.
    """

    output: str | None = None
    pad_token_id: int | None = None

    def _masks(self, x: Any) -> bool:
        return (self.pad_token_id is not None and torch.is_tensor(x) and not x.is_floating_point()
                and x.dtype != torch.bool and x.dim() >= 2)

    def kwargs(self, x: Any) -> dict[str, torch.Tensor]:
        """The keyword inputs besides ``x``: an ``attention_mask`` for integer token ids ``(N, L)``
        that hold padding; none without (the same function). Call it on real, unbatched tensors."""
        return {"attention_mask": (x != self.pad_token_id).long()} if self.pads(x) else {}

    def pads(self, x: Any) -> bool:
        """Whether ``x`` holds padding that the mask hides (checked on real, unbatched tensors)."""
        return self._masks(x) and bool((x == self.pad_token_id).any())

    def select(self, out: Any) -> Any:
        """The scored part of a network's output.

        Raises:
            TargetMismatchError: ``output`` is set and the output has no such key.
        """
        if self.output is not None:
            if not (isinstance(out, Mapping) and self.output in out):
                keys = sorted(out) if isinstance(out, Mapping) else f"a {type(out).__name__}, not a mapping"
                raise TargetMismatchError(f"base network: its output has no '{self.output}' (the base spec's "
                                          f"'output'); it has {keys}")
            return out[self.output]
        return out["logits"] if isinstance(out, Mapping) and "logits" in out else out

    def __call__(self, module: nn.Module, x: Any) -> Any:
        """``module`` on inputs ``x`` (masked where they hold padding), its scored output."""
        return self.select(module(x, **self.kwargs(x)))


def _config_pad_id(module: nn.Module) -> int | None:
    """``config.pad_token_id`` of a network whose forward takes an ``attention_mask``, else None."""
    pad = getattr(getattr(module, "config", None), "pad_token_id", None)
    if not isinstance(pad, int) or isinstance(pad, bool):
        return None
    try:
        accepts = "attention_mask" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return pad if accepts else None


def base_call(module: nn.Module) -> BaseCall:
    """How ``module`` is called: as its spec said (:func:`build_base`), else the defaults.

    The defaults mask the padding of a network that has a ``config.pad_token_id`` and takes an
    ``attention_mask`` (a Hugging Face encoder), and score ``logits`` when the output has them.
    """
    recorded = getattr(module, CALL_ATTR, None)
    return recorded if isinstance(recorded, BaseCall) else BaseCall(pad_token_id=_config_pad_id(module))


@dataclass(frozen=True)
class BaseSpec:
    """The architecture of a base network: ``class_path`` + ``init_args``, or a ``pretrained`` folder.

    Attributes:
        class_path: dotted path of an ``nn.Module`` subclass, e.g. ``"tests._toy_models.ToyMLP"``.
        init_args: keyword arguments of its constructor (JSON values).
        pretrained: a local Hugging Face model folder holding ``config.json`` and ``model.safetensors``.
        auto_class: the ``transformers`` auto class that loads ``pretrained`` (``AutoModel``,
            ``AutoModelForSequenceClassification``, ...).
        output: the key of the output mapping that is scored (e.g. ``pooler_output`` of a model
            without a head), or None: ``logits`` when present, else the output.
        pad_token_id: the token id masked out of integer inputs, ``"config"`` (default) for the
            network's ``config.pad_token_id`` where it has one, or None for no mask.
    """

    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    auto_class: str = DEFAULT_AUTO_CLASS
    output: str | None = None
    pad_token_id: int | str | None = FROM_CONFIG

    @property
    def kind(self) -> str:
        """``"class_path"`` or ``"pretrained"``."""
        return "class_path" if self.class_path is not None else "pretrained"

    @classmethod
    def from_dict(cls, data: Any, source: str = "base spec", relative_to: Path | None = None) -> BaseSpec:
        """Validate a spec mapping; a relative ``pretrained`` path is taken relative to ``relative_to``.

        Raises:
            TargetMismatchError: not a mapping, an unknown field, neither or both of
                ``class_path`` / ``pretrained``, or a field of the wrong type (naming ``source``).
        """
        if not isinstance(data, Mapping):
            raise TargetMismatchError(f"{source}: expected a mapping with 'class_path' or 'pretrained', "
                                      f"got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise TargetMismatchError(f"{source}: unknown field '{unknown[0]}'; expected fields {list(_FIELDS)}")
        has_class, has_folder = data.get("class_path") is not None, data.get("pretrained") is not None
        if has_class == has_folder:
            raise TargetMismatchError(f"{source}: expected exactly one of 'class_path' and 'pretrained', "
                                      f"got {'both' if has_class else 'neither'}")
        for name in ("class_path", "pretrained", "auto_class", "output"):
            value = data.get(name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise TargetMismatchError(f"{source}: field '{name}' expected a non-empty string, got {value!r}")
        init_args = data.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            raise TargetMismatchError(f"{source}: field 'init_args' expected a mapping, got {init_args!r}")
        if has_folder and init_args:
            raise TargetMismatchError(f"{source}: field 'init_args' is for 'class_path'; a 'pretrained' base is "
                                      f"configured by its {HF_CONFIG_FILE}")
        if has_class and data.get("auto_class") is not None:
            raise TargetMismatchError(f"{source}: field 'auto_class' is for 'pretrained'; got it with 'class_path'")
        pad = data.get("pad_token_id", FROM_CONFIG)
        if pad != FROM_CONFIG and pad is not None and not (isinstance(pad, int) and not isinstance(pad, bool)
                                                            and pad >= 0):
            raise TargetMismatchError(f"{source}: field 'pad_token_id' expected a token id (a whole number >= 0), "
                                      f"null (no attention mask) or {FROM_CONFIG!r}, got {pad!r}")
        pretrained = data.get("pretrained")
        if pretrained is not None:
            folder = Path(pretrained).expanduser()
            if not folder.is_absolute() and relative_to is not None:
                folder = relative_to / folder
            pretrained = str(folder)
        return cls(class_path=data.get("class_path"), init_args=dict(init_args), pretrained=pretrained,
                   auto_class=data.get("auto_class") or DEFAULT_AUTO_CLASS, output=data.get("output"),
                   pad_token_id=pad)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON (only the fields of its kind; the call fields only where not default)."""
        if self.class_path is not None:
            out: dict[str, Any] = {"class_path": self.class_path, "init_args": dict(self.init_args)}
        else:
            out = {"pretrained": self.pretrained, "auto_class": self.auto_class}
        if self.output is not None:
            out["output"] = self.output
        if self.pad_token_id != FROM_CONFIG:
            out["pad_token_id"] = self.pad_token_id
        return out

    def call(self, module: nn.Module) -> BaseCall:
        """How this spec's ``module`` is called (``pad_token_id`` ``"config"`` read from it)."""
        pad = _config_pad_id(module) if self.pad_token_id == FROM_CONFIG else self.pad_token_id
        assert pad is None or isinstance(pad, int)
        return BaseCall(output=self.output, pad_token_id=pad)


def read_base_spec(path: str | os.PathLike) -> BaseSpec:
    """Read a spec from a YAML or JSON file (``pretrained`` relative to the file's folder).

    Raises:
        WeightFileError: the file is missing or not valid YAML.
        TargetMismatchError: the spec is invalid (naming the file and field).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightFileError(f"base config not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WeightFileError(f"base config {path} cannot be read: {str(exc).strip().splitlines()[0]}") from None
    return BaseSpec.from_dict(data, str(path), relative_to=path.parent)


def hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model folder (``config.json`` beside ``model.safetensors``)."""
    path = Path(path)
    return (path / HF_CONFIG_FILE).is_file() and (path / HF_WEIGHTS_FILE).is_file()


@contextlib.contextmanager
def _model_files_only(folder: Path) -> Iterator[Path]:
    """``folder`` itself, or, when it also holds an ``adapter_config.json`` (a generator's or a
    sample's ``base/``), a temporary folder linking just its config and weights: transformers would
    otherwise take the folder for a PEFT adapter and load the base it names."""
    if not (folder / "adapter_config.json").exists():
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="weightdiff-base-") as tmp:
        for name in (HF_CONFIG_FILE, HF_WEIGHTS_FILE):
            os.symlink((folder / name).resolve(), Path(tmp) / name)
        yield Path(tmp)


def _from_pretrained(spec: BaseSpec, source: str) -> nn.Module:
    import transformers

    folder = Path(spec.pretrained or "")
    if not hf_folder(folder):
        raise WeightFileError(f"{source}: pretrained folder {folder} has no {HF_CONFIG_FILE} with "
                              f"{HF_WEIGHTS_FILE} beside it (only safetensors weights are loaded)")
    auto = getattr(transformers, spec.auto_class, None)
    if not spec.auto_class.startswith("Auto") or not hasattr(auto, "from_pretrained"):
        raise TargetMismatchError(f"{source}: auto_class {spec.auto_class!r} is not a transformers auto class "
                                  "(e.g. 'AutoModel', 'AutoModelForSequenceClassification')")
    try:
        with _model_files_only(folder) as view:
            model, info = auto.from_pretrained(str(view), local_files_only=True, use_safetensors=True,
                                               dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, KeyError) as exc:
        raise TargetMismatchError(f"{source}: {spec.auto_class}.from_pretrained({str(folder)!r}) failed: "
                                  f"{str(exc).strip().splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()))
    if missing:  # transformers would initialise them at random: not the network of the folder
        raise TargetMismatchError(f"{source}: {folder / HF_WEIGHTS_FILE} has no tensor '{missing[0]}' "
                                  f"({len(missing)} in all) that {spec.auto_class} builds; they would be random")
    return model


def build_base(spec: BaseSpec, source: str = "base spec") -> nn.Module:
    """The base network of ``spec``, frozen and in eval mode, carrying its :class:`BaseCall`.

    A ``class_path`` module has its constructor's initial weights (load the trained ones with
    :func:`weightdiff.targets.load_base_network`); a ``pretrained`` one its folder's weights.

    Raises:
        TargetMismatchError: the class cannot be imported or is no ``nn.Module``, its constructor
            refuses ``init_args``, the auto class is unknown, or the folder's weights do not fill
            the model (naming ``source``).
        WeightFileError: the ``pretrained`` folder lacks ``config.json`` or ``model.safetensors``.
    """
    if spec.class_path is None:
        module = _from_pretrained(spec, source)
    else:
        cls = import_module_class(spec.class_path, source, TargetMismatchError)
        try:
            module = cls(**spec.init_args)
        except TypeError as exc:
            raise TargetMismatchError(f"{source}: init_args {spec.init_args!r} do not fit {spec.class_path}: "
                                      f"{exc}") from None
    setattr(module, CALL_ATTR, spec.call(module))
    return module.eval().requires_grad_(False)


def record_base_spec(spec: BaseSpec, folder: str | os.PathLike) -> None:
    """Record ``spec`` in a zoo's ``base/`` folder (each file atomically).

    Writes ``base_spec.json``; for a ``pretrained`` base also copies its ``config.json``, and the
    recorded spec points at ``folder`` itself (``"pretrained": "."``), which holds the weights.
    """
    folder = Path(folder)
    recorded = spec.to_dict()
    if spec.pretrained is not None:
        with atomic_path(folder / HF_CONFIG_FILE) as tmp:
            shutil.copyfile(Path(spec.pretrained) / HF_CONFIG_FILE, tmp)
        recorded["pretrained"] = "."
    write_json(folder / BASE_SPEC_FILE, recorded)


def recorded_base_spec(folder: str | os.PathLike) -> BaseSpec | None:
    """The spec a zoo's ``base/`` folder records (``pretrained`` resolved against it), or ``None``.

    Raises:
        WeightFileError: ``base_spec.json`` is unreadable.
        TargetMismatchError: it is not a valid spec (naming the file and field).
    """
    path = Path(folder) / BASE_SPEC_FILE
    if not path.is_file():
        return None
    return BaseSpec.from_dict(read_json(path, "base spec"), str(path), relative_to=Path(folder))
