"""Exceptions for user-facing errors.

Every error that a user can cause (a bad file, a wrong key, a malformed task string) raises a
subclass of :class:`WeightDiffError` whose message names the file or key and gives the expected
and the actual value. The CLI turns these into one line on stderr and a non-zero exit; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class WeightDiffError(Exception):
    """Base class for errors caused by user input (files, keys, task strings, configs)."""


class LayoutMismatchError(WeightDiffError):
    """A state dict or tokens tensor does not match a :class:`~weightdiff.weights.layout.TokenLayout`."""


class LayoutFileError(WeightDiffError):
    """A layout file is missing, truncated, corrupt or from another version."""


class NonFiniteWeightsError(WeightDiffError):
    """A weight tensor holds NaN or Inf values."""


class WeightFileError(WeightDiffError):
    """A weight file is missing, unreadable, corrupt or not in safetensors format."""


class TaskStringError(WeightDiffError):
    """A task string is malformed or names an unknown family or factor."""


class RecipeError(WeightDiffError):
    """A zoo recipe has a missing, unknown or ill-typed field."""


class ManifestError(WeightDiffError):
    """A zoo manifest row is missing fields, duplicated, or disagrees with its weight file."""


class ConditionError(WeightDiffError):
    """A condition (description, code, examples) is empty, too long or of the wrong size."""


class ModelDirError(WeightDiffError):
    """An exported generator directory is incomplete or does not match the requested task."""


class TargetMismatchError(WeightDiffError):
    """Tensors do not fit a target network: a missing or unexpected key, or a wrong shape."""


class CanonicalizationError(WeightDiffError):
    """A state dict cannot be canonicalised (unpaired LoRA factors, not a plain sequential stack)."""


class ZooBuildError(WeightDiffError):
    """A zoo build request is invalid (a malformed shard or worker count) or a trainer broke its contract."""


class BenchmarkError(WeightDiffError):
    """Benchmark inputs disagree (suite, zoo and generator of different kinds or families) or are unknown."""


class OutputPathError(WeightDiffError):
    """An output location cannot be written: read-only, full, not a folder, or already holding results."""


class TaskFamilyError(WeightDiffError):
    """A task family plug-in (entry point of group ``weightdiff.tasks``) cannot be loaded or registered."""
