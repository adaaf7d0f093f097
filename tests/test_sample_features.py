"""``sample.json`` names the numeric description features the family supplies, not angle and mirror.

A test family, ``boxsizes``, reads three box sides from a description (``NUMERIC_FIELDS`` width,
height, depth and has_size). The tiny text generator reads four numeric features, so, told that
its zoo is of that family, it gets the family's own: the sample's ``condition.parsed`` and
``model_input`` must name them, with the values that reached the model. A family without
features (``dataset``) records nothing parsed for a generator reading none, and the angle/mirror
names for an older generator trained with those four.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

from weightdiff.errors import TaskFamilyError
from weightdiff.models.conditioning import TEXT_DIM
from weightdiff.models.generator import load_generator
from weightdiff.sampling import SamplerSettings, make_condition, sample
from weightdiff.tasks import Task, register_family
from weightdiff.tasks import base as task_base
from weightdiff.tasks.numeric import ANGLE_MIRROR, NUMERIC_FIELDS, numeric_reader

BOX_FIELDS = ("width", "height", "depth", "has_size")
TEXT = "boxes of 3 by 4 by 12 centimetres"


@dataclass(frozen=True)
class BoxSizesTask(Task):
    """A family whose descriptions state three box sides ("3 by 4 by 12")."""

    family_name: ClassVar[str] = "boxsizes"
    kind: ClassVar[str] = "lora"
    NUMERIC_DIM: ClassVar[int] = 4
    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = BOX_FIELDS

    @classmethod
    def _sides(cls, text: str) -> list[float] | None:
        m = re.search(r"(\d+) by (\d+) by (\d+)", text)
        return [float(v) for v in m.groups()] if m else None

    @classmethod
    def description_features(cls, text: str) -> torch.Tensor:
        sides = cls._sides(text)
        return torch.tensor([*(sides or [0.0, 0.0, 0.0]), float(sides is not None)])

    @classmethod
    def description_numbers(cls, text: str) -> dict[str, Any]:
        sides = cls._sides(text)
        return {"sides_cm": sides}


@dataclass(frozen=True)
class MisnamedTask(BoxSizesTask):
    family_name: ClassVar[str] = "misnamed"
    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ("width", "height")


@pytest.fixture
def families():
    for cls in (BoxSizesTask, MisnamedTask):
        register_family(cls)
    yield
    for cls in (BoxSizesTask, MisnamedTask):
        task_base._FAMILIES.pop(cls.family_name, None)


@pytest.fixture
def gen(tiny_generator):
    return load_generator(tiny_generator)


def test_sample_json_names_the_features_of_the_family(gen, families, tmp_path, monkeypatch):
    assert gen.generator.cond.numeric_dim == len(BOX_FIELDS)  # the tiny generator reads four numbers
    monkeypatch.setitem(gen.info["zoo"], "family", "boxsizes")
    cond = make_condition(gen, description=TEXT)
    dirs, _ = sample(gen, cond, 1, SamplerSettings(steps=1), tmp_path / "samples", use_cache=False, progress=False)
    recorded = json.loads((dirs[0] / "sample.json").read_text())["condition"]
    assert recorded["parsed"] == {"sides_cm": [3.0, 4.0, 12.0]}
    names, values = recorded["model_input"].removeprefix("text embedding + numeric features ").split(" = ")
    assert names == "[width, height, depth, has_size]"
    assert json.loads(values) == [3.0, 4.0, 12.0, 1.0]
    assert torch.equal(cond.raw[0, TEXT_DIM:], torch.tensor([3.0, 4.0, 12.0, 1.0]))  # what reached the model
    assert "angle" not in json.dumps(recorded) and "mirror" not in json.dumps(recorded)


def test_a_family_without_features_records_none_unless_the_generator_was_trained_with_angle_and_mirror(gen,
                                                                                                       monkeypatch):
    monkeypatch.setitem(gen.info["zoo"], "family", "dataset")
    old = make_condition(gen, description=TEXT)  # a 4-feature generator keeps its angle/mirror inputs
    assert old.info["parsed"] == {"angle": None, "mirrored": False}
    assert f"[{', '.join(NUMERIC_FIELDS)}]" in old.info["model_input"]

    provider = gen.generator.cond
    monkeypatch.setattr(provider, "numeric_dim", 0)  # as a generator trained on the dataset family is built
    monkeypatch.setattr(provider, "numeric_mlp", None)
    monkeypatch.setattr(provider, "raw_dim", TEXT_DIM)
    cond = make_condition(gen, description=TEXT)
    assert cond.info["parsed"] == {} and cond.info["model_input"].startswith("text embedding only")
    assert cond.raw.shape == (1, TEXT_DIM)


def test_the_reader_is_the_familys_and_a_misnamed_family_is_refused(families):
    reader = numeric_reader("boxsizes")
    assert reader.fields == BOX_FIELDS and reader.dim == 4
    assert reader.numbers(TEXT) == {"sides_cm": [3.0, 4.0, 12.0]}
    assert numeric_reader("rotdigits").fields == NUMERIC_FIELDS
    assert numeric_reader("rotdigits").numbers("digits turned 30 degrees clockwise") == {"angle": -30.0,
                                                                                         "mirrored": False}
    assert numeric_reader("digits").fields == () and numeric_reader("digits", numeric_dim=4) is ANGLE_MIRROR
    with pytest.raises(TaskFamilyError, match=r"'misnamed'.*names 2 NUMERIC_FIELDS \['width', 'height'\] "
                                              r"for NUMERIC_DIM = 4"):
        numeric_reader("misnamed")
