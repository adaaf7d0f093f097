"""Window-by-window sampling for generators whose DiT attends within windows of tokens.

A windowed :class:`~weightdiff.models.dit.WeightDiT` mixes information only inside consecutive
windows of ``W`` weight tokens (every other sub-layer is token-wise), so the reverse process of
one window needs that window's noise, token ids, timesteps and the condition, and nothing else.
:func:`sample_windows` therefore denoises a target of any length a few windows at a time and
hands each finished span to the caller (who decodes and writes it,
:class:`weightdiff.weights.stream.StreamingWeightWriter`): memory is bounded by the span, not by
the network. Each window of each sample draws its noise from its own seed
(:func:`window_seed`), so a span sampled alone equals the same span of a whole-sequence sample.

What windows cost: tokens of different windows are generated given the condition only, so the
windows of one sample agree with each other only as far as the zoo's networks are
interchangeable window by window (one basin, e.g. fine-tunes of one parent). A zoo of several
basins needs a state carried across windows, which this module does not provide.

Example::

    for start, tokens in sample_windows(net, raw_cond, seeds, schedule, steps=10, sampler="ddim"):
        writer.write_tokens(tokens, start)      # tokens (S, n, D) of tokens [start, start + n)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from weightdiff.models.schedule import ScheduleConfig, SamplerName, denoise

#: Window indices per sample seed: window ``w`` of seed ``s`` draws from ``s * SEED_STRIDE + w``.
SEED_STRIDE = 1_000_003


def window_seed(seed: int, window_index: int) -> int:
    """The noise seed of window ``window_index`` of the sample with seed ``seed`` (distinct for
    distinct pairs while ``window_index < SEED_STRIDE``)."""
    if not 0 <= window_index < SEED_STRIDE:
        raise ValueError(f"window index {window_index} is outside [0, {SEED_STRIDE})")
    return (int(seed) * SEED_STRIDE + int(window_index)) % (1 << 63)


def window_noise(seeds: Sequence[int], shape: tuple[int, int], window: int, start: int, stop: int,
                 temperature: float = 1.0) -> torch.Tensor:
    """Initial noise of tokens ``[start, stop)`` of ``len(seeds)`` samples: ``(S, stop - start, D)``.

    ``shape`` is a whole sample's ``(L, D)``; ``start`` must be a window boundary. Window ``w``
    of sample ``s`` is ``randn((n_w, D))`` from :func:`window_seed` ``(s, w)``, drawn on the CPU.
    """
    length, d = shape
    if start % window or not 0 <= start < stop <= length:
        raise ValueError(f"window_noise: tokens [{start}, {stop}) are not a span of whole windows of "
                         f"{window} tokens inside {length}")
    out = torch.empty(len(seeds), stop - start, d)
    for i, seed in enumerate(seeds):
        for a in range(start, stop, window):
            b = min(a + window, stop, length)
            g = torch.Generator().manual_seed(window_seed(seed, a // window))
            out[i, a - start:b - start] = torch.randn(min(window, length - a), d, generator=g)[:b - a]
    return out * temperature


def window_tokens(num_tokens: int, window: int, windows: torch.Tensor) -> torch.Tensor:
    """Token indices of the given windows, in increasing window order: ``(n,)`` long.

    A shorter last window (when ``window`` does not divide ``num_tokens``) is last of all, so the
    DiT, which counts windows from the first token it is given, sees the same windows.
    """
    windows = torch.unique(windows.long())  # sorted
    starts = windows * window
    idx = starts[:, None] + torch.arange(window)[None, :]
    return idx[idx < num_tokens]


def spans(num_tokens: int, window: int, windows_per_span: int = 1) -> list[tuple[int, int]]:
    """``[start, stop)`` spans of ``windows_per_span`` whole windows covering ``num_tokens`` tokens."""
    if window < 1 or windows_per_span < 1:
        raise ValueError(f"window and windows_per_span must be >= 1, got {window} and {windows_per_span}")
    step = window * windows_per_span
    return [(a, min(a + step, num_tokens)) for a in range(0, num_tokens, step)]


@torch.no_grad()
def sample_windows(net: nn.Module, raw_cond: Any, seeds: Sequence[int], schedule: ScheduleConfig, *,
                   steps: int, sampler: SamplerName, guidance: float = 1.0, temperature: float = 1.0,
                   windows_per_span: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
    """Generate one sample per seed for a one-row raw condition, a span of windows at a time.

    ``net`` is a windowed :class:`~weightdiff.models.generator.WeightGenerator` (not imported here:
    the generator imports this module for its noise).

    Yields ``(start, tokens (S, n, D))`` for consecutive spans ``[start, start + n)`` covering the
    layout, on the CPU, 0 on padding. Only one span's tokens (and the DiT's activations for it)
    are alive at a time.

    Raises:
        ValueError: the generator has no window (it needs the whole sequence at once).
    """
    window = net.config.window
    if window is None:
        raise ValueError("sample_windows needs a windowed generator (its config has window = None)")
    if sampler == "ddpm":
        raise ValueError("sample_windows: the ddpm sampler's step noise is drawn for whole sequences; use ddim or dpm")
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    num = len(seeds)
    cond = net.encode_condition(raw_cond, None)
    null = net.encode_condition(raw_cond, torch.ones(cond.vector.shape[0], dtype=torch.bool, device=device))
    if cond.vector.shape[0] != 1:
        raise ValueError(f"sample_windows takes a one-row condition, got {cond.vector.shape[0]} rows")
    cond, null = cond.repeat_interleave(num), null.repeat_interleave(num)
    shape = net.sample_shape
    valid = net.valid
    try:
        for a, b in spans(shape[0], window, windows_per_span):
            noise = window_noise(seeds, shape, window, a, b, temperature).to(device)
            x0 = denoise(net.guided_fn(cond, null, guidance, tokens=slice(a, b)), tuple(noise.shape), schedule,
                         steps=steps, sampler=sampler, device=device, noise=noise, valid=valid[a:b])
            yield a, net.to_tokens(x0, slice(a, b)).cpu()
    finally:
        net.train(was_training)
