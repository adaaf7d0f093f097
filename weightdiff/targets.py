""":class:`Target`: runs (batches of) weight sets inside their target network.

:class:`Target` evaluates many weight sets at once. Weights are named as in the zoo's files:
the full state dict for full zoos, PEFT adapter keys for LoRA zoos, e.g.
``base_model.model.conv2.lora_A.weight``. For LoRA each sample's tensors are substituted into
the base with PEFT's own LoRA layers injected, so every layer computes PEFT's
``h = W0 x + scaling · B A x`` (LoRA, Hu et al. 2021, eq. 3), one ``W0`` shared by all S samples,
honouring what PEFT honours (``fan_in_fan_out`` for GPT-2's ``Conv1D``, rsLoRA, rank/alpha
patterns, ``bias``, ``modules_to_save``, regex ``target_modules``, ``layers_to_transform``); fields
that would make it something else (DoRA, LoRA biases, base-rewriting inits) are refused.
``forward_batched`` serves both the functional training loss and batched evaluation.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import layer as lora_layer
from peft.utils import get_peft_model_state_dict
from torch import nn
from torch.func import functional_call, vmap

from weightdiff.base_networks import BaseCall, BaseSpec, base_call, build_base
from weightdiff.errors import TargetMismatchError, WeightFileError
from weightdiff.io import load_weights, read_json, save_weights, write_json
from weightdiff.tasks import get_task

FULL_WEIGHTS_FILE = "model.safetensors"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of base-module names in adapter keys
BASE_PATH_FIELD = "base_model_name_or_path"  # the adapter config's (informational) reference to its base


# LoraConfig fields whose function substituted A/B tensors do not give (variants, changed architectures)
_REFUSED_FIELDS = ("use_dora", "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices",
                   "use_qalora", "alora_invocation_tokens", "arrow_config", "megatron_config", "use_bdlora",
                   "velora_config", "monteclora_config", "kasa_config")
# init_lora_weights values that leave the base weights as given (the others, e.g. "pissa", "olora",
# "loftq", "corda", rewrite W0 when PEFT builds or loads the adapter, so its function needs that W0).
_KEPT_BASE_INITS = (True, False, "gaussian", "orthogonal")
_LORA_LAYERS = (lora_layer.Linear, lora_layer.Embedding, lora_layer.Conv1d, lora_layer.Conv2d, lora_layer.Conv3d)
_ADAPTER = "default"  # PEFT's name of the one adapter a Target injects


@dataclass(frozen=True)
class _LoraSlot:
    """One LoRA-adapted layer of the injected network and the base parameter it changes."""

    module_name: str   # in the base network, e.g. "conv2"
    weight_name: str   # base parameter, e.g. "conv2.weight"
    scaling: float     # alpha / r (or alpha / sqrt(r) with rsLoRA, per rank/alpha pattern), read from PEFT


class _DeltaWeights(nn.Module):
    """``forward()``: PEFT's ``get_delta_weight`` of every adapted layer, keyed by base weight name.

    Run with :func:`torch.func.functional_call` to substitute one sample's A/B tensors: the deltas
    are PEFT's own (``fan_in_fan_out`` transposition, conv kernels, scaling) and differentiable.
    """

    def __init__(self, net: nn.Module, slots: list[_LoraSlot]) -> None:
        super().__init__()
        self.net, self.slots = net, slots

    def forward(self) -> dict[str, torch.Tensor]:
        layers = dict(self.net.named_modules())
        return {slot.weight_name: layers[slot.module_name].get_delta_weight(_ADAPTER) for slot in self.slots}


def _check_plain_lora(config: LoraConfig) -> None:
    """Refuse the ``LoraConfig`` fields whose function :class:`Target` does not compute.

    Raises:
        TargetMismatchError: naming the field and its value.
    """
    for field in _REFUSED_FIELDS:
        value = getattr(config, field, None)
        if value not in (None, False) and value != [] and value != {}:
            raise TargetMismatchError(f"lora_config: '{field}' is {value!r}; only plain LoRA is supported, "
                                      f"expected '{field}' unset (None/False)")
    init = config.init_lora_weights  # booleans compared with `is`: 1 == True, but 1 is no PEFT init
    if not any(init is kept or (isinstance(kept, str) and init == kept) for kept in _KEPT_BASE_INITS):
        raise TargetMismatchError(f"lora_config: 'init_lora_weights' is {init!r}, which rewrites the base "
                                  f"weights when PEFT loads the adapter; expected one of {list(_KEPT_BASE_INITS)} "
                                  "(convert the adapter to plain LoRA first)")
    if config.bias == "all" and config.modules_to_save:
        raise TargetMismatchError(f"lora_config: 'bias' is 'all' together with 'modules_to_save' "
                                  f"{sorted(config.modules_to_save)}; PEFT then saves one bias under two keys. "
                                  "Expected bias 'none' or 'lora_only' with modules_to_save")


def _shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are the same tensors as its own."""
    memo: dict[int, Any] = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def base_path_for(base: str | None, folder: str | os.PathLike) -> str | None:
    """``base_model_name_or_path`` as an adapter folder records it: relative to ``folder`` when local.

    An absolute path to a base folder on the same tree as ``folder`` (below a common folder other
    than the file-system root) is written relative to ``folder``, e.g. ``"../generator/base"``,
    so that the two can be moved or copied together. Anything else (``None``, a Hugging Face Hub
    id, a relative path, a base on another tree) is kept as given.

    The field is informational: ``PeftModel.from_pretrained(base_model, folder)`` ignores it (the
    caller passes the base). ``AutoPeftModel`` reads it as a path from the working directory, so a
    relative one loads from inside the adapter folder; elsewhere, load the base and use
    ``PeftModel``. weightdiff reads it against the adapter folder (:func:`resolve_base_path`).
    """
    if base is None or not os.path.isabs(base):
        return base
    here, there = Path(folder).resolve(), Path(base).resolve()
    try:
        common = Path(os.path.commonpath([here, there]))
    except ValueError:  # different drives
        return base
    if common == Path(common.anchor):
        return base
    return os.path.relpath(there, here)


