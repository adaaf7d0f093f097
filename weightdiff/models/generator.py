"""The generator: denoiser + condition provider as one diffusers model, and its exported folder.

:class:`WeightGenerator` is everything a sampler needs (and what EMA averages): a diffusers
``ModelMixin`` + ``ConfigMixin`` whose typed ``__init__`` is its ``config.json``.
:func:`sample_tokens` runs the reverse process for a batch of raw conditions.
:class:`GeneratorArtefact` reads and writes the exported folder, in the diffusers layout::

    <dir>/
      model_index.json        components -> classes, format_version, default sampler and steps,
                              model id, zoo / training provenance
      generator/              WeightGenerator.save_pretrained: config.json + diffusion_pytorch_model.safetensors
      scheduler/              the training scheduler's save_pretrained: scheduler_config.json (a
                              DDPMScheduler, or a FlowMatchEulerDiscreteScheduler for flow matching)
      tokenizer/              layout.json + layout_stats.safetensors, fitted at training time
      base/                   (LoRA) model.safetensors (the frozen base) + adapter_config.json
      descriptions.json       (text generators) the descriptions trained on, per task, and each task's
                              held-out paraphrase (:data:`DESCRIPTIONS_FILE`); absent from older exports
      README.md               model card

Loading checks every file and key (:meth:`GeneratorArtefact.from_pretrained`). Plain torch: no
trainer is needed to sample.
"""

from __future__ import annotations

import inspect
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import nn

from weightdiff import __version__
from weightdiff.base_networks import BASE_SPEC_FILE, HF_CONFIG_FILE, recorded_base_spec
from weightdiff.errors import ModelDirError, WeightFileError
from weightdiff.io import atomic_path, load_weights, read_json, sha256_file, write_json
from weightdiff.models.autoencoder import WeightAutoencoder
from weightdiff.models.conditioning import ConditionKind, build_condition
from weightdiff.models.dit import ID_FIELDS, WeightDiT
from weightdiff.models.schedule import SCHEDULER_CLASSES, SamplerName, ScheduleConfig, denoise
from weightdiff.models.windows import window_noise
from weightdiff.targets import BASE_PATH_FIELD, Target
from weightdiff.weights.layout import LAYOUT_FILE
from weightdiff.weights.tokenizer import WeightTokenizer

FORMAT_VERSION = 2
MODEL_INDEX_FILE = "model_index.json"
GENERATOR_DIR, SCHEDULER_DIR, TOKENIZER_DIR, BASE_DIR = "generator", "scheduler", "tokenizer", "base"
BASE_RECORD_FILES = (BASE_SPEC_FILE, HF_CONFIG_FILE)  # beside the base weights when the zoo records them
BASE_WEIGHTS_FILE = "model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
CARD_FILE = "README.md"
#: ``{"source": "zoo" | "family", "tasks": {task: {"train": [str, ...], "heldout": str | null}}}``: the
#: descriptions a text generator was trained on (``source`` "zoo": an imported zoo's own) and the
#: held-out paraphrase of each task (``null``: its family's ``Task.heldout_description()``).
DESCRIPTIONS_FILE = "descriptions.json"
DESCRIPTION_SOURCES = ("zoo", "family")
_LEGACY_FILES = ("config.json", "generator.safetensors")  # format_version 1, at the top of the folder


