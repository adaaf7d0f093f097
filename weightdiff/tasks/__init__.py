"""Task families: task strings, data, descriptions, codes and target networks.

``get_task("rotdigits:angle=40,flip=1")`` builds a :class:`Task`; see ``docs/architecture.md``
for the families. Importing this package registers ``digits``, ``mnist1d``, ``rotdigits``, ``cordigits``
(corrupted digits: :mod:`weightdiff.tasks.cordigits`) and ``dataset`` (tasks of imported zoos, named in
task files: :mod:`weightdiff.tasks.dataset`);
other installed packages add families through the entry-point group ``weightdiff.tasks``
(see :class:`Task`).
"""

from weightdiff.tasks.base import (
    ENTRY_POINT_GROUP,
    Factor,
    Task,
    TaskData,
    canonical_name,
    get_family,
    get_task,
    list_families,
    make_task,
    register_family,
)
from weightdiff.tasks.cordigits import CorDigitsTask
from weightdiff.tasks.dataset import DatasetNetworkTask, DatasetTask, register_task_file
from weightdiff.tasks.digits import DigitsTask
from weightdiff.tasks.digitsmlp import DigitsMLPTask
from weightdiff.tasks.mnist1d import MNIST1DTask
from weightdiff.tasks.metrics import METRICS, Metric, get_metric
from weightdiff.tasks.rotdigits import RotDigitsTask, rotate_images

__all__ = [
    "ENTRY_POINT_GROUP", "METRICS", "CorDigitsTask", "DatasetNetworkTask", "DatasetTask", "DigitsTask", "Factor",
    "MNIST1DTask", "Metric", "DigitsMLPTask", "RotDigitsTask", "Task", "TaskData", "canonical_name", "get_family",
    "get_task", "get_metric",
    "list_families", "make_task", "register_family", "register_task_file", "rotate_images",
]