def resolve_base_path(base: str | None, folder: str | os.PathLike) -> Path | None:
    """The local folder an adapter config's ``base_model_name_or_path`` names, or None.

    Relative paths are read against the adapter ``folder`` (as :func:`base_path_for` writes
    them), absolute ones as they are (as older files hold them); a value naming no existing
    folder (a Hub id, a folder since moved) gives None.
    """
    if not isinstance(base, str) or not base:
        return None
    path = Path(base) if os.path.isabs(base) else Path(folder) / base
    return path if path.is_dir() else None


def _json_config(config: LoraConfig) -> dict[str, Any]:
    """``LoraConfig`` as plain JSON (sets → sorted lists, enums → str), as PEFT saves it."""
    out: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        elif hasattr(value, "value") and isinstance(value, str):
            value = str(value.value)
        out[key] = value
    return out


class Target:
    """Evaluate (batches of) weight sets inside a target network.

    Build with :meth:`full` (every parameter of a small network is generated) or :meth:`lora`
    (PEFT LoRA adapter tensors on a frozen base), or with :meth:`build` from a base state dict
    and an adapter config as read from disk. ``params`` arguments are dicts of tensors named
    as in the zoo's weight files, each with a leading sample dimension S.
    """

    def __init__(self, module: nn.Module, kind: Literal["full", "lora"],
                 lora_config: LoraConfig | None = None) -> None:
        self.kind = kind
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.call: BaseCall = base_call(self.module)  # attention mask of token ids, the output scored
        self.lora_config = lora_config
        self._slots: list[_LoraSlot] = []
        self._names: dict[str, str] = {}  # adapter key -> its parameter in the LoRA-injected network
        self._saved: dict[str, str] = {}  # adapter key of a substituted base tensor -> base parameter name
        self._net: nn.Module | None = None  # LoRA: the base with PEFT's layers injected, sharing its tensors
        self._deltas: _DeltaWeights | None = None
        if kind == "full":
            self._shapes = {k: tuple(v.shape) for k, v in self.module.named_parameters()}
        elif kind == "lora":
            if lora_config is None:
                raise ValueError("a lora Target needs a lora_config")
            self._shapes = self._inspect_lora(lora_config)
        else:
            raise ValueError(f"kind must be 'full' or 'lora', got {kind!r}")

    @classmethod
    def full(cls, task_family: str | nn.Module) -> Target:
        """Target whose generated tensors are the whole state dict of a family's network.

        Args:
            task_family: a task family or task string (``"digits"``, ``"mnist1d"``), or a module
                whose architecture to use.
        """
        if isinstance(task_family, nn.Module):
            return cls(task_family, "full")
        return cls(get_task(task_family).build_network(), "full")

    @classmethod
    def lora(cls, base_module: nn.Module, lora_config: Mapping[str, Any] | LoraConfig) -> Target:
        """Target whose generated tensors are a PEFT LoRA adapter on ``base_module`` (frozen).

        Args:
            base_module: the base network with its trained weights.
            lora_config: ``LoraConfig`` keyword arguments (``r``, ``lora_alpha``,
                ``target_modules`` as names or a regex, optional ``modules_to_save``,
                ``fan_in_fan_out``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``bias``,
                ``layers_to_transform``, ...), the contents of an ``adapter_config.json``, or a
                ``LoraConfig``. ``lora_dropout`` and ``init_lora_weights`` do not change a given
                adapter's function (the target runs in eval mode; the tensors are substituted).

        Raises:
            TargetMismatchError: a field whose function is not computed (``use_dora``,
                ``lora_bias``, a base-rewriting ``init_lora_weights`` such as ``"pissa"``, ...),
                named, or a target module that is not Linear/Embedding/Conv/``Conv1D``.
        """
        return cls(base_module, "lora", make_lora_config(lora_config))

    @classmethod
    def build(cls, kind: Literal["full", "lora"], network: nn.Module | str | BaseSpec, *,
              base_state: Mapping[str, torch.Tensor] | None = None,
              lora_config: Mapping[str, Any] | LoraConfig | None = None,
              source: str | os.PathLike = "<base_state>") -> Target:
        """The target of a zoo, a generator or a set of weight files, from where its parts were read.

        Callers decide where the base weights and the adapter config come from (a zoo's ``base/``,
        an exported generator's ``base/``, a path given by the user); this builds the target the
        same way for all of them.

        Args:
            kind: ``"full"`` or ``"lora"``.
            network: a task family or task string, a :class:`~weightdiff.base_networks.BaseSpec`
                (``class_path`` + ``init_args`` or a local Hugging Face folder, built with
                :func:`~weightdiff.base_networks.build_base`), or a module. Full: the architecture
                whose parameters are generated. LoRA: a network of the base architecture;
                ``base_state`` is loaded into it in place.
            base_state: (LoRA) the frozen base network's state dict, loaded strictly.
            lora_config: (LoRA) ``LoraConfig`` keyword arguments or a saved ``adapter_config.json``;
                fields the installed PEFT's ``LoraConfig`` does not know (a config written by
                another PEFT version) are dropped.
            source: the file ``base_state`` was read from, named in errors.

        Raises:
            TargetMismatchError: the base weights miss a key, hold an unexpected one or a tensor
                of the wrong shape (naming ``source`` and the key), or the adapter config is not
                plain LoRA.
        """
        if isinstance(network, BaseSpec):
            module = build_base(network, str(source))
        else:
            module = get_task(network).build_network() if isinstance(network, str) else network
        if kind == "full":
            if base_state is not None or lora_config is not None:
                raise ValueError("a full Target takes no base_state or lora_config")
            return cls.full(module)
        if kind != "lora":
            raise ValueError(f"kind must be 'full' or 'lora', got {kind!r}")
        if base_state is None or lora_config is None:
            raise ValueError("a lora Target needs base_state and lora_config")
        if not isinstance(lora_config, LoraConfig):
            known = set(LoraConfig.__dataclass_fields__)
            lora_config = {k: v for k, v in lora_config.items() if k in known}
        return cls.lora(load_base_network(module, base_state, source), lora_config)

    def _inspect_lora(self, config: LoraConfig) -> dict[str, tuple[int, ...]]:
        """Inject PEFT's LoRA layers into a tensor-sharing copy of the base and map the adapter keys.

        Sets ``_net`` (the injected network; its base tensors are ``self.module``'s own, its A/B
        placeholders are replaced per sample), ``_names`` (adapter key → parameter of ``_net``),
        ``_slots`` (the adapted layers) and ``_saved`` (adapter keys that replace a base tensor:
        ``modules_to_save`` and, with ``bias`` 'all'/'lora_only', biases).
        """
        _check_plain_lora(config)  # the initialisations left are those that keep W0 as given
        peft_model = get_peft_model(_shared_copy(self.module), copy.deepcopy(config))
        net = peft_model.base_model.model.eval().requires_grad_(False)
        state = get_peft_model_state_dict(peft_model)
        base_of = {id(p): n for n, p in self.module.named_parameters()}
        lora_ids: set[int] = set()
        for name, layer in net.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            base_layer = layer.get_base_layer()
            if not isinstance(layer, _LORA_LAYERS):
                raise TargetMismatchError(f"lora target module '{name}' is a {type(base_layer).__name__}; expected "
                                          "Linear, Embedding, Conv1d/2d/3d or transformers' Conv1D")
            if getattr(base_layer, "groups", 1) != 1:
                raise TargetMismatchError(f"lora target module '{name}' is a grouped conv; not supported")
            self._slots.append(_LoraSlot(module_name=name, weight_name=base_of[id(base_layer.weight)],
                                         scaling=float(layer.scaling[_ADAPTER])))
            lora_ids |= {id(p) for n, p in layer.named_parameters() if not n.startswith("base_layer.")}
        params = dict(net.named_parameters())
        by_storage: dict[tuple[int, tuple[int, ...]], list[str]] = {}
        for name, p in params.items():
            by_storage.setdefault((p.data_ptr(), tuple(p.shape)), []).append(name)
        for key, value in state.items():  # PEFT's state dict holds the parameters' own storage
            found = by_storage.get((value.data_ptr(), tuple(value.shape)), [])
            if len(found) != 1:
                raise TargetMismatchError(f"adapter key '{key}' maps to {len(found)} parameters of the LoRA "
                                          f"network {found}, expected exactly 1")
            name = self._names[key] = found[0]
            if id(params[name]) in lora_ids:
                continue
            original = name.replace(f".modules_to_save.{_ADAPTER}.", ".original_module.")
            base_name = base_of.get(id(params.get(original)))
            if base_name is None:
                raise TargetMismatchError(f"adapter key '{key}' maps to no base parameter")
            self._saved[key] = base_name
        self._net = net
        self._deltas = _DeltaWeights(net, self._slots)
        return {k: tuple(v.shape) for k, v in state.items()}

    # ------------------------------------------------------------------ shapes and checks
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the generated tensors (one sample, no S dimension), in file order."""
        return dict(self._shapes)

    @property
    def num_params(self) -> int:
        """Number of generated scalars per sample."""
        return sum(int(torch.Size(s).numel()) for s in self._shapes.values())

    def check(self, params: Mapping[str, torch.Tensor], source: str = "params", *,
              batched: bool = False) -> int | None:
        """Check names and shapes against :meth:`param_shapes`; return S when ``batched``.

        Raises:
            TargetMismatchError: naming the first missing or unexpected key, or a wrong shape.
        """
        missing = [k for k in self._shapes if k not in params]
        unexpected = [k for k in params if k not in self._shapes]
        if missing:
            raise TargetMismatchError(f"{source}: missing key '{missing[0]}' ({len(missing)} missing) for this "
                                      f"{self.kind} target; expected keys {list(self._shapes)}")
        if unexpected:
            raise TargetMismatchError(f"{source}: unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected) "
                                      f"for this {self.kind} target; expected keys {list(self._shapes)}")
        sizes = set()
        for key, shape in self._shapes.items():
            actual = tuple(params[key].shape)
            got = actual[1:] if batched else actual
            if got != shape or (batched and not actual):
                want = f"(S, {', '.join(map(str, shape))})" if batched else str(shape)
                raise TargetMismatchError(f"{source}: tensor '{key}' has shape {actual}, expected {want}")
            if batched:
                sizes.add(actual[0])
        if len(sizes) > 1:
            raise TargetMismatchError(f"{source}: tensors disagree on the sample dimension S: {sorted(sizes)}")
        return sizes.pop() if batched else None

    # ------------------------------------------------------------------ functional forward
    def adapted_names(self) -> list[str]:
        """Base parameters a LoRA adapter changes (adapted weights, substituted biases and modules), sorted."""
        return sorted({slot.weight_name for slot in self._slots} | set(self._saved.values()))

    def merged_params(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters of the target network for one sample (no S dimension), named as in the base.

        For full targets this is ``params`` itself; for LoRA the base weights with each adapted
        weight replaced by ``W0 + ΔW``, ``ΔW`` being PEFT's ``get_delta_weight`` of the sample's
        tensors (``scaling · B A``, transposed for ``fan_in_fan_out`` layers such as GPT-2's
        ``Conv1D`` whose weight is ``(in, out)``; conv kernels ``B (out, r, 1…)`` times
        ``A (r, in, k…)``), and ``modules_to_save`` / bias tensors substituted. Works under
        :func:`torch.func.vmap`.

        Example: a ``Conv1D(nf=12, nx=6)`` with r=2 stores ``W0 (6, 12)``; the adapter holds
        ``lora_A (2, 6)`` and ``lora_B (12, 2)``, and ``ΔW = scaling · (B @ A).T`` is ``(6, 12)``.
        """
        if self.kind == "full":
            return dict(params)
        assert self._deltas is not None
        merged = dict(self.module.named_parameters())
        deltas = functional_call(self._deltas, {f"net.{self._names[k]}": v for k, v in params.items()}, ())
        for name, delta in deltas.items():
            merged[name] = merged[name] + delta
        for key, base_name in self._saved.items():
            merged[base_name] = params[key]
        return merged

    def _call(self, params: Mapping[str, torch.Tensor], args: tuple[Any, ...],
              kwargs: Mapping[str, Any] | None = None) -> Any:
        """The network on ``args`` with one sample's tensors (no S dimension) substituted.

        The base's :class:`~weightdiff.base_networks.BaseCall` picks the scored output: by default
        the ``logits`` of an output mapping that has them (a Hugging Face
        ``...ForSequenceClassification`` model), so the task metrics score it as any classifier.
        """
        if self.kind == "full":
            out = functional_call(self.module, dict(params), args, kwargs)
        else:
            assert self._net is not None
            # h = W0 x + scaling · B A x in each injected layer: the base W0 is shared, never copied per sample
            out = functional_call(self._net, {self._names[k]: v for k, v in params.items()}, args, kwargs)
        return self.call.select(out)

    def forward_batched(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, **kwargs: Any) -> Any:
        """Outputs of S weight sets on one input batch.

        Args:
            params: tensors ``(S, *shape)`` named as in :meth:`param_shapes`.
            x: inputs ``(N, *input_shape)`` (for a Hugging Face model, e.g. ``input_ids (N, L)``).
            **kwargs: further inputs of the network's forward, the same for every weight set
                (e.g. ``attention_mask``).

        Returns:
            logits ``(S, N, C)`` (the ``logits`` of an output that has them; else the network's
            output with every tensor given a leading S, e.g. a ``ModelOutput`` whose
            ``last_hidden_state`` is ``(S, N, L, H)``);
            differentiable with respect to ``params``.
        """
        self.check(params, batched=True)
        kwargs = {**self.call.kwargs(x), **kwargs}  # the mask is built outside vmap
        return vmap(lambda p: self._call(p, (x,), kwargs))(dict(params))  # (S, N, C)

    def forward_each(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> Any:
        """Logits of S weight sets, each on its own input batch (the functional loss's case).

        Args:
            params: tensors ``(S, *shape)``.
            x: inputs ``(S, N, *input_shape)``: row s is fed to weight set s.

        Returns:
            logits ``(S, N, C)``; differentiable with respect to ``params``.
        """
        self.check(params, batched=True)
        if self.call.pads(x):  # transformers inspects a padding mask's values, which vmap cannot batch
            return torch.stack([self._call({k: v[s] for k, v in params.items()}, (x[s],), self.call.kwargs(x[s]))
                                for s in range(len(x))])
        return vmap(lambda p, xs: self._call(p, (xs,)))(dict(params), x)  # (S, N, C): row s on weight set s

    @torch.no_grad()
    def accuracy(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 chunk_size: int = 64) -> torch.Tensor:
        """Top-1 accuracy ``(S,)`` of S weight sets on ``(x (N, ...), y (N,))``, S chunked."""
        s = self.check(params, batched=True)
        out = []
        for i in range(0, s, chunk_size):
            chunk = {k: v[i:i + chunk_size] for k, v in params.items()}
            pred = self.forward_batched(chunk, x).argmax(-1)  # (s, N)
            out.append((pred == y.to(pred.device)).float().mean(-1))
        return torch.cat(out)

    # ------------------------------------------------------------------ files
    def save(self, params: Mapping[str, torch.Tensor], directory: str | os.PathLike) -> Path:
        """Write one weight set into ``directory`` in the zoo's format (each file atomically).

        Full: ``model.safetensors``. LoRA: ``adapter_model.safetensors`` + ``adapter_config.json``
        (PEFT format, loadable with ``PeftModel.from_pretrained``), whose ``base_model_name_or_path``
        is written relative to ``directory`` (:func:`base_path_for`; a temporary folder renamed into
        place must be a sibling of its destination, as :func:`weightdiff.io.atomic_path` makes it).
        Returns the weight file path.
        """
        self.check(params, "params to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "full":
            path = directory / FULL_WEIGHTS_FILE
        else:
            assert self.lora_config is not None
            config = _json_config(self.lora_config)
            config[BASE_PATH_FIELD] = base_path_for(config.get(BASE_PATH_FIELD), directory)
            write_json(directory / ADAPTER_CONFIG_FILE, config)
            path = directory / ADAPTER_WEIGHTS_FILE
        ordered = {k: params[k] for k in self._shapes}
        save_weights(path, ordered, metadata={"format": "pt"})  # as PEFT/transformers write it
        return path

    def weight_file(self, path: str | os.PathLike) -> Path:
        """The weight file inside a checkpoint directory (or ``path`` itself if it is a file)."""
        path = Path(path)
        if path.is_dir():
            return path / (FULL_WEIGHTS_FILE if self.kind == "full" else ADAPTER_WEIGHTS_FILE)
        return path

    def load_params(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """Read and check one weight set (no S dimension) from a checkpoint directory or file."""
        file = self.weight_file(path)
        params = load_weights(file)
        self.check(params, str(file))
        return params

    def load_module(self, path: str | os.PathLike) -> nn.Module:
        """Load one checkpoint strictly into a fresh network, in eval mode.

        Full: ``load_state_dict(strict=True)`` from ``model.safetensors``. LoRA:
        ``PeftModel.from_pretrained(base, directory)`` after checking the adapter's keys and
        shapes and that its config gives the same scaling as this target's.

        Raises:
            WeightFileError: a file is missing or unreadable.
            TargetMismatchError: a missing/unexpected key, a wrong shape, a different scaling or an
                adapter config with a field :class:`Target` refuses (e.g. ``use_dora``).
        """
        params = self.load_params(path)
        if self.kind == "full":
            module = copy.deepcopy(self.module)
            module.load_state_dict(params, strict=True)
            return module.eval()
        directory = Path(path)
        if not (directory / ADAPTER_CONFIG_FILE).is_file():
            raise WeightFileError(f"adapter directory {directory} has no {ADAPTER_CONFIG_FILE}")
        cfg = read_json(directory / ADAPTER_CONFIG_FILE, "adapter config")  # corrupt JSON → WeightFileError
        if isinstance(cfg, dict) and "r" in cfg and cfg["r"] != self.lora_config.r:
            # PEFT would build rank-r layers and fail copying the (checked) tensors into them.
            raise TargetMismatchError(f"{directory / ADAPTER_CONFIG_FILE}: 'r' is {cfg['r']!r}, expected "
                                      f"{self.lora_config.r} (the rank of the adapter tensors and of this target)")
        if isinstance(cfg, dict):  # PEFT would load a DoRA or base-rewriting adapter as something else
            known = {k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__}
            try:
                _check_plain_lora(make_lora_config(known))
            except (TargetMismatchError, ValueError, TypeError) as exc:  # ValueError: not a valid LoraConfig
                raise TargetMismatchError(f"{directory / ADAPTER_CONFIG_FILE}: "
                                          f"{str(exc).strip().splitlines()[-1]}") from None
        try:
            model = PeftModel.from_pretrained(copy.deepcopy(self.module), str(directory))
        except (RuntimeError, ValueError, TypeError) as exc:  # any other config/tensor disagreement
            raise TargetMismatchError(f"{directory}: PEFT cannot load this adapter: "
                                      f"{str(exc).strip().splitlines()[-1]}") from None
        loaded = {name: float(layer.scaling["default"]) for name, layer in model.base_model.model.named_modules()
                  if isinstance(layer, LoraLayer)}
        for slot in self._slots:
            name = slot.module_name
            if name not in loaded or abs(loaded[name] - slot.scaling) > 1e-12:
                raise TargetMismatchError(f"{directory / ADAPTER_CONFIG_FILE}: module '{name}' has LoRA scaling "
                                          f"{loaded.get(name)}, expected {slot.scaling}")
        return model.eval()


def make_lora_config(config: Mapping[str, Any] | LoraConfig) -> LoraConfig:
    """A ``LoraConfig`` from keyword arguments or an ``adapter_config.json`` dict.

    Raises:
        TargetMismatchError: an unknown key (named) or a non-LoRA config.
    """
    if isinstance(config, LoraConfig):
        return copy.deepcopy(config)
    kwargs = dict(config)
    peft_type = str(kwargs.get("peft_type", "LORA"))
    if peft_type.split(".")[-1].upper() != "LORA":
        raise TargetMismatchError(f"lora_config: peft_type is {peft_type!r}, expected 'LORA'")
    fields = set(LoraConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TargetMismatchError(f"lora_config: unknown key '{unknown[0]}'; expected LoraConfig fields")
    return LoraConfig(**kwargs)


def load_base_network(network: nn.Module, state: Mapping[str, torch.Tensor],
                      source: str | os.PathLike = "<base_state>") -> nn.Module:
    """Load a base network's weights strictly into ``network`` (in place); return it frozen, in eval mode.

    Args:
        network: a module of the base architecture.
        state: its state dict, e.g. read from a zoo's ``base/model.safetensors``.
        source: the file ``state`` was read from, named in errors.

    Raises:
        TargetMismatchError: a missing or unexpected key, or a tensor of the wrong shape, named.
    """
    expected = network.state_dict()
    arch = type(network).__name__
    for k, want in expected.items():
        if k not in state:
            raise TargetMismatchError(f"base weights {source}: missing key '{k}' for the {arch} network")
        if tuple(state[k].shape) != tuple(want.shape):
            raise TargetMismatchError(f"base weights {source}: tensor '{k}' has shape {tuple(state[k].shape)}, "
                                      f"expected {tuple(want.shape)}")
    for k in state:
        if k not in expected:
            raise TargetMismatchError(f"base weights {source}: unexpected key '{k}' for the {arch} network")
    network.load_state_dict(state, strict=True)
    return network.eval().requires_grad_(False)
