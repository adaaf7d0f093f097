"""`TokenLayout`: how a state dict is cut into fixed-size weight tokens, saved beside every dataset.

A layout is data. It records, in the state dict's own key order (never ``named_parameters()``
order), every tokenised tensor's name, shape, dtype, offset in the flat parameter vector and the
tokens it owns, plus the per-tensor normalisation statistics. Tensors that are not tokenised
(a LoRA-only or head-only selection, integer buffers) are recorded as *passthrough* tensors:
decoding takes them from a base state dict.

Worked example (token size ``D = 4``, state dict ``{"fc.weight": (2, 3), "fc.bias": (2,)}``)::

    flat (P=8)      = [w00 w01 w02 w10 w11 w12 | b0 b1]
    tensor  offset numel first_token tokens
    fc.weight    0     6           0      2     -> token 0 = w00..w10, token 1 = w11 w12 0 0
    fc.bias      6     2           2      1     -> token 2 = b0 b1 0 0
    token_length     = [4, 2, 2]
    token_src_offset = [0, 4, 6]
    token_chunk_index= [0, 1, 0]

On disk a layout is ``layout.json`` (everything but the statistics) and
``layout_stats.safetensors`` (``mean (T,)``, ``std (T,)`` float32).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from weightdiff.errors import LayoutFileError, LayoutMismatchError, WeightFileError
from weightdiff.io import atomic_path, load_weights, save_weights

FORMAT_VERSION = 1
LAYOUT_FILE = "layout.json"
STATS_FILE = "layout_stats.safetensors"

#: Tensor kinds, embedded as a token type. The index in this tuple is the value of ``token_kind``.
#: ``weight``: 2-D linear weight; ``bias``: a bias of any non-norm layer; ``conv_weight``: weight
#: with 3+ dims (Conv1d/2d/3d); ``lora_A`` / ``lora_B``: LoRA factors (PEFT ``lora_A``/``lora_B``
#: and ``lora_embedding_A``/``_B``); ``norm``: weights, biases and running statistics of
#: normalisation layers; ``embedding``: 2-D embedding tables; ``other``: anything else.
KINDS: tuple[str, ...] = ("weight", "bias", "conv_weight", "lora_A", "lora_B", "norm", "embedding", "other")

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
              torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
}
_NORM_MODULE = re.compile(r"(^|_)(layer_?norm|ln|bn|batch_?norm|group_?norm|norm)\d*(_|$)", re.IGNORECASE)
_NORM_BUFFERS = ("running_mean", "running_var")
_LORA_PART = re.compile(r"^lora_(embedding_)?([AB])$")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32 -> "float32"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """``"float32" -> torch.float32``; raises ``KeyError`` for unknown names."""
    return _DTYPES[name]


def module_of(name: str) -> str:
    """The module a tensor belongs to: its name without the parameter part.

    LoRA factors belong to the layer they adapt, so that ``A`` and ``B`` share a depth:
    ``"m.q.lora_A.weight" -> "m.q"``, ``"m.q.lora_B.default.weight" -> "m.q"``, ``"0.bias" -> "0"``.
    """
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if _LORA_PART.match(parts[i]):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def norm_modules(shapes: Mapping[str, Sequence[int]]) -> set[str]:
    """Modules that look like normalisation layers: a 1-D ``weight`` or running statistics.

    Needed because ``nn.Sequential`` names (``"1.weight"``) do not say that layer 1 is a BatchNorm.
    """
    out = set()
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _NORM_BUFFERS or (leaf == "weight" and len(shape) == 1):
            out.add(module_of(name))
    return out


def infer_kind(name: str, shape: Sequence[int], in_norm_module: bool = False) -> str:
    """The kind (one of :data:`KINDS`) of a tensor, from its name and shape.

    ``in_norm_module``: the tensor's module is a normalisation layer (see :func:`norm_modules`).
    """
    parts = name.split(".")
    for part in parts:
        m = _LORA_PART.match(part)
        if m:
            return f"lora_{m.group(2)}"
    leaf = parts[-1]
    owner = parts[-2] if len(parts) > 1 else ""
    if in_norm_module or leaf in _NORM_BUFFERS or _NORM_MODULE.search(owner):
        return "norm"
    if leaf == "bias":
        return "bias"
    if len(shape) == 2 and "embed" in name.lower():
        return "embedding"
    if len(shape) == 2:
        return "weight"
    if len(shape) >= 3:
        return "conv_weight"
    return "other"


@dataclass(frozen=True)
class TensorSpec:
    """One tokenised tensor: where it lives in the flat vector and which tokens hold it.

    ``depth`` is the index of its module (:func:`module_of`) among the layout's modules in order
    of first appearance; ``kind`` is one of :data:`KINDS`.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    numel: int
    first_token: int
    num_tokens: int
    depth: int
    kind: str


