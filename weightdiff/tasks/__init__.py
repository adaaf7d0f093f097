"""Task families: task strings, data, descriptions, codes and target networks.

``get_task("rotdigits:angle=40,flip=1")`` builds a :class:`Task`; see ``docs/architecture.md``
for the families. Importing this package registers ``digits``, ``mnist1d`` and ``rotdigits``.
"""

from weightdiff.tasks.base import (
    Factor,
    Task,
    TaskData,
    canonical_name,
    get_family,
    get_task,
    list_families,
    make_task,
)
from weightdiff.tasks.digits import DigitsTask
from weightdiff.tasks.mnist1d import MNIST1DTask
from weightdiff.tasks.rotdigits import RotDigitsTask, rotate_images

__all__ = [
    "DigitsTask", "Factor", "MNIST1DTask", "RotDigitsTask", "Task", "TaskData", "canonical_name", "get_family",
    "get_task", "list_families", "make_task", "rotate_images",
]
