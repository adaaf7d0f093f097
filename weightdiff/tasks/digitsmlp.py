"""The ``digits-mlp`` family: the ``digits`` task with a million-parameter :class:`WideMLP` as its target.

The data, splits, classes and descriptions are those of :class:`~weightdiff.tasks.digits.DigitsTask`
(one task, the upright 8×8 digits); only the network differs. :class:`DigitsCNN` has ~3,000
parameters, so a whole-network zoo of it never tests a generator on networks of realistic size;
``WideMLP(width=1024)`` has 1,126,410, which a generator must produce in many independent chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from weightdiff.tasks.base import register_family
from weightdiff.tasks.digits import DigitsTask
from weightdiff.tasks.networks import WideMLP

MLP_WIDTH = 1024  # 1,126,410 parameters on the digits (see WideMLP)


@register_family
@dataclass(frozen=True)
class DigitsMLPTask(DigitsTask):
    """Classify upright 8×8 handwritten digits (10 classes); target: a full :class:`WideMLP` of width 1024."""

    family_name: ClassVar[str] = "digits-mlp"

    def build_network(self) -> nn.Module:
        return WideMLP(in_features=math.prod(self.input_shape), width=MLP_WIDTH, num_classes=self.num_classes)
