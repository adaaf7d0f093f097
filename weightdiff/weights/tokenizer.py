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

State dicts in and out (:meth:`WeightTokenizer.encode_batch` of a list, :meth:`~WeightTokenizer.decode`,
:meth:`~WeightTokenizer.decode_batch`) skip the ``(B, P)`` intermediate: a large tensor's entries
are one contiguous slice of its token row, moved by one multiply-add straight between its own
storage and the tokens; the small tensors of a batch go through one pack/unpack call. Both use
the arithmetic of :func:`~weightdiff.kernels.pack` / :func:`~weightdiff.kernels.unpack`, so every
route gives the same bits, and every decoded tensor owns its storage.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from weightdiff.errors import LayoutMismatchError, NonFiniteWeightsError
from weightdiff.kernels import pack, unpack
from weightdiff.kernels.pack import normalizer
from weightdiff.weights.layout import TokenLayout, parse_dtype

# Floor on the fitted per-tensor std. A tensor that is (nearly) constant across the population
# (a LoRA B left at zero, a norm scale fixed at 1) has std ~0; dividing by it would turn float32
# rounding noise of ``w - mean`` (about 1e-7 * |mean|) into O(1) token values and blow a
# generator's small errors up on decode. The floor is absolute (for zero-mean tensors) and
# relative to |mean| (rounding noise scales with the magnitude), so such tensors encode to ~0.
STD_FLOOR_ABS = 1e-6
STD_FLOOR_REL = 1e-4

# State dicts in and out: a tensor of more entries than this moves by its own multiply-add (one
# pass, no intermediate); smaller ones, where the ~10 us of each torch call outweighs moving the
# data, go through one pack/unpack call for the whole batch (measured on CPU, 1 thread: equal at
# about 8k entries; 4k keeps the per-call cost small for the tensors that take the direct path).
SMALL_TENSOR_NUMEL = 4096
# ... and is moved in pieces of this many entries (512 KB of float32), each summed for the NaN/Inf
# check right after it is written, while it is still in the core's L2 cache (2 MB here): summing a
# whole multi-MB tensor afterwards reads it back from slower memory (measured: ~1.3 ms of ~9 ms
# saved on 50 MB of CPU state dicts).
CHECK_CHUNK_NUMEL = 1 << 17


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


