"""The ``cordigits`` family: corruptions, task strings, descriptions, the ViT base and its LoRA adapters."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests._tolerance import interpolation_tol, network_tol
from weightdiff.errors import TaskStringError
from weightdiff.targets import Target
from weightdiff.tasks import corruptions as C
from weightdiff.tasks import get_task, make_task
from weightdiff.tasks.cordigits import CorDigitsTask
from weightdiff.tasks.digits import digits_arrays
from weightdiff.tasks.networks import DigitsViT
from weightdiff.zoo import Zoo, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "zoo" / "cordigits-lora.yaml"
TINY = REPO / "configs" / "zoo" / "tiny-cordigits-lora.yaml"
RANDOM = {"noise", "saltpepper", "occlude"}  # the corruptions that draw from the generator
NAMES = list(C.CORRUPTIONS)


def _images(n: int = 64) -> torch.Tensor:
    return digits_arrays().x_test[:n]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- corruptions
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_corruption_keeps_shape_dtype_and_range_and_changes_the_image(name: str, dtype: torch.dtype) -> None:
    x = _images().to(dtype)
    c = C.CORRUPTIONS[name]
    lo, hi = C.PIXEL_RANGE
    for severity in (0.3, 0.7, 1.0):
        y = c(x, severity, _gen(0))
        assert y.shape == x.shape and y.dtype == dtype
        assert float(y.min()) >= lo and float(y.max()) <= hi
        changed = (y - x).abs().flatten(1).amax(1) > 1e-3  # (N,)
        # every image is changed (a square may land on black background only: the batch is)
        assert bool(changed.any() if name == "occlude" else changed.all()), (name, severity)
    assert torch.equal(c(x, 0.0, _gen(0)), x)  # severity 0 is the identity
    with pytest.raises(ValueError, match="outside"):
        c(x, 1.5, _gen(0))
    with pytest.raises(ValueError, match="N, C, H, W"):
        c(x[0, 0], 0.5, _gen(0))


@pytest.mark.parametrize("name", NAMES)
def test_corruption_is_deterministic_per_seed(name: str) -> None:
    x = _images()
    c = C.CORRUPTIONS[name]
    a, b, other = c(x, 0.6, _gen(1)), c(x, 0.6, _gen(1)), c(x, 0.6, _gen(2))
    assert torch.equal(a, b)
    assert torch.equal(a, other) == (name not in RANDOM)  # only the random ones read the generator


@pytest.mark.parametrize("name", [n for n, c in C.CORRUPTIONS.items() if c.graded])
def test_graded_corruptions_grow_with_severity(name: str) -> None:
    x = _images(200)
    c = C.CORRUPTIONS[name]
    change = [float((c(x, s, _gen(0)) - x).abs().mean()) for s in (0.2, 0.5, 0.9)]
    assert change[0] < change[1] < change[2], change


def test_corruptions_do_what_they_say() -> None:
    x = _images()
    g = _gen(0)
    tol = interpolation_tol(size=8, scale=1.0)
    torch.testing.assert_close(C.rotate(x, 90.0 / C.MAX_ROTATION, g), torch.rot90(x, 1, (-2, -1)), rtol=0, atol=tol)
    one_pixel = torch.zeros_like(x)
    one_pixel[..., 1:, 1:] = x[..., :-1, :-1]
    torch.testing.assert_close(C.translate(x, 1.0 / C.MAX_SHIFT, g), one_pixel, rtol=0, atol=tol)  # right and down
    assert torch.equal(C.mirror(x, 1.0, g), x.flip(-1))
    assert torch.equal(C.invert(x, 1.0, g), 1.0 - x)
    faded = C.contrast(x, 1.0, g)
    torch.testing.assert_close(faded.mean((1, 2, 3)), x.mean((1, 2, 3)))  # the mean stays, the contrast goes
    torch.testing.assert_close(faded.std((1, 2, 3)), C.MIN_CONTRAST * x.std((1, 2, 3)))
    blocks = C.pixelate(x, 1.0, g)
    assert torch.equal(blocks[..., ::2, ::2], blocks[..., 1::2, 1::2])  # constant on 2×2 blocks
    side = round(C.MAX_OCCLUSION * 0.6)
    covered = C.occlude(torch.ones_like(x), 0.6, g)
    assert bool(((covered == 0).flatten(1).sum(1) == side * side).all())  # one black square per image
    flat = torch.full((400, 1, 8, 8), 0.5)
    hit = (C.salt_pepper(flat, 1.0, g) != 0.5).float().mean()
    p, n = C.MAX_SALT_PEPPER, flat.numel()
    assert abs(float(hit) - p) < 5 * (p * (1 - p) / n) ** 0.5  # the stated fraction, within 5 binomial sd


def test_composition_applies_in_order() -> None:
    x = _images()
    rt = C.apply_corruptions(x, [("rotate", 0.25), ("translate", 0.5)], _gen(0))
    tr = C.apply_corruptions(x, [("translate", 0.5), ("rotate", 0.25)], _gen(0))
    assert (rt - tr).abs().max() > 0.1  # a rotation and a shift do not commute
    manual = C.translate(C.rotate(x, 0.25, _gen(0)), 0.5, _gen(0))
    assert torch.equal(rt, manual)
    # a mirror and an inversion commute (exactly: both move or map pixels one by one)
    assert torch.equal(C.apply_corruptions(x, [("mirror", 1), ("invert", 1)], _gen(0)),
                       C.apply_corruptions(x, [("invert", 1), ("mirror", 1)], _gen(0)))
    # the random draws of the second step follow those of the first, from the one generator
    g = _gen(3)
    two = C.apply_corruptions(x, [("noise", 0.5), ("occlude", 0.5)], _gen(3))
    assert torch.equal(two, C.occlude(C.noise(x, 0.5, g), 0.5, g))
    assert torch.equal(C.apply_corruptions(x, [], _gen(0)), x)
    with pytest.raises(KeyError, match="unknown corruption 'fog'"):
        C.apply_corruptions(x, [("fog", 0.5)], _gen(0))


def test_task_data_is_the_same_in_another_process() -> None:
    """The per-task seeds come from a stable hash of the task name (not Python's salted hash())."""
    name = "cordigits:c1=noise,s1=0.5,c2=occlude,s2=0.4"
    code = ("import hashlib, sys; from weightdiff.tasks import get_task; "
            "print(hashlib.sha256(get_task(sys.argv[1]).data().x_train.numpy().tobytes()).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, cwd=REPO).stdout.strip()
            for seed in ("1", "2")}
    data = get_task(name).data()
    assert outs == {hashlib.sha256(data.x_train.numpy().tobytes()).hexdigest()}
    assert not torch.equal(data.x_val[:10], get_task(name.replace("s2=0.4", "s2=0.3")).data().x_val[:10])


# ---------------------------------------------------------------- task strings
@pytest.mark.parametrize("text, canonical", [
    ("cordigits:c1=rotate,s1=0.5", "cordigits:c1=rotate,s1=0.5,c2=none,s2=0"),
    ("cordigits: s1 = .50, c1 = rotate", "cordigits:c1=rotate,s1=0.5,c2=none,s2=0"),
    ("cordigits:c1=blur,s1=0.4,c2=invert,s2=1.0", "cordigits:c1=blur,s1=0.4,c2=invert,s2=1"),
    ("cordigits:c2=mirror,s2=1,c1=zoom,s1=1e-1", "cordigits:c1=zoom,s1=0.1,c2=mirror,s2=1"),
])
def test_task_strings_canonicalise(text: str, canonical: str) -> None:
    task = get_task(text)
    assert task.name == canonical and get_task(task.name) == task
    assert isinstance(task, CorDigitsTask) and task.kind == "lora" and task.base_family == "digits"
    assert make_task("cordigits", **task.factors) == task


@pytest.mark.parametrize("text, needles", [
    ("cordigits:c1=fog,s1=0.5", ["factor 'c1' = 'fog' is not a corruption", "rotate", "mirror"]),
    ("cordigits:c1=none,s1=0.5", ["factor 'c1' = 'none' is not a corruption"]),
    ("cordigits:c1=rotate,s1=0.5,c2=Blur,s2=0.5", ["factor 'c2' = 'Blur'", "or 'none'"]),
    ("cordigits:c1=rotate", ["missing required factor 's1'"]),
    ("cordigits:s1=0.5", ["missing required factor 'c1'"]),
    ("cordigits:c1=rotate,s1=1.5", ["'s1'", "out of range", "[0, 1]"]),
    ("cordigits:c1=rotate,s1=0", ["'s1' = 0 leaves 'rotate' out"]),
    ("cordigits:c1=rotate,s1=0.5,s2=0.5", ["'s2' = 0.5 needs a second corruption"]),
    ("cordigits:c1=rotate,s1=0.5,c2=blur", ["'s2' = 0 leaves 'blur' out"]),
    ("cordigits:c1=rotate,s1=0.5,c2=rotate,s2=0.2", ["both name 'rotate'"]),
    ("cordigits:c1=invert,s1=0.5", ["'s1' = 0.5, but 'invert' has no degrees", "s1=1"]),
    ("cordigits:c1=rotate,s1=0.5,c2=mirror,s2=0.3", ["'s2' = 0.3, but 'mirror' has no degrees"]),
    ("cordigits:c1=rotate,s1=0.5,angle=3", ["unknown factor 'angle'"]),
])
def test_bad_task_strings_name_the_factor(text: str, needles: list[str]) -> None:
    with pytest.raises(TaskStringError) as info:
        get_task(text)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_code_and_data() -> None:
    task = get_task("cordigits:c1=blur,s1=0.4,c2=invert,s2=1")
    code = task.code()
    assert code.shape == (len(C.CORRUPTIONS),) and code.dtype == torch.float32
    assert code[NAMES.index("blur")] == pytest.approx(0.4) and code[NAMES.index("invert")] == 1.0
    assert float(code.sum()) == pytest.approx(1.4)
    data, clean = task.data(), digits_arrays()
    for split in ("train", "val", "test"):
        x, y = data.split(split)
        x0, y0 = clean.split(split)
        assert torch.equal(y, y0)
        # blur and invert draw nothing: the split is exactly the clean one corrupted
        assert torch.equal(x, C.invert(C.blur(x0, 0.4, _gen(0)), 1.0, _gen(0)))
    assert task.data() is data  # cached


# ---------------------------------------------------------------- descriptions
def _described_tasks() -> list[CorDigitsTask]:
    """The shipped recipe's tasks and every corruption of the registry at severity 1."""
    train, held = load_recipe(RECIPE).task_lists()
    return [get_task(t) for t in train + [t for t, _ in held]] + [get_task(f"cordigits:c1={n},s1=1") for n in NAMES]


def test_every_description_names_its_corruptions_and_no_other() -> None:
    tasks = _described_tasks()
    for task in tasks:
        applied = {name for name, _ in task.steps}
        texts = task.descriptions() + [task.heldout_description()]
        assert len(set(task.descriptions())) >= 8 and task.heldout_description() not in task.descriptions()
        for text in texts:
            named = {n for n, c in C.CORRUPTIONS.items() if c.mentioned_in(text)}
            assert named == applied, (task.name, text, named)
            assert task.description_problem(text) is None
    # severities are stated in words or as a percentage: tasks that differ only by severity differ in text
    mild, heavy = get_task("cordigits:c1=shear,s1=0.3"), get_task("cordigits:c1=shear,s1=0.8")
    assert "slightly sheared" in mild.descriptions()[0] and "heavily sheared" in heavy.descriptions()[0]
    assert "80% strength" in " ".join(heavy.descriptions())
    assert not set(mild.descriptions()) & set(heavy.descriptions())


def test_description_problem_flags_a_description_naming_no_corruption() -> None:
    problem = CorDigitsTask.description_problem("Classify handwritten digits, heavily.")
    assert problem is not None and "names no corruption" in problem and "'cordigits'" in problem
    assert CorDigitsTask.description_problem("digits that are strongly tilted") is None
    assert CorDigitsTask.NUMERIC_DIM == 0  # the corruption reaches a generator through the text alone


# ---------------------------------------------------------------- the ViT base and its adapters
def _randomise_lora(model: torch.nn.Module, seed: int) -> None:
    g = _gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def test_vit_lora_targets_load_in_plain_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = DigitsViT().eval()
    x = _images(32)
    assert base(x).shape == (32, 10)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    peft_model = get_peft_model(copy.deepcopy(base), config)
    adapted = sorted(n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A"))
    assert adapted == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q", "v")]
    _randomise_lora(peft_model, 1)
    peft_model.eval()
    expected = peft_model(x)
    assert (expected - base(x)).abs().max() > 0.1  # the adapter changes the function
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = DigitsViT()
    fresh.load_state_dict(base.state_dict())
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert torch.equal(loaded(x), expected)


def test_target_batched_path_equals_peft_forward(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = DigitsViT().eval()
    config = get_task("cordigits:c1=rotate,s1=0.5").default_lora_config()
    assert config["target_modules"] == ["q", "v"]
    target = Target.lora(base, config)
    g = _gen(2)
    params = {k: 0.2 * torch.randn((3, *s), generator=g) for k, s in target.param_shapes().items()}  # S = 3
    x = _images(50)
    batched = target.forward_batched(params, x)  # (S, N, C) through functional_call + vmap
    assert batched.shape == (3, 50, 10)
    for s in range(3):
        folder = tmp_path / f"s{s}"
        target.save({k: v[s] for k, v in params.items()}, folder)
        with torch.no_grad():
            reference = target.load_module(folder)(x)  # PeftModel.from_pretrained on the base
        torch.testing.assert_close(batched[s], reference, rtol=0, atol=network_tol(base, reference))
    assert (batched[0] - batched[1]).abs().max() > 0.1


def test_family_network_is_the_recipes_base() -> None:
    recipe = load_recipe(RECIPE)
    family = get_task(recipe.tasks[0]).build_network()
    named = recipe.build_network()
    assert type(family) is type(named) is DigitsViT
    assert {k: v.shape for k, v in family.state_dict().items()} == {k: v.shape for k, v in named.state_dict().items()}


# ---------------------------------------------------------------- recipes
def test_shipped_recipe_holds_out_what_it_says() -> None:
    recipe = load_recipe(RECIPE)
    train, held = recipe.task_lists()
    assert len(train) >= 100 and recipe.runs >= 2 and recipe.target_modules == ["q", "v"]
    assert {k for _, k in held} == {"near", "far", "combo", "novel"}
    steps = [get_task(t).steps for t in train]
    trained = {name for s in steps for name, _ in s}
    severities = {name: sorted({v for s in steps for n, v in s if n == name and len(s) == 1}) for name in trained}
    pairs = {frozenset(n for n, _ in s) for s in steps if len(s) == 2}
    for name, kind in held:
        task_steps = get_task(name).steps
        applied = {n for n, _ in task_steps}
        if kind == "novel":
            assert not applied & trained, name
            continue
        assert applied <= trained, name
        if kind == "combo":
            assert len(task_steps) == 2 and frozenset(applied) not in pairs, name
            continue
        ((c, s),) = task_steps
        lo, hi = severities[c][0], severities[c][-1]
        assert s not in severities[c]
        assert (lo < s < hi) if kind == "near" else not (lo <= s <= hi), (name, kind)


def test_tiny_recipe_builds_a_zoo(tiny_cordigits_zoo: Path) -> None:
    recipe = load_recipe(TINY)
    zoo = Zoo.open(tiny_cordigits_zoo)
    rows = zoo.rows()
    train, held = recipe.task_lists()
    assert len(rows) == len(train) + len(held)
    assert {r["heldout_kind"] for r in zoo.rows("heldout")} == {"near", "far", "combo", "novel"}
    spec = json.loads((zoo.path / "base" / "base_spec.json").read_text())
    assert spec["class_path"] == "weightdiff.tasks.networks.DigitsViT"
    assert zoo.info()["base"]["test_acc"] > 0.9  # the ViT base learns clean digits
    assert all(len(r["code"]) == len(C.CORRUPTIONS) and len(r["descriptions"]) >= 8 for r in rows)
    config = zoo.adapter_config()
    assert sorted(config["target_modules"]) == ["q", "v"] and config["r"] == recipe.rank
    model = zoo.target().load_module(zoo.entry_dir(rows[0]["id"]))
    assert type(model).__name__ == "PeftModel"
    assert zoo.verify() == []
