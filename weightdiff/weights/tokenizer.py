"""`WeightTokenizer`: an invertible map between state dicts and fixed-size weight tokens.

A state dict's selected floating-point tensors are flattened in key order into one ``(P,)``
vector, cut into tokens of ``D`` entries (each tensor starts a new token; its last token is
zero-padded) and, when fitted, normalised per tensor: ``token = (w - mean[t]) / std[t]``.
The layout (:class:`~weightdiff.weights.layout.TokenLayout`) says where every entry goes, so decoding
needs no model code and never relies on ``named_parameters()`` order.

Example (``D = 4``)::

    sd = {"fc.weight": (2, 3) float32, "fc.bias": (2,) float32}
    tok = WeightTokenizer.from_state_dict(sd, token_size=4)
    tokens, mask = tok.encode(sd)          # (3, 4) float32, (3, 4) bool
    # tokens[1] = [w11, w12, 0, 0], mask[1] = [T, T, F, F]
    tok.decode(tokens)                     # == sd, bit for bit (no normalisation)

Without normalisation encode -> decode is exact (float16/bfloat16 are exact in float32); with it
the round trip is exact up to float32 rounding of ``(w - mean) / std * std + mean``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from weightdiff.errors import LayoutMismatchError, NonFiniteWeightsError
from weightdiff.kernels import pack, unpack
from weightdiff.weights.layout import TokenLayout, parse_dtype

# Floor on the fitted per-tensor std. A tensor that is (nearly) constant across the population
# (a LoRA B left at zero, a norm scale fixed at 1) has std ~0; dividing by it would turn float32
# rounding noise of ``w - mean`` (about 1e-7 * |mean|) into O(1) token values and blow a
# generator's small errors up on decode. The floor is absolute (for zero-mean tensors) and
# relative to |mean| (rounding noise scales with the magnitude), so such tensors encode to ~0.
STD_FLOOR_ABS = 1e-6
STD_FLOOR_REL = 1e-4


def _select(sd: Mapping[str, torch.Tensor], include: Sequence[str] | str | None) -> list[str]:
    """Names of the tensors to tokenise, in state-dict order."""
    floats = [k for k, v in sd.items() if v.is_floating_point()]
    if include is None:
        return floats
    if isinstance(include, str):
        pattern = re.compile(include)
        chosen = [k for k in floats if pattern.search(k)]
        if not chosen:
            raise LayoutMismatchError(f"include pattern {include!r} matches none of the "
                                      f"{len(floats)} floating-point tensors of the state dict")
        return chosen
    wanted = set(include)
    missing = [k for k in include if k not in sd]
    if missing:
        raise LayoutMismatchError(f"include names tensors not in the state dict: {missing}")
    not_float = [k for k in include if not sd[k].is_floating_point()]
    if not_float:
        raise LayoutMismatchError(f"include names non-floating-point tensors, which cannot be "
                                  f"tokenised: {[(k, str(sd[k].dtype)) for k in not_float]}")
    return [k for k in sd if k in wanted]


def _count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf entries of ``t``, found by one float64 sum in the common all-finite case.

    NaN/Inf propagate into the sum, and finite float32/16 values cannot overflow a float64 sum,
    so the exact (slower) count runs only when something is there to count.
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=torch.float64))):
        return 0
    return int((~torch.isfinite(t)).sum())


class WeightTokenizer:
    """Encode state dicts to ``(L, D)`` tokens and decode them back, following a :class:`TokenLayout`.

    Args:
        layout: the layout; build one with :meth:`from_state_dict` and fit statistics with :meth:`fit`.
    """

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout
        self._buffers: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __repr__(self) -> str:
        lay = self.layout
        return (f"WeightTokenizer(tensors={lay.num_tensors}, params={lay.num_params}, tokens={lay.num_tokens}, "
                f"token_size={lay.token_size}, normalize={lay.normalize}, passthrough={len(lay.passthrough)})")

    # ------------------------------------------------------------------------------- build
    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], token_size: int = 64,
                        include: Sequence[str] | str | None = None) -> WeightTokenizer:
        """A tokenizer (normalisation off) laid out after ``sd``.

        Args:
            sd: a reference state dict; only names, shapes and dtypes are read.
            token_size: ``D``.
            include: tensors to tokenise: a list of names, or a regex matched with ``re.search``
                against each name (e.g. ``r"lora_"``, ``r"^fc\\."``). Default: every floating-point
                tensor. Tensors left out (and integer buffers) are taken from ``base`` at decode.
        """
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
        layout = TokenLayout.from_shapes(shapes, token_size, _select(sd, include))
        if layout.num_params == 0:
            raise LayoutMismatchError(f"nothing to tokenise: the selected tensors {list(layout.names)} "
                                      "hold no entries")
        return cls(layout)

    def fit(self, state_dicts: Iterable[Mapping[str, torch.Tensor]]) -> WeightTokenizer:
        """A new tokenizer with per-tensor mean/std over a population of state dicts.

        Streams: each state dict is reduced to per-tensor (count, mean, M2) in float64 and merged
        with Chan et al.'s parallel update, so only one checkpoint is in memory at a time and
        ``E[w^2] - E[w]^2`` cancellation never arises. The std is the population std over every
        entry of the tensor in every checkpoint, floored (see :data:`STD_FLOOR_ABS`).
        """
        t = self.layout.num_tensors
        count = torch.zeros(t, dtype=torch.float64)
        mean = torch.zeros(t, dtype=torch.float64)
        m2 = torch.zeros(t, dtype=torch.float64)
        seen = 0
        for i, sd in enumerate(state_dicts):
            self.check_state_dict(sd, source=f"state dict #{i} of the fit population")
            n_b = torch.zeros(t, dtype=torch.float64)
            mean_b = torch.zeros(t, dtype=torch.float64)
            m2_b = torch.zeros(t, dtype=torch.float64)
            for j, spec in enumerate(self.layout.tensors):
                if spec.numel == 0:
                    continue
                x = sd[spec.name].detach().reshape(-1).to(device="cpu", dtype=torch.float64)
                n_b[j] = spec.numel
                mean_b[j] = x.mean()
                m2_b[j] = torch.sum((x - mean_b[j]) ** 2)
            # Chan, Golub & LeVeque (1979): merge (n_a, mean_a, M2_a) with (n_b, mean_b, M2_b).
            total = count + n_b
            delta = mean_b - mean
            safe = total.clamp(min=1)
            mean = mean + delta * n_b / safe
            m2 = m2 + m2_b + delta**2 * count * n_b / safe
            count = total
            seen += 1
        if seen == 0:
            raise ValueError("fit() needs at least one state dict")
        std = torch.sqrt(m2 / count.clamp(min=1))
        floor = torch.clamp(STD_FLOOR_REL * mean.abs(), min=STD_FLOOR_ABS)
        std = torch.maximum(std, floor)
        return WeightTokenizer(self.layout.with_stats(mean.float(), std.float()))

    # --------------------------------------------------------------------------- checking
    def check_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "state dict",
                         check_finite: bool = True) -> None:
        """Raise if ``sd`` does not fit the layout.

        Raises:
            LayoutMismatchError: a tokenised tensor is missing, a key is unknown to the layout, or
                a tensor has the wrong shape or dtype (naming the key, expected and actual).
            NonFiniteWeightsError: a tokenised tensor holds NaN/Inf.
        """
        lay = self.layout
        missing = [s.name for s in lay.tensors if s.name not in sd]
        if missing:
            raise LayoutMismatchError(f"{source} is missing tensor(s) {missing} expected by the layout")
        known = set(lay.key_order)
        extra = [k for k in sd if k not in known]
        if extra:
            raise LayoutMismatchError(f"{source} has key(s) {extra} that are not in the layout "
                                      f"(expected keys from {list(lay.key_order)[:5]}...)")
        for spec in lay.tensors:
            t = sd[spec.name]
            if tuple(t.shape) != spec.shape:
                raise LayoutMismatchError(f"{source}: tensor '{spec.name}' has shape {tuple(t.shape)}, "
                                          f"expected {spec.shape}")
            if t.dtype != parse_dtype(spec.dtype):
                raise LayoutMismatchError(f"{source}: tensor '{spec.name}' has dtype "
                                          f"{str(t.dtype).removeprefix('torch.')}, expected {spec.dtype}")
            bad = _count_nonfinite(t) if check_finite else 0
            if bad:
                raise NonFiniteWeightsError(f"{source}: tensor '{spec.name}' has {bad} non-finite "
                                            "values (NaN/Inf)")

    def _check_tokens(self, tokens: torch.Tensor, batched: bool) -> None:
        lay = self.layout
        want = (lay.num_tokens, lay.token_size)
        if tokens.dim() != (3 if batched else 2) or tuple(tokens.shape[-2:]) != want:
            expected = f"(B, {want[0]}, {want[1]})" if batched else str(want)
            raise LayoutMismatchError(f"tokens have shape {tuple(tokens.shape)}, expected {expected} "
                                      "(num_tokens, token_size) of the layout")

    def _layout_buffers(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(src_offset, length, tensor_index, mean, std)`` on ``device``, cached."""
        if device not in self._buffers:
            lay = self.layout
            self._buffers[device] = tuple(
                x.to(device) for x in (lay.token_src_offset, lay.token_length, lay.token_tensor_index,
                                       lay.mean, lay.std))
        return self._buffers[device]

    def _raise_nonfinite(self, flat: torch.Tensor, source: str) -> None:
        """Name the first tensor (and batch row) of ``flat (B, P)`` holding NaN/Inf."""
        for spec in self.layout.tensors:
            bad = ~torch.isfinite(flat[:, spec.offset:spec.offset + spec.numel])
            if bool(bad.any()):
                row = int(bad.any(dim=1).nonzero()[0, 0])
                raise NonFiniteWeightsError(f"{source}: tensor '{spec.name}' has {int(bad[row].sum())} "
                                            f"non-finite values (NaN/Inf) in batch row {row}")

    # ------------------------------------------------------------------------ flat vectors
    def flatten(self, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The tokenised tensors of ``sd`` concatenated in layout order: ``(P,)`` float32."""
        self.check_state_dict(sd, check_finite=False)
        return self._flat(sd)

    def _flat(self, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = [sd[s.name].reshape(-1).to(torch.float32) for s in self.layout.tensors]
        return torch.cat(parts) if parts else torch.zeros(0)

    def flatten_batch(self, sds: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Stack :meth:`flatten` of several state dicts into one preallocated ``(B, P)`` float32."""
        sds = list(sds)
        device = next(iter(sds[0].values())).device if sds and sds[0] else torch.device("cpu")
        out = torch.empty(len(sds), self.layout.num_params, dtype=torch.float32, device=device)
        for b, sd in enumerate(sds):
            self.check_state_dict(sd, source=f"state dict #{b}", check_finite=False)
            torch.cat([sd[s.name].detach().reshape(-1).to(torch.float32) for s in self.layout.tensors],
                      out=out[b])
        return out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`flatten`: ``(P,)`` -> tensors with the original shapes and dtypes.

        Every tensor is its own contiguous copy (no shared storage, so it can be saved as is).
        """
        if tuple(flat.shape) != (self.layout.num_params,):
            raise LayoutMismatchError(f"flat vector has shape {tuple(flat.shape)}, "
                                      f"expected ({self.layout.num_params},)")
        return {s.name: flat[s.offset:s.offset + s.numel].view(s.shape).to(parse_dtype(s.dtype), copy=True)
                for s in self.layout.tensors}

    # ------------------------------------------------------------------------------ encode
    def encode(self, sd: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of one state dict.

        Returns:
            ``tokens (L, D)`` float32 (zero on padding) and ``mask (L, D)`` bool (True on weights).
        """
        self.check_state_dict(sd)
        flat = self._flat(sd)
        tokens = self._pack(flat[None])[0]
        return tokens, self.layout.valid_mask().to(tokens.device)

    def encode_batch(self, sds: Sequence[Mapping[str, torch.Tensor]] | torch.Tensor, *,
                     out: torch.Tensor | None = None, check_finite: bool = True) -> torch.Tensor:
        """Tokens of several state dicts, or of a stacked ``(B, P)`` flat tensor: ``(B, L, D)``.

        The flat-tensor form is the fast path: one :func:`~weightdiff.kernels.pack` call for the
        batch, no per-checkpoint Python work. ``out``: an optional preallocated contiguous
        ``(B, L, D)`` float32 buffer (saves the page faults of a fresh allocation when encoding
        many batches; not with autograd). Non-finite values raise :class:`NonFiniteWeightsError`
        naming the tensor and batch row; ``check_finite=False`` skips that check (one extra read
        of the batch) for inputs already checked, e.g. loaded by :func:`weightdiff.io.load_weights`.
        """
        if isinstance(sds, torch.Tensor):
            flat = sds
            if flat.dim() != 2 or flat.shape[1] != self.layout.num_params:
                raise LayoutMismatchError(f"flat batch has shape {tuple(flat.shape)}, "
                                          f"expected (B, {self.layout.num_params})")
            if flat.dtype != torch.float32:
                raise LayoutMismatchError(f"flat batch has dtype {flat.dtype}, expected torch.float32")
        else:
            flat = self.flatten_batch(sds)
        # One read-only reduction finds any NaN/Inf (they propagate into the sum); only on a
        # hit is the slow per-tensor search run to name the culprit.
        if check_finite and flat.numel() and not bool(torch.isfinite(flat.sum())):
            self._raise_nonfinite(flat, "encode_batch")
        return self._pack(flat, out)

    def _pack(self, flat: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        src, length, index, mean, std = self._layout_buffers(flat.device)
        return pack(flat, src, length, index, mean, std, self.layout.token_size, out=out)

    # ------------------------------------------------------------------------------ decode
    def _unpack(self, tokens: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        src, length, index, mean, std = self._layout_buffers(tokens.device)
        return unpack(tokens, src, length, index, mean, std, self.layout.num_params, out=out)

    def decode_flat(self, tokens: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens (B, L, D) -> flat (B, P)`` float32 (differentiable; padding is ignored).

        ``out``: optional preallocated contiguous ``(B, P)`` float32 buffer (not with autograd).
        """
        self._check_tokens(tokens, batched=True)
        return self._unpack(tokens, out)

    def decode_float(self, tokens: torch.Tensor, *, out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``tokens (B, L, D) -> {name: (B, *shape)}`` float32, differentiable.

        The tensors are views of one ``(B, P)`` buffer (no copy per tensor), which is what a
        functional loss through ``torch.func.functional_call`` wants. ``out`` as in :meth:`decode_flat`.
        """
        flat = self.decode_flat(tokens, out=out)
        b = flat.shape[0]
        return {s.name: flat[:, s.offset:s.offset + s.numel].view(b, *s.shape) for s in self.layout.tensors}

    def decode(self, tokens: torch.Tensor, base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``tokens (L, D) ->`` state dict with the original shapes and dtypes.

        Args:
            tokens: ``(L, D)``; padding entries are ignored.
            base: supplies the tensors the layout does not tokenise (passthrough tensors). Without
                it only the tokenised tensors are returned.

        Returns:
            A state dict in the original key order (passthrough tensors only when ``base`` is given).

        Raises:
            LayoutMismatchError: tokens of the wrong shape, or ``base`` lacking a passthrough tensor
                or holding it with another shape/dtype.
            NonFiniteWeightsError: the decoded weights hold NaN/Inf.
        """
        self._check_tokens(tokens, batched=False)
        return self._assemble(self._unpack(tokens.detach()[None])[0], base)

    def decode_batch(self, tokens: torch.Tensor,
                     base: Mapping[str, torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
        """``tokens (B, L, D) ->`` a list of ``B`` state dicts (see :meth:`decode`); one unpack call."""
        flat = self.decode_flat(tokens.detach())
        return [self._assemble(row, base) for row in flat]

    def _assemble(self, flat: torch.Tensor, base: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if flat.numel() and not bool(torch.isfinite(flat.sum())):
            self._raise_nonfinite(flat[None], "decoded tokens")
        out = self.unflatten(flat)
        if base is None:
            return out
        for spec in self.layout.passthrough:
            if spec.name not in base:
                raise LayoutMismatchError(f"base state dict is missing tensor '{spec.name}', which the "
                                          f"layout does not tokenise (expected shape {spec.shape}, {spec.dtype})")
            t = base[spec.name]
            if tuple(t.shape) != spec.shape or t.dtype != parse_dtype(spec.dtype):
                raise LayoutMismatchError(
                    f"base state dict: tensor '{spec.name}' has shape {tuple(t.shape)} and dtype "
                    f"{str(t.dtype).removeprefix('torch.')}, expected {spec.shape} and {spec.dtype}")
            out[spec.name] = t.detach().clone()
        return {k: out[k] for k in self.layout.key_order}

    # ----------------------------------------------------------------------------- on disk
    def save(self, directory: str | Path) -> None:
        """Save the layout (``layout.json`` + ``layout_stats.safetensors``) into ``directory``."""
        self.layout.save(directory)

    @classmethod
    def load(cls, directory: str | Path) -> WeightTokenizer:
        """Load a tokenizer saved by :meth:`save` (raises ``LayoutFileError`` naming the file)."""
        return cls(TokenLayout.load(directory))