class _Span(NamedTuple):
    """One tokenised tensor inside a token row flattened to ``(L * D,)``, and its affine map.

    A tensor's tokens are consecutive and only its last one is padded, so its ``numel`` entries
    are the contiguous slice ``[start, start + numel)`` of the row (``start = first_token * D``):
    one elementwise op moves the whole tensor. ``scale`` is a python number and ``shift`` a 0-d
    tensor, ``torch.add(shift, x, alpha=scale)``: the multiply-add the kernels' torch paths run,
    so both routes give the same bits.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    numel: int
    scale: float
    shift: torch.Tensor


class _SmallPlan(NamedTuple):
    """The tensors of at most :data:`SMALL_TENSOR_NUMEL` entries as a layout of their own.

    Their entries concatenated in layout order form a ``(B, P_small)`` flat batch, cut into the
    tokens ``token_ids (L_small,)`` of the full layout by the per-token ``src``, ``length``, ``tidx``
    (indices into ``mean``, ``std``) that :func:`~weightdiff.kernels.pack` takes.
    """

    spans: tuple[_Span, ...]
    offsets: tuple[int, ...]
    src: torch.Tensor
    length: torch.Tensor
    tidx: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    token_ids: torch.Tensor
    num_params: int


class WeightTokenizer:
    """Encode state dicts to ``(L, D)`` tokens and decode them back, following a :class:`TokenLayout`.

    Args:
        layout: the layout; build one with :meth:`from_state_dict` and fit statistics with :meth:`fit`.
    """

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout
        self._buffers: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._span_cache: dict[tuple[str, torch.device, torch.dtype], tuple[_Span, ...]] = {}
        self._padding_cache: dict[torch.device, torch.Tensor] = {}
        self._small_cache: dict[torch.device, _SmallPlan | None] = {}

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

    def _spans(self, direction: str, device: torch.device, dtype: torch.dtype) -> tuple[_Span, ...]:
        """Per-tensor :class:`_Span` for ``direction`` ``"encode"`` or ``"decode"``, cached.

        The affine maps are the kernels' own: encode ``scale = 1 / std, shift = -mean / std``
        (:func:`~weightdiff.kernels.pack.normalizer`), decode ``scale = std, shift = mean``, in the
        computation dtype ``dtype``.
        """
        key = (direction, device, dtype)
        if key not in self._span_cache:
            lay = self.layout
            if direction == "encode":
                scale, shift = normalizer(lay.mean, lay.std, dtype)
            else:
                scale, shift = lay.std.to(dtype), lay.mean.to(dtype)
            self._span_cache[key] = tuple(
                _Span(spec.name, spec.shape, parse_dtype(spec.dtype), spec.first_token * lay.token_size,
                      spec.numel, a, b)
                for spec, a, b in zip(lay.tensors, scale.tolist(), shift.to(device).unbind()))
        return self._span_cache[key]

    def _padding(self, device: torch.device) -> torch.Tensor:
        """Padding positions in a token row flattened to ``(L * D,)`` of the tensors larger than
        :data:`SMALL_TENSOR_NUMEL` (pack zero-pads the small ones), cached."""
        if device not in self._padding_cache:
            lay = self.layout
            pad = ~lay.valid_mask()  # (L, D)
            for spec in lay.tensors:
                if spec.numel <= SMALL_TENSOR_NUMEL:
                    pad[spec.first_token:spec.first_token + spec.num_tokens] = False
            self._padding_cache[device] = pad.view(-1).nonzero().view(-1).to(device)
        return self._padding_cache[device]

    def _small_plan(self, device: torch.device) -> _SmallPlan | None:
        """:class:`_SmallPlan` of the small non-empty tensors (None when there are none), cached."""
        if device not in self._small_cache:
            lay, d = self.layout, self.layout.token_size
            spans = self._spans("decode", device, torch.float32)
            chosen = [(j, spec) for j, spec in enumerate(lay.tensors) if 0 < spec.numel <= SMALL_TENSOR_NUMEL]
            plan = None
            if chosen:
                src, length, tidx, ids, offsets = [], [], [], [], []
                offset = 0
                for k, (_, spec) in enumerate(chosen):
                    offsets.append(offset)
                    for c in range(spec.num_tokens):
                        src.append(offset + c * d)
                        length.append(min(d, spec.numel - c * d))
                        tidx.append(k)
                        ids.append(spec.first_token + c)
                    offset += spec.numel
                pick = torch.tensor([j for j, _ in chosen])
                as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
                plan = _SmallPlan(tuple(spans[j] for j, _ in chosen), tuple(offsets), as_long(src),
                                  as_long(length), as_long(tidx), lay.mean[pick].to(device),
                                  lay.std[pick].to(device), as_long(ids), offset)
            self._small_cache[device] = plan
        return self._small_cache[device]

    def _check_base(self, base: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The passthrough tensors of ``base`` (none without ``base``), checked against the layout."""
        if base is None:
            return {}
        for spec in self.layout.passthrough:
            if spec.name not in base:
                raise LayoutMismatchError(f"base state dict is missing tensor '{spec.name}', which the "
                                          f"layout does not tokenise (expected shape {spec.shape}, {spec.dtype})")
            t = base[spec.name]
            if tuple(t.shape) != spec.shape or t.dtype != parse_dtype(spec.dtype):
                raise LayoutMismatchError(
                    f"base state dict: tensor '{spec.name}' has shape {tuple(t.shape)} and dtype "
                    f"{str(t.dtype).removeprefix('torch.')}, expected {spec.shape} and {spec.dtype}")
        return {spec.name: base[spec.name].detach() for spec in self.layout.passthrough}

    def _raise_nonfinite_rows(self, sds: Sequence[Mapping[str, torch.Tensor]], rows: list[int],
                              source: str) -> None:
        """As :meth:`_raise_nonfinite`, for state dicts: the first tensor (in layout order) with NaN/Inf
        in any of ``rows``, and its first such row. Nothing is raised if the values are finite."""
        for spec in self.layout.tensors:
            for row in rows:
                bad = _count_nonfinite(sds[row][spec.name])
                if bad:
                    raise NonFiniteWeightsError(f"{source}: tensor '{spec.name}' has {bad} non-finite "
                                                f"values (NaN/Inf) in batch row {row}")

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
        tokens = self._encode_state_dicts([sd], None, check_finite=False)[0]
        return tokens, self.layout.valid_mask().to(tokens.device)

    def encode_batch(self, sds: Sequence[Mapping[str, torch.Tensor]] | torch.Tensor, *,
                     out: torch.Tensor | None = None, check_finite: bool = True) -> torch.Tensor:
        """Tokens of several state dicts, or of a stacked ``(B, P)`` flat tensor: ``(B, L, D)``.

        The flat-tensor form is one :func:`~weightdiff.kernels.pack` call for the batch; state
        dicts are packed tensor by tensor straight into the tokens (no ``(B, P)`` copy), with the
        same arithmetic and so the same bits. ``out``: an optional preallocated contiguous
        ``(B, L, D)`` float32 buffer (saves the page faults of a fresh allocation when encoding
        many batches; not with autograd). Non-finite values raise :class:`NonFiniteWeightsError`
        naming the tensor and batch row; ``check_finite=False`` skips that check (one extra read
        of the batch) for inputs already checked, e.g. loaded by :func:`weightdiff.io.load_weights`.
        """
        if not isinstance(sds, torch.Tensor):
            sds = list(sds)
            for b, sd in enumerate(sds):
                self.check_state_dict(sd, source=f"state dict #{b}", check_finite=False)
            return self._encode_state_dicts(sds, out, check_finite)
        flat = sds
        if flat.dim() != 2 or flat.shape[1] != self.layout.num_params:
            raise LayoutMismatchError(f"flat batch has shape {tuple(flat.shape)}, "
                                      f"expected (B, {self.layout.num_params})")
        if flat.dtype != torch.float32:
            raise LayoutMismatchError(f"flat batch has dtype {flat.dtype}, expected torch.float32")
        # One read-only reduction finds any NaN/Inf (they propagate into the sum); only on a
        # hit is the slow per-tensor search run to name the culprit.
        if check_finite and flat.numel() and not bool(torch.isfinite(flat.sum())):
            self._raise_nonfinite(flat, "encode_batch")
        return self._pack(flat, out)

    def _encode_state_dicts(self, sds: list[Mapping[str, torch.Tensor]], out: torch.Tensor | None,
                            check_finite: bool) -> torch.Tensor:
        """Pack checked state dicts into ``(B, L, D)`` float32 tokens, no ``(B, P)`` intermediate.

        Every tensor is converted to float32 first, as :meth:`flatten` does (a float16 weight is
        never normalised in float16). A large tensor is written into its slice of the token row by
        :class:`_Span`'s add, in pieces of :data:`CHECK_CHUNK_NUMEL` each summed while still in
        cache (NaN/Inf propagate into the sum, so the check needs no pass over memory); the small
        ones of each row are concatenated by one ``torch.cat`` and packed for the whole batch by one
        :func:`~weightdiff.kernels.pack` call (:class:`_SmallPlan`). The padding of each row is
        zeroed by one ``index_fill_``.
        """
        lay = self.layout
        batch, length = len(sds), lay.num_tokens * lay.token_size
        device = next(iter(sds[0].values())).device if sds and sds[0] else torch.device("cpu")
        shape = (batch, lay.num_tokens, lay.token_size)
        if out is None:
            tokens = torch.empty(shape, dtype=torch.float32, device=device)
        elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != device \
                or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous torch.float32 tensor of shape {shape} on "
                             f"{device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
        else:
            tokens = out
        pad, small = self._padding(device), self._small_plan(device)
        large = [s for s in self._spans("encode", device, torch.float32) if s.numel > SMALL_TENSOR_NUMEL]
        small_flat = torch.empty(batch, small.num_params, device=device) if small else None  # (B, P_small)
        sums = []
        for b, (sd, row) in enumerate(zip(sds, tokens.view(batch, length))):  # row: (L * D,)
            for s in large:
                x = sd[s.name].detach().reshape(-1)  # (numel,)
                x = x if s.dtype == torch.float32 else x.to(torch.float32)
                dst = row[s.start:s.start + s.numel]
                for c in range(0, s.numel, CHECK_CHUNK_NUMEL):
                    y = torch.add(s.shift, x[c:c + CHECK_CHUNK_NUMEL], alpha=s.scale,
                                  out=dst[c:c + CHECK_CHUNK_NUMEL])
                    if check_finite:
                        sums.append(y.sum())
            if pad.numel():
                row.index_fill_(0, pad, 0.0)
            if small:
                torch.cat([sd[s.name].detach().reshape(-1).to(torch.float32) for s in small.spans],
                          out=small_flat[b])
        bad = torch.zeros(batch, dtype=torch.bool, device=device)
        if sums:
            bad |= ~torch.isfinite(torch.stack(sums).view(batch, -1)).all(1)
        if small and batch:
            every = small.token_ids.numel() == lay.num_tokens  # all tensors small: pack in place
            packed = pack(small_flat, small.src, small.length, small.tidx, small.mean, small.std,
                          lay.token_size, out=tokens if every else None)  # (B, L_small, D)
            if not every:
                tokens.index_copy_(1, small.token_ids, packed)
            if check_finite:
                bad |= ~torch.isfinite(packed.view(batch, -1).sum(1))
        if check_finite and bool(bad.any()):  # NaN/Inf weights, or finite ones whose tokens overflow
            self._raise_nonfinite_rows(sds, bad.nonzero().view(-1).tolist(), "encode_batch")
        return tokens

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
            Every tensor has its own contiguous storage, so the dict can be saved as is.

        Raises:
            LayoutMismatchError: tokens of the wrong shape, or ``base`` lacking a passthrough tensor
                or holding it with another shape/dtype.
            NonFiniteWeightsError: the decoded weights hold NaN/Inf.
        """
        self._check_tokens(tokens, batched=False)
        return self._decode_state_dicts(tokens[None], base)[0]

    def decode_batch(self, tokens: torch.Tensor,
                     base: Mapping[str, torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
        """``tokens (B, L, D) ->`` a list of ``B`` state dicts, each as :meth:`decode` returns it.

        Non-finite weights raise :class:`NonFiniteWeightsError` naming the tensor and batch row.
        """
        self._check_tokens(tokens, batched=True)
        return self._decode_state_dicts(tokens, base)

    def _decode_state_dicts(self, tokens: torch.Tensor,
                            base: Mapping[str, torch.Tensor] | None) -> list[dict[str, torch.Tensor]]:
        """``tokens (B, L, D)`` (checked) -> ``B`` state dicts, each tensor with its own storage.

        A large tensor is allocated on its own and written straight from its tokens by
        :class:`_Span`'s add (in the computation dtype of :func:`~weightdiff.kernels.unpack`, cast
        to the tensor's dtype on store), in pieces of :data:`CHECK_CHUNK_NUMEL` each summed while
        still in cache; the small ones are unpacked for the whole batch by one
        :func:`~weightdiff.kernels.unpack` call (:class:`_SmallPlan`) and copied out per row.
        NaN/Inf propagate into the sums, so one check of them finds any, and only then is the
        culprit counted exactly.
        """
        lay = self.layout
        kept = self._check_base(base)
        dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32  # as unpack computes
        tokens = tokens.detach().to(dtype)
        batch, device = tokens.shape[0], tokens.device
        spans, small = self._spans("decode", device, dtype), self._small_plan(device)
        small_rows: dict[str, tuple[torch.Tensor, ...]] = {}
        sums, large_sums = [], []  # (n,) float32 sums; 0-d sums of the large tensors
        if small and batch:
            small_flat = unpack(tokens.index_select(1, small.token_ids), small.src, small.length,
                                small.tidx, small.mean, small.std, small.num_params)  # (B, P_small)
            sums.append(small_flat.sum(1, dtype=torch.float32))
            for s, offset in zip(small.spans, small.offsets):
                block = small_flat[:, offset:offset + s.numel].to(s.dtype)  # (B, numel)
                if s.dtype != small_flat.dtype:  # the cast may overflow (float16): check what is returned
                    sums.append(block.sum(1, dtype=torch.float32))
                small_rows[s.name] = block.unbind(0)
        decoded = []
        for b, row in enumerate(tokens.reshape(batch, lay.num_tokens * lay.token_size)):  # (L * D,)
            sd = {}
            for s in spans:
                if s.name in small_rows:
                    sd[s.name] = small_rows[s.name][b].view(s.shape).clone()
                    continue
                t = torch.empty(s.shape, dtype=s.dtype, device=device)
                src, dst = row[s.start:s.start + s.numel], t.view(-1)
                for c in range(0, s.numel, CHECK_CHUNK_NUMEL):
                    y = torch.add(s.shift, src[c:c + CHECK_CHUNK_NUMEL], alpha=s.scale,
                                  out=dst[c:c + CHECK_CHUNK_NUMEL])
                    large_sums.append(y.sum(dtype=torch.float32))
                sd[s.name] = t
            decoded.append(sd)
        if large_sums:
            sums.append(torch.stack(large_sums))
        if sums and not bool(torch.isfinite(torch.cat(sums)).all()):
            for row, sd in enumerate(decoded):  # the first row, then the first tensor in layout order
                for name, t in sd.items():
                    count = int((~torch.isfinite(t)).sum())
                    if count:  # else finite weights whose float32 sum overflowed
                        raise NonFiniteWeightsError(f"decoded tokens: tensor '{name}' has {count} "
                                                    f"non-finite values (NaN/Inf) in batch row {row}")
        if base is None:
            return decoded
        return [{k: sd[k] if k in sd else kept[k].clone() for k in lay.key_order} for sd in decoded]

    # ----------------------------------------------------------------------------- on disk
    def save(self, directory: str | Path) -> None:
        """Save the layout (``layout.json`` + ``layout_stats.safetensors``) into ``directory``."""
        self.layout.save(directory)

    @classmethod
    def load(cls, directory: str | Path) -> WeightTokenizer:
        """Load a tokenizer saved by :meth:`save` (raises ``LayoutFileError`` naming the file)."""
        return cls(TokenLayout.load(directory))