@dataclass(frozen=True)
class PassthroughSpec:
    """A tensor of the state dict that is not tokenised; decoding takes it from ``base``."""

    name: str
    shape: tuple[int, ...]
    dtype: str


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(TensorSpec))
_PASS_FIELDS = tuple(f.name for f in dataclasses.fields(PassthroughSpec))
_TOP_FIELDS = ("format_version", "token_size", "normalize", "key_order", "tensors", "passthrough")


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """Ordered tensor specs, token size and normalisation statistics of a tokenised state dict.

    Attributes:
        token_size: ``D``, entries per token.
        tensors: the ``T`` tokenised tensors, in state-dict order.
        passthrough: tensors of the state dict that are not tokenised.
        key_order: every key of the original state dict, in its order.
        normalize: whether tokens are ``(w - mean[t]) / std[t]`` (else ``mean = 0``, ``std = 1``).
        mean, std: ``(T,)`` float32 per-tensor statistics.
    """

    token_size: int
    tensors: tuple[TensorSpec, ...]
    passthrough: tuple[PassthroughSpec, ...] = ()
    key_order: tuple[str, ...] = ()
    normalize: bool = False
    mean: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    std: torch.Tensor = field(default_factory=lambda: torch.ones(0))
    format_version: int = FORMAT_VERSION

    # ----------------------------------------------------------------------------------- build
    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], token_size: int,
                    selected: Sequence[str] | None = None) -> TokenLayout:
        """Lay out tensors given ``{name: (shape, dtype)}`` in that order.

        Args:
            shapes: every tensor of the state dict, in key order.
            token_size: ``D``.
            selected: names to tokenise (default: all); the rest become passthrough tensors.
        """
        if token_size < 1:
            raise ValueError(f"token_size must be >= 1, got {token_size}")
        chosen = set(shapes) if selected is None else set(selected)
        specs: list[TensorSpec] = []
        passthrough: list[PassthroughSpec] = []
        modules: dict[str, int] = {}
        norms = norm_modules({k: v[0] for k, v in shapes.items()})
        offset = first = 0
        for name, (shape, dtype) in shapes.items():
            shape = tuple(int(s) for s in shape)
            if name not in chosen:
                passthrough.append(PassthroughSpec(name, shape, dtype_name(dtype)))
                continue
            numel = math.prod(shape)
            n_tok = -(-numel // token_size)
            depth = modules.setdefault(module_of(name), len(modules))
            specs.append(TensorSpec(name, shape, dtype_name(dtype), offset, numel, first, n_tok, depth,
                                    infer_kind(name, shape, module_of(name) in norms)))
            offset += numel
            first += n_tok
        t = len(specs)
        return cls(token_size=token_size, tensors=tuple(specs), passthrough=tuple(passthrough),
                   key_order=tuple(shapes), normalize=False,
                   mean=torch.zeros(t, dtype=torch.float32), std=torch.ones(t, dtype=torch.float32))

    def with_stats(self, mean: torch.Tensor, std: torch.Tensor) -> TokenLayout:
        """A copy with normalisation on and the given ``(T,)`` statistics."""
        for what, v in (("mean", mean), ("std", std)):
            if tuple(v.shape) != (self.num_tensors,):
                raise LayoutMismatchError(f"{what} has shape {tuple(v.shape)}, expected ({self.num_tensors},)")
        return dataclasses.replace(self, normalize=True, mean=mean.detach().to(torch.float32).cpu().clone(),
                                   std=std.detach().to(torch.float32).cpu().clone())

    # --------------------------------------------------------------------------------- sizes
    @property
    def num_tensors(self) -> int:
        """``T``."""
        return len(self.tensors)

    @property
    def num_tokens(self) -> int:
        """``L``."""
        return sum(s.num_tokens for s in self.tensors)

    @property
    def num_params(self) -> int:
        """``P``, entries of the flat vector of tokenised tensors."""
        return sum(s.numel for s in self.tensors)

    @property
    def max_chunks(self) -> int:
        """Size of a chunk-index embedding table: ``token_chunk_index < max_chunks``."""
        return max((s.num_tokens for s in self.tensors), default=0)

    @property
    def max_depth(self) -> int:
        """Size of a depth embedding table: ``token_depth < max_depth``."""
        return max((s.depth + 1 for s in self.tensors), default=0)

    @property
    def num_kinds(self) -> int:
        """Size of a kind embedding table (``len(KINDS)``, fixed so layouts share it)."""
        return len(KINDS)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the tokenised tensors, in order."""
        return tuple(s.name for s in self.tensors)

    # ------------------------------------------------------------------------ per-token ids
    def _per_token(self, values: Sequence[int]) -> torch.Tensor:
        counts = torch.tensor([s.num_tokens for s in self.tensors], dtype=torch.long)
        return torch.repeat_interleave(torch.tensor(list(values), dtype=torch.long), counts)

    @cached_property
    def token_tensor_index(self) -> torch.Tensor:
        """``(L,)`` index of each token's tensor in :attr:`tensors`."""
        return self._per_token(range(self.num_tensors))

    @cached_property
    def token_chunk_index(self) -> torch.Tensor:
        """``(L,)`` position of each token inside its tensor (0 for a tensor's first token)."""
        first = torch.tensor([s.first_token for s in self.tensors], dtype=torch.long)
        return torch.arange(self.num_tokens, dtype=torch.long) - first[self.token_tensor_index]

    @cached_property
    def token_depth(self) -> torch.Tensor:
        """``(L,)`` module index (depth) of each token."""
        return self._per_token([s.depth for s in self.tensors])

    @cached_property
    def token_kind(self) -> torch.Tensor:
        """``(L,)`` index into :data:`KINDS` of each token's tensor kind."""
        return self._per_token([KINDS.index(s.kind) for s in self.tensors])

    @cached_property
    def token_src_offset(self) -> torch.Tensor:
        """``(L,)`` offset in the flat ``(P,)`` vector of each token's first entry."""
        offset = torch.tensor([s.offset for s in self.tensors], dtype=torch.long)
        return offset[self.token_tensor_index] + self.token_chunk_index * self.token_size

    @cached_property
    def token_length(self) -> torch.Tensor:
        """``(L,)`` number of valid entries of each token (``token_size`` except a tensor's last)."""
        numel = torch.tensor([s.numel for s in self.tensors], dtype=torch.long)
        offset = torch.tensor([s.offset for s in self.tensors], dtype=torch.long)
        idx = self.token_tensor_index
        end = offset[idx] + numel[idx]
        return torch.clamp(end - self.token_src_offset, max=self.token_size)

    def valid_mask(self) -> torch.Tensor:
        """``(L, D)`` bool, True where a token entry holds a weight (False on padding)."""
        return torch.arange(self.token_size)[None, :] < self.token_length[:, None]

    # ----------------------------------------------------------------------------- on disk
    def to_json(self) -> dict:
        """Everything but the statistics, as a JSON-ready dict."""
        return {
            "format_version": self.format_version,
            "token_size": self.token_size,
            "normalize": self.normalize,
            "key_order": list(self.key_order),
            "tensors": [{**dataclasses.asdict(s), "shape": list(s.shape)} for s in self.tensors],
            "passthrough": [{**dataclasses.asdict(s), "shape": list(s.shape)} for s in self.passthrough],
        }

    def save(self, directory: str | Path) -> None:
        """Write ``layout.json`` and ``layout_stats.safetensors`` (each atomically) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(directory / STATS_FILE, {"mean": self.mean, "std": self.std},
                     metadata={"format_version": str(self.format_version)})
        with atomic_path(directory / LAYOUT_FILE) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> TokenLayout:
        """Read a layout saved by :meth:`save`.

        Raises:
            LayoutFileError: naming the file, for a missing, truncated or corrupt file, a wrong
                format version, missing keys, inconsistent offsets or statistics of the wrong shape.
        """
        directory = Path(directory)
        path = directory / LAYOUT_FILE
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise LayoutFileError(f"layout file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LayoutFileError(f"layout file {path} is truncated or not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise LayoutFileError(f"layout file {path}: expected a JSON object, got {type(obj).__name__}")
        if "format_version" not in obj:
            raise LayoutFileError(f"layout file {path}: missing key 'format_version'")
        if obj["format_version"] != FORMAT_VERSION:
            raise LayoutFileError(f"layout file {path}: format_version {obj['format_version']!r} is not "
                                  f"supported (expected {FORMAT_VERSION})")
        for key in _TOP_FIELDS:
            if key not in obj:
                raise LayoutFileError(f"layout file {path}: missing key '{key}'")
        try:
            specs = tuple(_spec_from_json(d, TensorSpec, _SPEC_FIELDS) for d in obj["tensors"])
            passthrough = tuple(_spec_from_json(d, PassthroughSpec, _PASS_FIELDS) for d in obj["passthrough"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutFileError(f"layout file {path}: malformed tensor entry: {exc}") from None
        token_size = obj["token_size"]
        if not isinstance(token_size, int) or token_size < 1:
            raise LayoutFileError(f"layout file {path}: token_size must be a positive int, got {token_size!r}")
        _check_consistent(specs, token_size, path)

        stats_path = directory / STATS_FILE
        try:
            stats = load_weights(stats_path)
        except WeightFileError as exc:
            raise LayoutFileError(f"layout statistics file {stats_path}: {exc}") from None
        t = len(specs)
        for key in ("mean", "std"):
            if key not in stats:
                raise LayoutFileError(f"layout statistics file {stats_path}: missing tensor '{key}'")
            if tuple(stats[key].shape) != (t,):
                raise LayoutFileError(f"layout statistics file {stats_path}: '{key}' has shape "
                                      f"{tuple(stats[key].shape)}, expected ({t},) to match {path}")
        return cls(token_size=token_size, tensors=specs, passthrough=passthrough,
                   key_order=tuple(obj["key_order"]), normalize=bool(obj["normalize"]),
                   mean=stats["mean"].to(torch.float32), std=stats["std"].to(torch.float32),
                   format_version=obj["format_version"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenLayout):
            return NotImplemented
        return (self.to_json() == other.to_json() and torch.equal(self.mean, other.mean)
                and torch.equal(self.std, other.std))

    def __hash__(self) -> int:
        # Consistent with __eq__: equal layouts have equal JSON (the stats only refine equality).
        return hash(json.dumps(self.to_json()))


def _spec_from_json(d: dict, cls: type, fields: tuple[str, ...]):
    missing = [f for f in fields if f not in d]
    if missing:
        raise KeyError(f"entry {d.get('name', '?')!r} lacks {missing}")
    kwargs = {f: d[f] for f in fields}
    kwargs["shape"] = tuple(int(s) for s in d["shape"])
    if d["dtype"] not in _DTYPES:
        raise ValueError(f"entry {d['name']!r} has unknown dtype {d['dtype']!r}")
    if cls is TensorSpec and d["kind"] not in KINDS:
        raise ValueError(f"entry {d['name']!r} has unknown kind {d['kind']!r} (known: {KINDS})")
    return cls(**kwargs)


def _check_consistent(specs: tuple[TensorSpec, ...], token_size: int, path: Path) -> None:
    """Offsets and token counts must chain exactly, or tokens would decode into the wrong tensors."""
    offset = first = 0
    for s in specs:
        expect = (offset, math.prod(s.shape), first, -(-math.prod(s.shape) // token_size))
        if (s.offset, s.numel, s.first_token, s.num_tokens) != expect:
            raise LayoutFileError(
                f"layout file {path}: tensor '{s.name}' has (offset, numel, first_token, num_tokens) = "
                f"{(s.offset, s.numel, s.first_token, s.num_tokens)}, expected {expect}")
        offset += s.numel
        first += s.num_tokens