@dataclass(frozen=True)
class ConditionEmbedding:
    """An embedded condition batch: the adaLN vector and, for cross-attention, a sequence.

    Attributes:
        vector: (B, hidden), added to the timestep embedding in every block.
        context: (B, S, hidden) condition sequence the blocks cross-attend to, or None.
        context_mask: (B, S) bool, True at real condition vectors, or None.
    """

    vector: torch.Tensor
    context: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None

    def repeat_interleave(self, n: int) -> ConditionEmbedding:
        """Each row repeated ``n`` times in place: (B, ...) -> (B * n, ...)."""
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        return ConditionEmbedding(rep(self.vector), rep(self.context), rep(self.context_mask))

    def rows(self, index: slice) -> ConditionEmbedding:
        """The rows ``index`` of every part."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return ConditionEmbedding(pick(self.vector), pick(self.context), pick(self.context_mask))

    def detach(self) -> ConditionEmbedding:
        """The same embedding cut from the autograd graph."""
        cut = lambda t: None if t is None else t.detach()  # noqa: E731
        return ConditionEmbedding(cut(self.vector), cut(self.context), cut(self.context_mask))

    def cat(self, other: ConditionEmbedding) -> ConditionEmbedding:
        """Rows of ``self`` then rows of ``other``."""
        both = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return ConditionEmbedding(both(self.vector, other.vector), both(self.context, other.context),
                                  both(self.context_mask, other.context_mask))


class WeightGenerator(ModelMixin, ConfigMixin):
    """Denoiser + condition provider: everything a sampler needs, and what EMA averages.

    The per-token ids of the layout the generator was trained on (tensor index, chunk index,
    depth, kind) and each token's number of valid entries are persistent buffers, so the weights
    file carries them and a tokenizer of another layout is caught at load.

    Args:
        token_size: entries per token (D).
        num_tokens: tokens per weight set (L).
        num_tensors, max_chunks, max_depth, num_kinds: sizes of the DiT's id embedding tables.
        condition: condition provider kind (:mod:`weightdiff.models.conditioning`).
        condition_dims: raw condition sizes for :func:`~weightdiff.models.conditioning.build_condition`
            (``raw_dim``; ``x_dim`` and ``num_classes`` for labelled examples; ``x_dim`` for unlabelled inputs).
        hidden, depth, heads, mlp_ratio: DiT size.
        cross_attention: the blocks also cross-attend to the provider's condition sequence
            (:meth:`~weightdiff.models.conditioning.ConditionProvider.embed_with_sequence`): the
            per-example features for labelled examples and unlabelled inputs, the condition vector
            itself otherwise.
        text_dropout: (text condition) training-time dropout of the sentence embedding.
        latent: keyword arguments of a :class:`~weightdiff.models.autoencoder.WeightAutoencoder`
            (``num_params`` included): the DiT then diffuses its latent tokens, and samples are
            decoded to weight tokens (latent diffusion). None: the DiT diffuses weight tokens.
        window: the DiT attends within consecutive windows of this many weight tokens (see
            :class:`~weightdiff.models.dit.WeightDiT`); training may then fit random windows and
            sampling runs window by window (:mod:`weightdiff.models.windows`), so memory is bounded
            by a window, not by the target. None: attention over the whole sequence.
        center: diffuse each token's residual from the zoo's mean token, ``(x0 - center) / scale``
            (:meth:`fit_center`): the denoiser then learns how networks differ, not the weights
            they share, which a million-weight target of one basin would need it to memorise.
        mean_head: width of a *conditional mean* (:class:`ConditionalMean`, 0: none): an MLP from the
            condition vector to a weight set μ(c), trained as a hypernetwork; the DiT then diffuses
            the residual ``x0 - μ(c)``, and samples are ``μ(c) +`` a sampled residual. The mean
            carries what the task determines, the diffusion how networks of one task differ.
        mean_input: what the conditional mean reads: ``"embedding"``, the condition provider's
            vector (any condition kind); ``"raw"``, the raw condition vector standardised by the
            training conditions' mean and std (:meth:`fit_mean_input`), as the benchmark's MLP
            hypernetwork reads its task code (``text`` and ``code`` conditions); ``"numeric"``, the
            same of only the numbers a text condition parses from its description (the sentence
            embedding left to the DiT).
        token_layout: the layout's per-token ``tensor_index``, ``chunk_index``, ``depth``,
            ``kind`` and ``length`` (each ``(L,)``); not part of the config: the buffers are
            saved with the weights. Omitted when the weights are loaded afterwards.
    """

    ignore_for_config = ["token_layout"]

    @register_to_config
    def __init__(self, token_size: int, num_tokens: int, num_tensors: int, max_chunks: int, max_depth: int,
                 num_kinds: int, condition: ConditionKind = "text", condition_dims: dict[str, int] | None = None,
                 hidden: int = 256, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0,
                 cross_attention: bool = False, text_dropout: float = 0.0, latent: dict[str, Any] | None = None,
                 window: int | None = None, center: bool = False, mean_head: int = 0,
                 mean_input: str = "embedding", token_layout: Mapping[str, Sequence[int]] | None = None):
        super().__init__()
        if window is not None and latent is not None:
            raise ValueError("WeightGenerator: 'window' is for weight-token diffusion; a latent generator "
                             "diffuses a few latent tokens, which need no windows")
        if center and latent is not None:
            raise ValueError("WeightGenerator: 'center' is for weight-token diffusion, not for a latent generator")
        if mean_head < 0 or (mean_head and (latent is not None or window is not None or center)):
            raise ValueError(f"WeightGenerator: mean_head must be >= 0 (got {mean_head}) and is for weight-token "
                             "diffusion over the whole sequence, without 'latent', 'window' or 'center'")
        if mean_input not in MEAN_INPUTS or (mean_input == "raw" and condition not in ("text", "code")) \
                or (mean_input == "numeric" and condition != "text"):
            raise ValueError(f"WeightGenerator: mean_input must be one of {MEAN_INPUTS} ('raw' for a text or code "
                             f"condition, 'numeric' for a text one), got {mean_input!r} with a {condition!r} condition")
        extra = {"text_dropout": text_dropout} if condition == "text" else {}
        # The provider is built before the denoiser: initial weights follow from the seed in this order.
        self.cond = build_condition(condition, hidden, **(condition_dims or {}), **extra)
        self.autoencoder: WeightAutoencoder | None = None
        if latent is not None:  # the DiT diffuses K latent tokens of d entries, each its own "tensor"
            self.autoencoder = WeightAutoencoder(**latent)
            k, d = self.autoencoder.latent_shape
            self.denoiser = WeightDiT(token_size=d, num_tensors=k, max_chunks=1, max_depth=1, num_kinds=1,
                                      hidden=hidden, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                                      cross_attention=cross_attention)
        else:
            self.denoiser = WeightDiT(token_size=token_size, num_tensors=num_tensors, max_chunks=max_chunks,
                                      max_depth=max_depth, num_kinds=num_kinds, hidden=hidden, depth=depth,
                                      heads=heads, mlp_ratio=mlp_ratio, cross_attention=cross_attention,
                                      window=window)
        for key in ID_FIELDS:
            self.register_buffer(f"ids_{key}", torch.zeros(num_tokens, dtype=torch.long))
        self.register_buffer("token_length", torch.zeros(num_tokens, dtype=torch.long))
        if center:  # set by fit_center from the training tokens; saved with the weights
            self.register_buffer("token_center", torch.zeros(num_tokens, token_size))
            self.register_buffer("token_scale", torch.ones(num_tokens, 1))
        # Built after the denoiser: the other modules' initial weights do not move with this option.
        self.mean_net = None
        if mean_head:
            reads = {"embedding": hidden, "raw": int((condition_dims or {}).get("raw_dim", 0))}.get(mean_input)
            if mean_input == "numeric":
                reads = self.cond.numeric_dim
                if reads == 0:
                    raise ValueError("WeightGenerator: mean_input 'numeric' needs a text condition with numeric "
                                     "features; this family parses none from its descriptions")
            self.mean_net = ConditionalMean(reads, num_tokens * token_size, mean_head,
                                            standardised=mean_input != "embedding")
        if token_layout is not None:
            for key in (*ID_FIELDS, "length"):
                buffer = self.token_length if key == "length" else getattr(self, f"ids_{key}")
                value = torch.as_tensor(token_layout[key], dtype=torch.long)
                if tuple(value.shape) != (num_tokens,):
                    raise ValueError(f"WeightGenerator: token_layout['{key}'] has shape {tuple(value.shape)}, "
                                     f"expected ({num_tokens},)")
                buffer.copy_(value)

    @property
    def valid(self) -> torch.Tensor:
        """(L, D) bool: False on the padding at the end of each tensor's last token."""
        d = self.config.token_size
        return torch.arange(d, device=self.token_length.device)[None, :] < self.token_length[:, None]

    def token_ids(self) -> dict[str, torch.Tensor]:
        """The per-token ids ``{field: (L,)}`` of the weight tokens."""
        return {key: getattr(self, f"ids_{key}") for key in ID_FIELDS}

    def denoiser_ids(self, tokens: slice | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The ids the denoiser embeds: the weight tokens', or (latent) latent token k is tensor k.

        ``tokens``: only those weight tokens' ids (a slice or an index tensor), for windows.
        """
        if self.autoencoder is None:
            ids = self.token_ids()
            return ids if tokens is None else {key: value[tokens] for key, value in ids.items()}
        k = self.autoencoder.latent_shape[0]
        zeros = torch.zeros(k, dtype=torch.long, device=self.token_length.device)
        return {"tensor_index": torch.arange(k, device=zeros.device), "chunk_index": zeros, "depth": zeros,
                "kind": zeros}

    @property
    def sample_shape(self) -> tuple[int, int]:
        """The shape of one diffused sample: ``(L, D)`` weight tokens, or ``(K, d)`` latent tokens."""
        if self.autoencoder is not None:
            return self.autoencoder.latent_shape
        return self.config.num_tokens, self.config.token_size

    @property
    def sample_valid(self) -> torch.Tensor | None:
        """The padding mask of a diffused sample (:attr:`valid`); None for latents, which have no padding."""
        return self.valid if self.autoencoder is None else None

    def flat(self, tokens: torch.Tensor) -> torch.Tensor:
        """Weight tokens ``(B, L, D)`` → their valid entries ``(B, P)``."""
        return tokens[:, self.valid]

    def encode_latent(self, tokens: torch.Tensor, noise: bool = False) -> torch.Tensor:
        """(latent) Weight tokens ``(B, L, D)`` → the diffused latent ``(B, K, d)``."""
        return self.autoencoder.encode(self.flat(tokens), noise=noise)

    def tokens_of(self, flat: torch.Tensor) -> torch.Tensor:
        """Valid entries ``(B, P)`` → weight tokens ``(B, L, D)``, 0 on padding (differentiable)."""
        valid = self.valid
        return flat.new_zeros(flat.shape[0], *valid.shape).masked_scatter(valid, flat)

    def to_tokens(self, sample: torch.Tensor, tokens: slice | torch.Tensor | None = None,
                  mean: torch.Tensor | None = None) -> torch.Tensor:
        """A diffused sample → weight tokens ``(B, L, D)``: latent: decoded, 0 on padding; centred:
        ``sample · scale + center``; with a conditional mean: ``sample + mean`` (``mean``: the
        samples' :meth:`conditional_mean`); else itself. ``tokens``: the sample holds only those weight tokens."""
        if self.autoencoder is not None:
            return self.tokens_of(self.autoencoder.decode(sample))
        if self.mean_net is not None:
            if mean is None:
                raise ValueError("WeightGenerator.to_tokens: a generator with a conditional mean needs `mean`")
            return sample + mean
        if not self.config.center:
            return sample
        center, scale = self._centering(tokens)
        return sample * scale + center

    def residual(self, x0: torch.Tensor, tokens: slice | torch.Tensor | None = None,
                 mean: torch.Tensor | None = None) -> torch.Tensor:
        """(centred, or with a conditional ``mean``) Weight tokens → the diffused residual
        ``(x0 - center) / scale`` or ``x0 - mean`` (:meth:`to_tokens` inverted)."""
        if self.mean_net is not None:
            if mean is None:
                raise ValueError("WeightGenerator.residual: a generator with a conditional mean needs `mean`")
            return x0 - mean
        if not self.config.center:
            return x0
        center, scale = self._centering(tokens)
        return (x0 - center) / scale

    def _centering(self, tokens: slice | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        center, scale = self.token_center, self.token_scale
        return (center, scale) if tokens is None else (center[tokens], scale[tokens])

    @torch.no_grad()
    def fit_center(self, train_tokens: torch.Tensor) -> None:
        """(centred) Set the center to the training tokens' mean ``(L, D)`` and each token's scale
        to the std of its tensor's residuals, over every valid entry of every training token."""
        x = train_tokens.to(self.token_center)
        center = x.mean(0).masked_fill(~self.valid, 0.0)
        resid = (x - center).masked_fill(~self.valid, 0.0)
        tensor = self.ids_tensor_index
        count = torch.zeros(int(tensor.max()) + 1, device=x.device).index_add_(0, tensor, self.token_length.float())
        sq = torch.zeros_like(count).index_add_(0, tensor, resid.pow(2).sum((0, 2)) / x.shape[0])
        std = (sq / count.clamp_min(1)).sqrt().clamp_min(CENTER_STD_FLOOR)
        self.token_center.copy_(center)
        self.token_scale.copy_(std[tensor][:, None])

    def conditional_mean(self, c: torch.Tensor, raw: Any = None) -> torch.Tensor:
        """(mean head) The condition vectors ``c (B, hidden)`` or, when the mean reads the raw
        condition (``mean_input`` raw or numeric), the raw conditions ``raw (B, C)`` → their mean
        weight tokens ``(B, L, D)``, 0 on padding."""
        if self.mean_net is None:
            raise ValueError("WeightGenerator.conditional_mean: this generator has no mean head (mean_head = 0)")
        if self.config.mean_input != "embedding":
            if raw is None:
                raise ValueError("WeightGenerator.conditional_mean: a mean of the raw condition needs `raw`")
            c = self.mean_net.standardise(self._mean_reads(torch.as_tensor(raw).to(self.mean_net.input_mean)))
        return self.mean_net(c).view(-1, *self.valid.shape).masked_fill(~self.valid, 0.0)

    @torch.no_grad()
    def fit_mean_input(self, raw: torch.Tensor) -> None:
        """(``mean_input`` raw or numeric) Standardise the mean's input by the training conditions ``raw (N, C)``."""
        self.mean_net.fit_input(self._mean_reads(raw))

    def _mean_reads(self, raw: torch.Tensor) -> torch.Tensor:
        """The part of a raw condition ``(B, C)`` the mean reads: all of it, or (numeric) the parsed numbers."""
        return raw[:, self.cond.text_dim:] if self.config.mean_input == "numeric" else raw

    def embed_condition(self, raw: Any, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Raw condition batch (see :mod:`weightdiff.models.conditioning`) -> (B, hidden)."""
        return self.cond(raw, drop)

    def encode_condition(self, raw: Any, drop: torch.Tensor | None = None) -> ConditionEmbedding:
        """Raw condition batch -> the vector, plus the cross-attention sequence when the model has one.

        Rows where ``drop (B,)`` is True get the null embedding (classifier-free guidance).
        """
        if not self.config.cross_attention:
            return ConditionEmbedding(self.cond(raw, drop))
        return ConditionEmbedding(*self.cond.embed_with_sequence(raw, drop))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, tokens: slice | torch.Tensor | None = None) -> torch.Tensor:
        """x_t: (B, L, D), t: (B,), c: (B, hidden), context: (B, S, hidden), context_mask: (B, S) -> (B, L, D).

        ``tokens``: x_t holds only these weight tokens (a slice, or an index tensor of whole
        windows in order, see :func:`weightdiff.models.windows.window_tokens`); L is their number.
        """
        return self.denoiser(x_t, t, c, **self.denoiser_ids(tokens), cond_seq=context, cond_seq_mask=context_mask)

    def guided_fn(self, cond: ConditionEmbedding, null: ConditionEmbedding, guidance: float,
                  tokens: slice | None = None):
        """Model closure for :func:`weightdiff.models.schedule.denoise` with classifier-free guidance.

        out = out_null + g · (out_cond - out_null) (Ho & Salimans 2022); g = 1 is plain conditional.
        ``cond`` and ``null`` are the embedded condition and the null embedding, B rows each;
        ``tokens`` as in :meth:`forward`.
        """
        if guidance == 1.0 or self.config.condition == "none":
            return lambda x, t: self(x, t, cond.vector, cond.context, cond.context_mask, tokens)
        both = cond.cat(null)

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self(torch.cat([x, x]), torch.cat([t, t]), both.vector, both.context, both.context_mask, tokens)
            cond_out, null_out = out.chunk(2)
            return null_out + guidance * (cond_out - null_out)

        return fn

    def check_layout(self, layout: Any, layout_file: str | Path, generator_dir: str | Path) -> None:
        """Raise :class:`ModelDirError` naming the files unless ``layout`` is the one this model was trained on."""
        cfg, gen_dir = self.config, Path(generator_dir)
        if (layout.token_size, layout.num_tokens) != (cfg.token_size, cfg.num_tokens):
            # A layout of another network would only fail after sampling, when decoding the tokens.
            raise ModelDirError(f"{layout_file} does not match {gen_dir / CONFIG_NAME}: the layout has "
                                f"{layout.num_tokens} tokens of size {layout.token_size}, expected {cfg.num_tokens} "
                                f"tokens of size {cfg.token_size} (is the tokenizer from another network?)")
        ours = {**self.token_ids(), "length": self.token_length}
        theirs = {"tensor_index": layout.token_tensor_index, "chunk_index": layout.token_chunk_index,
                  "depth": layout.token_depth, "kind": layout.token_kind, "length": layout.token_length}
        for key, value in theirs.items():
            mismatch = (ours[key].cpu() != value).nonzero()
            if len(mismatch):
                i = int(mismatch[0])
                raise ModelDirError(f"{layout_file} does not match {gen_dir / SAFETENSORS_WEIGHTS_NAME}: token {i} "
                                    f"has {key} {int(value[i])} in the layout, expected {int(ours[key][i])} "
                                    "(is the tokenizer from another network?)")


#: What a :class:`ConditionalMean` reads (``WeightGenerator(mean_input=...)``).
MEAN_INPUTS = ("embedding", "raw", "numeric")


class ConditionalMean(nn.Module):
    """A condition ``(B, C)`` (the provider's vector, or raw features) → flat weight tokens
    ``(B, L · D)``: two hidden layers with LayerNorm and SiLU, as the benchmark's
    :class:`~weightdiff.evaluate.hypernet.MLPHypernet`, and an output layer that starts at zero
    (the mean starts at the normalised zoo's mean, 0).
    ``standardised``: the input is standardised (:meth:`standardise`) by statistics saved with the
    weights, the identity until :meth:`fit_input`."""

    def __init__(self, cond_dim: int, out_dim: int, width: int, depth: int = 2, standardised: bool = False) -> None:
        super().__init__()
        if standardised:
            self.register_buffer("input_mean", torch.zeros(cond_dim))
            self.register_buffer("input_std", torch.ones(cond_dim))
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(cond_dim if i == 0 else width, width), nn.LayerNorm(width), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def fit_input(self, raw: torch.Tensor) -> None:
        """Set the standardisation to the mean and std of the inputs ``raw (N, C)`` (a constant input: std 1)."""
        raw = raw.to(self.input_mean)
        std = raw.std(0, unbiased=False) if raw.shape[0] > 1 else torch.ones_like(self.input_std)
        self.input_mean.copy_(raw.mean(0))
        self.input_std.copy_(torch.where(std > CENTER_STD_FLOOR, std, torch.ones_like(std)))

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.input_mean) / self.input_std

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(c))


#: Floor on a tensor's residual std in :meth:`WeightGenerator.fit_center` (a tensor every entry
#: shares, e.g. a frozen one, would otherwise divide by 0).
CENTER_STD_FLOOR = 1e-6


def seeded_noise(seeds: Sequence[int], shape: tuple[int, int], temperature: float = 1.0,
                 window: int | None = None) -> torch.Tensor:
    """Initial noise x_T (len(seeds), L, D): sample i drawn on the CPU from its own seed, scaled by ``temperature``.

    A sample therefore never depends on how samples were batched or spread over devices. With
    ``window`` (a windowed generator's), each window of each sample has its own seed
    (:func:`weightdiff.models.windows.window_noise`), so sampling window by window draws the same noise.
    """
    if window is not None:
        return window_noise(seeds, shape, window, 0, shape[0], temperature)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]) \
        * temperature


def _seeded_draws(seeds: Sequence[int], shape: tuple[int, ...], first: int, count: int) -> torch.Tensor:
    """Draws ``first .. first + count - 1`` of shape ``shape`` from each seed's CPU generator:
    ``(count, len(seeds), *shape)``. Draw 0 is x_T (:func:`seeded_noise`), draw 1 the latent noise
    (:func:`seeded_latent_noise`), draws 2, 3, ... the ``ddpm`` sampler's step noise (:func:`seeded_step_noise`)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        for _ in range(first):
            torch.randn(shape, generator=g)
        out.append(torch.stack([torch.randn(shape, generator=g) for _ in range(count)]))
    return torch.stack(out, 1)


def seeded_latent_noise(seeds: Sequence[int], shape: tuple[int, int], std: float) -> torch.Tensor:
    """(latent generators) Noise ``(len(seeds), K, d)`` of std ``std`` added to each sampled latent
    before decoding: for sample i, the draw after its x_T from the same seed (:func:`seeded_noise`),
    so x_T is unchanged and a sample does not depend on how samples were batched."""
    return _seeded_draws(seeds, shape, 1, 1)[0] * std


def seeded_step_noise(seeds: Sequence[int], shape: tuple[int, int], steps: int) -> torch.Tensor:
    """The ``ddpm`` sampler's fresh noise of each step, ``(steps, len(seeds), *shape)``: for sample i,
    the draws after its x_T and latent noise from the same seed, so a sample does not depend on
    how samples were batched."""
    return _seeded_draws(seeds, shape, 2, steps)


@torch.no_grad()
def sample_tokens(net: WeightGenerator, raw_cond: Any, num: int, schedule: ScheduleConfig, *, steps: int,
                  sampler: SamplerName, guidance: float, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None, latent_noise: torch.Tensor | None = None,
                  step_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Generate ``num`` samples for each row of a raw condition batch.

    Args:
        raw_cond: raw condition batch with R rows (see :mod:`weightdiff.models.conditioning`).
        noise: optional initial noise (R * num, *net.sample_shape); otherwise drawn from ``generator``.
        latent_noise: (latent generators) added to the sampled latents before decoding
            (R * num, K, d), e.g. :func:`seeded_latent_noise`: the decoder, trained on noise-augmented
            latents with the task loss, maps a neighbourhood of each latent to working weights.
        step_noise: (``"ddpm"`` sampler) each step's fresh noise (steps, R * num, *net.sample_shape),
            e.g. :func:`seeded_step_noise`; otherwise drawn from ``generator`` after x_T.
    Returns:
        tokens (R * num, L, D), ordered condition-major (all samples of row 0 first).
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    cond = net.encode_condition(raw_cond, None)  # (R, H)
    rows = cond.vector.shape[0]
    null = net.encode_condition(raw_cond, torch.ones(rows, dtype=torch.bool, device=device))
    cond, null = cond.repeat_interleave(num), null.repeat_interleave(num)  # (R * num, H)
    shape = (rows * num, *net.sample_shape)
    sample = denoise(net.guided_fn(cond, null, guidance), shape, schedule, steps=steps, sampler=sampler,
                     generator=generator, device=device, noise=noise, valid=net.sample_valid,
                     step_noise=step_noise)
    if latent_noise is not None:
        if net.autoencoder is None:
            raise ValueError("sample_tokens: latent_noise is for latent generators; this one diffuses weight tokens")
        sample = sample + latent_noise.to(sample)
    mean = None if net.mean_net is None else mean_tokens(net, raw_cond).repeat_interleave(num, 0)
    tokens = net.to_tokens(sample, mean=mean)
    net.train(was_training)
    return tokens


@torch.no_grad()
def mean_tokens(net: WeightGenerator, raw_cond: Any) -> torch.Tensor:
    """(mean head) The conditional mean μ(c) of each row of a raw condition batch: tokens ``(R, L, D)``,
    what every sample of that row is drawn around (no diffusion)."""
    was_training = net.training
    net.eval()
    cond = net.encode_condition(raw_cond, None)
    mean = net.conditional_mean(cond.vector, raw_cond if net.config.mean_input != "embedding" else None)
    net.train(was_training)
    return mean


# ----------------------------------------------------------------------------- the exported folder
#: model_index.json: component folder -> [library, class], as diffusers writes it (the scheduler's
#: class is the objective's: :data:`_SCHEDULER_COMPONENTS`).
_COMPONENTS: dict[str, list[str]] = {GENERATOR_DIR: ["weightdiff.models.generator", WeightGenerator.__name__],
                                     SCHEDULER_DIR: ["diffusers", SCHEDULER_CLASSES["ddpm"].__name__],
                                     TOKENIZER_DIR: ["weightdiff.weights.tokenizer", WeightTokenizer.__name__]}
_SCHEDULER_COMPONENTS = [["diffusers", c.__name__] for c in SCHEDULER_CLASSES.values()]


class GeneratorArtefact:
    """An exported generator: the model, its scheduler, tokenizer, base network and provenance.

    Args:
        generator: the (EMA) :class:`WeightGenerator`.
        scheduler: the training scheduler (:meth:`ScheduleConfig.training_scheduler`): a
            :class:`~diffusers.DDPMScheduler` (``clip_sample=False``) or, for flow matching, a
            :class:`~diffusers.FlowMatchEulerDiscreteScheduler`.
        tokenizer: the tokenizer fitted at training time.
        info: ``model_index.json`` content beyond the components: ``sampling`` (default
            ``sampler`` and ``steps``), ``zoo``, ``training``, ``data``, ``global_step``, ``base``
            (LoRA: ``sha256`` of the base weights), ``model_id``.
        base_file: (LoRA) the base weights file, copied byte for byte on save.
        adapter_config: (LoRA) the PEFT adapter config of the generated adapters.
        path: the folder it was loaded from (None when built in memory).
        card: README text (None: no model card).
        descriptions: (text) the :data:`DESCRIPTIONS_FILE` record; None when not recorded (older
            exports, other conditions).
    """

    def __init__(self, generator: WeightGenerator, scheduler: SchedulerMixin, tokenizer: WeightTokenizer,
                 info: dict[str, Any], *, base_file: Path | None = None, adapter_config: dict | None = None,
                 path: Path | None = None, card: str | None = None, descriptions: dict[str, Any] | None = None):
        self.generator, self.scheduler, self.tokenizer = generator, scheduler, tokenizer
        self.info, self.base_file, self.path, self.card = info, base_file, path, card
        self.descriptions = descriptions
        self._adapter_config = adapter_config
        self.schedule = ScheduleConfig.from_scheduler(scheduler, "scheduler")
        self._base_state: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------- attributes
    @property
    def config(self) -> dict[str, Any]:
        """``model_index.json`` plus the generator's config (``model``) and the noise schedule (``schedule``)."""
        model = {k: v for k, v in self.generator.config.items() if not k.startswith("_")}
        return {**self.info, "model": model, "schedule": self.schedule.to_dict()}

    @property
    def model_id(self) -> str:
        return self.info["model_id"]

    @property
    def kind(self) -> str:
        return self.info["zoo"]["kind"]

    def task_description(self, task: str) -> str | None:
        """The first description ``task`` was trained on, if recorded (None: use the family's)."""
        entry = (self.descriptions or {}).get("tasks", {}).get(task)
        return entry["train"][0] if entry else None

    def to(self, device: torch.device | str) -> GeneratorArtefact:
        """Move the generator (sampling follows it); returns ``self``."""
        self.generator.to(device)
        return self

    def base_state(self) -> dict[str, torch.Tensor] | None:
        """State dict of the frozen base network (LoRA), checked against its recorded sha256."""
        if self.kind != "lora":
            return None
        if self._base_state is None:
            _check_base_file(self.base_file, self.info["base"]["sha256"])
            self._base_state = load_weights(self.base_file)
        return self._base_state

    def adapter_config(self) -> dict[str, Any]:
        """The PEFT adapter config of generated adapters (``base_model_name_or_path``: the base folder,
        absolute; the files written with it record it relative to their folder,
        :func:`~weightdiff.targets.base_path_for`)."""
        if self._adapter_config is None:
            raise ModelDirError(f"the generator at {self.path} makes {self.kind} weights, not LoRA adapters")
        base = str(self.base_file.parent.resolve()) if self.base_file is not None else None
        return {**self._adapter_config, BASE_PATH_FIELD: base}

    def target(self, task):
        """The :class:`~weightdiff.targets.Target` that runs this generator's samples on ``task``."""
        if self.kind != "lora":
            return Target.build("full", task.build_network())
        spec = recorded_base_spec(self.base_file.parent)  # the zoo's record of its base; else the family's
        return Target.build("lora", spec if spec is not None else task.build_network(), base_state=self.base_state(),
                            lora_config=self.adapter_config(), source=self.base_file)

    # ---------------------------------------------------------------------------------- on disk
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the folder atomically (a temporary folder renamed into place). Returns ``path``."""
        path = Path(path)
        lora = self.kind == "lora"
        if lora:
            _check_base_file(self.base_file, self.info["base"]["sha256"])
        with atomic_path(path, directory=True) as tmp:
            self.generator.save_pretrained(tmp / GENERATOR_DIR, safe_serialization=True)
            self.scheduler.save_pretrained(tmp / SCHEDULER_DIR)
            self.tokenizer.save(tmp / TOKENIZER_DIR)
            if lora:
                (tmp / BASE_DIR).mkdir()
                shutil.copyfile(self.base_file, tmp / BASE_DIR / BASE_WEIGHTS_FILE)
                for name in BASE_RECORD_FILES:  # a zoo's record of its base architecture travels with it
                    if (self.base_file.parent / name).is_file():
                        shutil.copyfile(self.base_file.parent / name, tmp / BASE_DIR / name)
                # base/ is the base itself: "." relative to its own folder, wherever the export moves
                write_json(tmp / BASE_DIR / ADAPTER_CONFIG_FILE, {**self._adapter_config, BASE_PATH_FIELD: "."})
            # The model id names the weights: the cache of generated tokens is keyed by it.
            info = {**self.info, "model_id": sha256_file(tmp / GENERATOR_DIR / SAFETENSORS_WEIGHTS_NAME)[:16]}
            index = {"_class_name": "WeightDiffusionPipeline", "_weightdiff_version": __version__,
                     "_diffusers_version": version("diffusers"), "format_version": FORMAT_VERSION,
                     **_COMPONENTS, SCHEDULER_DIR: ["diffusers", type(self.scheduler).__name__], **info}
            write_json(tmp / MODEL_INDEX_FILE, index)
            if self.descriptions is not None:
                write_json(tmp / DESCRIPTIONS_FILE, self.descriptions)
            if self.card is not None:
                (tmp / CARD_FILE).write_text(self.card)
        self.info, self.path = info, path
        if lora:
            self.base_file = path / BASE_DIR / BASE_WEIGHTS_FILE
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path):
        """Load an exported generator folder, checking every file and key.

        Raises:
            ModelDirError: a missing or mismatched file, or a folder of another format version.
            WeightFileError, LayoutFileError: an unreadable weights or layout file (naming it).
        """
        path = Path(path)
        if path.is_file():
            if path.suffix == ".ckpt" or zipfile.is_zipfile(path):  # torch.save writes a zip
                raise ModelDirError(f"{path} is a Lightning checkpoint, not an exported generator folder; export "
                                    f"it first with `weightdiff export --ckpt {path} --out <dir>` and pass that <dir>")
            raise ModelDirError(f"{path} is a file, not an exported generator folder (the folder that "
                                "`weightdiff export` writes)")
        if not path.is_dir():
            raise ModelDirError(f"model directory not found: {path}")
        if not (path / MODEL_INDEX_FILE).exists() and all((path / f).exists() for f in _LEGACY_FILES):
            old = read_json(path / _LEGACY_FILES[0], "generator config").get("format_version")
            raise ModelDirError(f"{path} is an exported generator of format_version {old!r} ({_LEGACY_FILES[0]} + "
                                f"{_LEGACY_FILES[1]}); this weightdiff reads format_version {FORMAT_VERSION}: "
                                "re-export it from its Lightning checkpoint with "
                                "`weightdiff export --ckpt <last.ckpt> --out <dir>`")
        for name in (MODEL_INDEX_FILE, *_COMPONENTS):
            if not (path / name).exists():
                raise ModelDirError(f"{path} is not an exported generator: missing '{name}' "
                                    "(create one with `weightdiff export --ckpt <ckpt> --out <dir>`)")
        index_file = path / MODEL_INDEX_FILE
        index = read_json(index_file, "model index")
        if index.get("format_version") != FORMAT_VERSION:
            raise ModelDirError(f"{index_file}: format_version {index.get('format_version')!r}, expected "
                                f"{FORMAT_VERSION}; re-export it from its Lightning checkpoint with "
                                "`weightdiff export --ckpt <last.ckpt> --out <dir>`")
        for name, component in _COMPONENTS.items():
            allowed = _SCHEDULER_COMPONENTS if name == SCHEDULER_DIR else [component]
            if index.get(name) not in allowed:
                expected = f"one of {allowed}" if len(allowed) > 1 else component
                raise ModelDirError(f"{index_file}: component '{name}' is {index.get(name)!r}, expected {expected}")
        for key in ("model_id", "zoo", "sampling"):
            if key not in index:
                raise ModelDirError(f"{index_file}: missing key '{key}'")
        info = {k: v for k, v in index.items()
                if not k.startswith("_") and k != "format_version" and k not in _COMPONENTS}
        tokenizer = WeightTokenizer.load(path / TOKENIZER_DIR)
        generator = _load_weight_generator(path / GENERATOR_DIR)
        generator.check_layout(tokenizer.layout, path / TOKENIZER_DIR / LAYOUT_FILE, path / GENERATOR_DIR)
        scheduler = _load_scheduler(path / SCHEDULER_DIR, index[SCHEDULER_DIR][1], index_file)
        base_file = adapter_config = None
        if info["zoo"].get("kind") == "lora":
            base_file = path / BASE_DIR / BASE_WEIGHTS_FILE
            if "base" not in info or "sha256" not in info["base"]:
                raise ModelDirError(f"{index_file}: missing key 'base.sha256' (the hash of {base_file})")
            if not base_file.is_file():
                raise ModelDirError(f"{path} is not an exported generator: missing '{BASE_DIR}/{BASE_WEIGHTS_FILE}'")
            adapter_config = read_json(path / BASE_DIR / ADAPTER_CONFIG_FILE, "adapter config")
        card = (path / CARD_FILE).read_text() if (path / CARD_FILE).is_file() else None
        descriptions = None
        if (path / DESCRIPTIONS_FILE).exists():
            descriptions = check_descriptions(read_json(path / DESCRIPTIONS_FILE, "descriptions record"),
                                              str(path / DESCRIPTIONS_FILE))
        return cls(generator, scheduler, tokenizer, info, base_file=base_file, adapter_config=adapter_config,
                   path=path, card=card, descriptions=descriptions)


def check_descriptions(record: Any, source: str) -> dict[str, Any]:
    """Check a :data:`DESCRIPTIONS_FILE` record; return it unchanged.

    Raises:
        ModelDirError: naming ``source`` and the first missing or ill-typed key.
    """
    text = lambda v: isinstance(v, str) and bool(v.strip())  # noqa: E731
    got = record.get("source") if isinstance(record, dict) else record
    if got not in DESCRIPTION_SOURCES:
        raise ModelDirError(f"{source}: key 'source' expected one of {DESCRIPTION_SOURCES}, got {got!r}")
    tasks = record.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ModelDirError(f"{source}: key 'tasks' expected a non-empty object of tasks, got {tasks!r}")
    for task, entry in tasks.items():
        train, heldout = (entry.get("train"), entry.get("heldout")) if isinstance(entry, dict) else (None, None)
        if not isinstance(train, list) or not train or not all(text(t) for t in train):
            raise ModelDirError(f"{source}: key 'tasks.{task}.train' expected a non-empty list of descriptions, "
                                f"got {train!r}")
        if heldout is not None and not text(heldout):
            raise ModelDirError(f"{source}: key 'tasks.{task}.heldout' expected a description or null, got {heldout!r}")
    return record


def _check_base_file(file: Path | None, sha256: str) -> None:
    if file is None or not file.is_file():
        raise WeightFileError(f"base network weights not found: {file}")
    actual = sha256_file(file)
    if actual != sha256:
        raise WeightFileError(f"{file}: sha256 {actual}, expected {sha256} (the base network the generator "
                              "was trained with has changed)")


def _load_weight_generator(directory: Path) -> WeightGenerator:
    """``WeightGenerator`` from ``config.json`` + safetensors weights, strictly (errors name the file and key)."""
    config_file, weights_file = directory / CONFIG_NAME, directory / SAFETENSORS_WEIGHTS_NAME
    config = read_json(config_file, "generator config")
    if config.get("_class_name") != WeightGenerator.__name__:
        raise ModelDirError(f"{config_file}: _class_name is {config.get('_class_name')!r}, "
                            f"expected {WeightGenerator.__name__!r}")
    params = inspect.signature(WeightGenerator.__init__).parameters
    expected = {k for k in params if k != "self" and k not in WeightGenerator.ignore_for_config}
    given = {k for k in config if not k.startswith("_")}
    if given - expected:
        raise ModelDirError(f"{config_file}: unknown key '{sorted(given - expected)[0]}'")
    required = {k for k in expected if params[k].default is inspect.Parameter.empty}
    if required - given:
        raise ModelDirError(f"{config_file}: missing key '{sorted(required - given)[0]}'")
    try:
        net = WeightGenerator.from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelDirError(f"{config_file}: {exc}") from None
    weights = load_weights(weights_file)
    state = net.state_dict()
    for key, value in weights.items():
        if key in state and value.shape != state[key].shape:
            raise ModelDirError(f"{weights_file}: tensor '{key}' has shape {tuple(value.shape)}, "
                                f"expected {tuple(state[key].shape)} from {config_file}")
    missing, unexpected = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or unexpected:
        raise ModelDirError(f"{weights_file} does not match {config_file}: missing keys {missing[:5]}, "
                            f"unexpected keys {unexpected[:5]}")
    net.load_state_dict(weights, strict=True)
    return net.eval()


def _load_scheduler(directory: Path, class_name: str, index_file: Path) -> SchedulerMixin:
    """The scheduler of ``scheduler_config.json``, which must be of the class ``model_index.json`` names;
    rebuilt from its checked schedule (the same config, key for key)."""
    config_file = directory / SchedulerMixin.config_name
    config = read_json(config_file, "scheduler config")
    if config.get("_class_name") != class_name:
        raise ModelDirError(f"{config_file}: _class_name is {config.get('_class_name')!r}, expected {class_name!r} "
                            f"(key '{SCHEDULER_DIR}' of {index_file})")
    try:
        return ScheduleConfig.from_scheduler_config(config, str(config_file)).training_scheduler()
    except ValueError as exc:
        raise ModelDirError(str(exc)) from None


def load_generator(path: str | Path) -> GeneratorArtefact:
    """Load an exported generator folder, checking every file and key (see :class:`GeneratorArtefact`).

    :meth:`weightdiff.sampling.WeightDiffusionPipeline.from_pretrained` loads the same folder as a
    callable pipeline.
    """
    return GeneratorArtefact.from_pretrained(path)
