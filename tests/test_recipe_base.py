"""`zoo build` recipes that name their base network (``base:``, the schema of a BaseSpec file).

A tiny rotdigits recipe names ``DigitsMLP`` with a hidden width of 24 (the family's is 64) by
``class_path``; a tiny ``toytext`` recipe names a local Hugging Face folder (a 1-layer BERT with a
classification head) by ``pretrained``. Each built zoo must hold adapters of that very base, record
it in ``base/`` as ``zoo import`` does, verify, evaluate and feed the datamodule like any zoo, and
compute what PEFT computes on the rebuilt base. A bad ``base`` is one error naming the recipe and
the key, with no zoo folder left.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

from tests import _toy_models
from tests._tolerance import network_tol
from weightdiff.base_networks import BASE_SPEC_FILE, BaseSpec
from weightdiff.cli import main as cli_main
from weightdiff.errors import RecipeError, TargetMismatchError
from weightdiff.evaluate.weights import evaluate_weights
from weightdiff.io import load_weights
from weightdiff.targets import load_base_network
from weightdiff.tasks import get_task
from weightdiff.tasks.networks import DigitsMLP
from weightdiff.zoo import Zoo, load_recipe, run_build

HIDDEN = 24  # DigitsMLP's default (the rotdigits family's network) is 64
RANK = 2
SPEC = {"class_path": "weightdiff.tasks.networks.DigitsMLP", "init_args": {"hidden": HIDDEN}}
RECIPE = {
    "name": "mlp24", "kind": "lora", "family": "rotdigits",
    "tasks": ["rotdigits:angle=0,flip=0", "rotdigits:angle=40,flip=0"],
    "heldout_tasks": {"far": ["rotdigits:angle=80,flip=0"]},
    "base": SPEC, "base_seed": 3, "rank": RANK, "alpha": 4.0, "target_modules": ["fc1", "fc2"], "steps": 10, "lr": 0.03,
}


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def _build(config: Path, root: Path) -> int:
    return cli_main(["zoo", "build", "--config", str(config), "--root", str(root), "--no-progress", "true"])


@pytest.fixture(scope="module")
def mlp_zoo(tmp_path_factory) -> dict:
    """The class_path recipe built with `weightdiff zoo build`."""
    out = tmp_path_factory.mktemp("recipe_base")
    config = _write(out / "mlp24.yaml", RECIPE)
    assert _build(config, out / "zoos") == 0
    return {"dir": out, "config": config, "zoo": out / "zoos" / RECIPE["name"]}


# ------------------------------------------------------------------------------------ class_path base
def test_entries_are_adapters_of_the_named_base_not_of_the_family_network(mlp_zoo):
    zoo = Zoo.open(mlp_zoo["zoo"])
    base = zoo.base_module()
    assert type(base) is DigitsMLP and base.fc1.out_features == HIDDEN
    want = {"base_model.model.fc1.lora_A.weight": (RANK, 64), "base_model.model.fc1.lora_B.weight": (HIDDEN, RANK),
            "base_model.model.fc2.lora_A.weight": (RANK, HIDDEN), "base_model.model.fc2.lora_B.weight": (10, RANK)}
    assert len(zoo.rows()) == 3
    for row in zoo.rows():
        assert {k: tuple(v.shape) for k, v in zoo.load(row["id"]).items()} == want, row["id"]
    with pytest.raises(TargetMismatchError, match="fc1.weight"):  # the family's network is another architecture
        load_base_network(get_task(RECIPE["tasks"][0]).build_network(), zoo.base_state())


def test_base_is_trained_from_base_seed_and_recorded_as_an_import_records_it(mlp_zoo):
    zoo = Zoo.open(mlp_zoo["zoo"])
    base_dir = zoo.path / "base"
    assert json.loads((base_dir / BASE_SPEC_FILE).read_text()) == SPEC
    assert not (base_dir / "config.json").exists()  # only a Hugging Face base has one
    assert zoo.base_spec() == BaseSpec(**SPEC)
    assert zoo.recipe["base"] == SPEC  # zoo.json: part of the recipe a resumed build is compared with
    row = json.loads((base_dir / "entry.json").read_text())
    assert row["task"] == "digits" and row["seed"] == RECIPE["base_seed"]
    assert row["metrics"]["test_acc"] > 0.5  # trained on digits: an untrained MLP scores ~0.1


def test_target_computes_what_peft_computes_on_the_rebuilt_base(mlp_zoo):
    zoo = Zoo.open(mlp_zoo["zoo"])
    target = zoo.target()
    x, _ = get_task(RECIPE["tasks"][1]).data().split("test")
    for row in zoo.rows():
        reference = PeftModel.from_pretrained(zoo.base_module(), str(zoo.entry_dir(row["id"]))).eval()
        with torch.no_grad():
            want = reference(x)  # (N, 10)
            got = target.forward_batched({k: v[None] for k, v in zoo.load(row["id"]).items()}, x)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=network_tol(zoo.base_module(), want))


def test_zoo_verify_info_and_evaluate_take_the_zoo(mlp_zoo, capsys):
    zoo = Zoo.open(mlp_zoo["zoo"])
    assert zoo.verify() == []
    assert cli_main(["zoo", "verify", str(zoo.path)]) == 0
    capsys.readouterr()
    assert cli_main(["zoo", "info", str(zoo.path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == info["planned_entries"] == 3 and info["base"]["test_acc"] > 0.5
    for row in zoo.rows():
        _, y = get_task(row["task"]).data().split("test")
        got = evaluate_weights(row["task"], [str(zoo.entry_dir(row["id"]))])["weights"][0]["accuracy"]
        assert abs(got - row["metrics"]["test_acc"]) <= 1 / len(y), row["id"]  # one near-tie may round otherwise


def test_datamodule_serves_the_entries_and_their_target(mlp_zoo):
    from weightdiff.training.datamodule import ZooDataModule

    dm = ZooDataModule(str(mlp_zoo["zoo"]), token_size=32, condition="code", functional_batch=4, batch_size=2)
    dm.setup("fit")
    assert dm.tokenizer.layout.num_params == RANK * 64 + HIDDEN * RANK + RANK * HIDDEN + 10 * RANK
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape[0] == 2
    row = dm.train_rows[0]
    params = {k: v[None] for k, v in dm.zoo.load(row["id"]).items()}
    x = get_task(row["task"]).data().x_test
    assert dm.zoo.target().forward_batched(params, x).shape == (1, len(x), 10)


def test_a_generator_of_the_zoo_samples_and_selects_on_the_named_base(mlp_zoo, tmp_path):
    """Export keeps the base record; best-of-k selection builds the target from it, not the family's."""
    from tests.conftest import fit_args
    from weightdiff.training.export import export_checkpoint
    from weightdiff.training.lightning_cli import run_lightning_cli

    run_lightning_cli(fit_args(mlp_zoo["zoo"], tmp_path / "fit", "--trainer.max_steps", "5",
                               "--data.condition", "code"))
    gen = export_checkpoint(next((tmp_path / "fit").glob("**/checkpoints/last.ckpt")), tmp_path / "gen")
    assert (gen / "base" / BASE_SPEC_FILE).is_file()
    out = tmp_path / "samples"
    assert cli_main(["sample", "--model", str(gen), "--task", RECIPE["tasks"][1], "--num", "1",
                     "--select-with", "3", "--candidates", "2", "--out", str(out)]) == 0
    adapter = load_weights(next(out.glob("*/adapter_model.safetensors")))
    assert any(v.shape[0] == HIDDEN or v.shape[-1] == HIDDEN for v in adapter.values())


def test_a_resumed_build_skips_the_zoo_and_a_changed_base_is_refused(mlp_zoo, tmp_path):
    recipe = load_recipe(mlp_zoo["config"])
    before = sorted(p.name for p in (mlp_zoo["zoo"] / "entries").iterdir())
    report = run_build(recipe, mlp_zoo["zoo"].parent, progress=False)
    assert (report.trained_runs, report.skipped_runs) == (0, 3)
    other = _write(tmp_path / "mlp32.yaml", dict(RECIPE, base=dict(SPEC, init_args={"hidden": 32})))
    with pytest.raises(RecipeError, match=r"field 'base' is .*'hidden': 24.* there, .*'hidden': 32"):
        run_build(load_recipe(other), mlp_zoo["zoo"].parent, progress=False)
    assert sorted(p.name for p in (mlp_zoo["zoo"] / "entries").iterdir()) == before


@pytest.mark.parametrize("change, words", [
    ({"base": {"class_path": "tests._no_such_module.Net"}}, ["field 'base'", "_no_such_module", "cannot be imported"]),
    ({"base": dict(SPEC, weights="base.safetensors")}, ["field 'base'", "unknown field 'weights'"]),
    ({"base": dict(SPEC, init_args={"width": 3})}, ["field 'base'", "init_args", "width"]),
    ({"base": {"pretrained": "."}}, ["field 'base'", "not a Hugging Face model folder"]),
    ({"base": {"class_path": "weightdiff.tasks.networks.MNIST1DCNN"}}, ["field 'base'", "fails on an input"]),
    ({"base": dict(SPEC, init_args={"num_classes": 3})}, ["field 'base'", "(1, 3)", "C >= 10"]),
    ({"base": "DigitsMLP"}, ["field 'base' expected dict"]),
    ({"base_network": SPEC}, ["unknown field 'base_network'"]),
    ({"kind": "full", "family": "digits", "tasks": ["digits"], "heldout_tasks": {}, "epochs": 1,
      "checkpoint_epochs": [1]}, ["field 'base'", "lora zoos"]),
], ids=["not-importable", "unknown-key", "bad-init-args", "not-a-hf-folder", "wrong-inputs", "too-few-logits",
        "not-a-mapping", "unknown-recipe-key", "full-zoo"])
def test_a_bad_base_is_one_line_naming_the_recipe_and_key_and_nothing_is_written(tmp_path, capsys, change, words):
    config = _write(tmp_path / "bad.yaml", {**RECIPE, "name": "bad", **change})
    code = _build(config, tmp_path / "zoos")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("weightdiff: error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert str(config) in err[0] or "recipe 'bad'" in err[0], err[0]
    assert not (tmp_path / "zoos").exists()


# ------------------------------------------------------------------------------ Hugging Face base
@pytest.fixture(scope="module")
def hf_zoo(tmp_path_factory) -> Iterator[dict]:
    """A toytext recipe naming a tiny BERT classifier folder (relative to the recipe) by ``pretrained``."""
    from transformers import BertConfig, BertForSequenceClassification

    _toy_models.register()
    out = tmp_path_factory.mktemp("recipe_hf")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=_toy_models.TOY_VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=2 * _toy_models.TOY_SEQ_LEN, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(str(out / "bert"), safe_serialization=True)
    recipe = {"name": "tinybert", "kind": "lora", "family": "toytext", "tasks": ["toytext:k=0", "toytext:k=1"],
              "heldout_tasks": {"far": ["toytext:k=2"]},
              "base": {"pretrained": "bert", "auto_class": "AutoModelForSequenceClassification"},
              "rank": RANK, "alpha": 4.0, "target_modules": ["query", "value"], "steps": 5, "lr": 0.05}
    path = _write(out / "tinybert.yaml", recipe)
    assert _build(path, out / "zoos") == 0
    yield {"dir": out, "folder": out / "bert", "recipe": recipe, "zoo": out / "zoos" / "tinybert"}
    _toy_models.unregister()


def test_hugging_face_base_is_recorded_with_its_config_and_its_own_weights(hf_zoo):
    zoo = Zoo.open(hf_zoo["zoo"])
    base_dir = zoo.path / "base"
    assert json.loads((base_dir / BASE_SPEC_FILE).read_text()) == {
        "pretrained": ".", "auto_class": "AutoModelForSequenceClassification"}
    assert (base_dir / "config.json").read_bytes() == (hf_zoo["folder"] / "config.json").read_bytes()
    assert zoo.recipe["base"]["pretrained"] == str(hf_zoo["folder"])  # resolved against the recipe's folder
    original = load_weights(hf_zoo["folder"] / "model.safetensors")
    state = zoo.base_state()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)  # not trained: the folder's weights
    assert zoo.verify() == []


def test_hugging_face_entries_load_in_plain_peft_and_compute_the_target(hf_zoo):
    from transformers import AutoModelForSequenceClassification

    zoo = Zoo.open(hf_zoo["zoo"])
    base_dir = (zoo.path / "base").resolve()
    x = get_task("toytext:k=0").data().x_test  # token ids (N, 6)
    moved = 0
    for row in zoo.rows():
        entry = zoo.entry_dir(row["id"])
        config = json.loads((entry / "adapter_config.json").read_text())
        assert (entry / config["base_model_name_or_path"]).resolve() == base_dir
        base = AutoModelForSequenceClassification.from_pretrained(str(base_dir), local_files_only=True).eval()
        model = PeftModel.from_pretrained(base, str(entry)).eval()
        params = zoo.load(row["id"])
        moved += sum(int(k.endswith("lora_B.weight") and bool(v.abs().sum() > 0)) for k, v in params.items())
        with torch.no_grad():
            want = model(x).logits  # (N, 2)
            got = zoo.target().forward_batched({k: v[None] for k, v in params.items()}, x)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=network_tol(base, want))
    assert moved > 0  # the adapters were trained (PEFT initialises B to zero)


def test_a_hugging_face_base_without_logits_or_with_changed_weights_is_refused(hf_zoo, tmp_path):
    from transformers import BertForSequenceClassification

    no_head = _write(tmp_path / "nohead.yaml", dict(hf_zoo["recipe"], name="nohead",
                                                   base={"pretrained": str(hf_zoo["folder"])}))  # AutoModel
    with pytest.raises(RecipeError, match="field 'base'.*without 'logits'"):
        run_build(load_recipe(no_head), tmp_path / "zoos", progress=False)
    assert not (tmp_path / "zoos").exists()
    untrainable = _write(tmp_path / "toymlp.yaml",
                         dict(hf_zoo["recipe"], base={"class_path": "tests._toy_models.ToyMLP"}))
    with pytest.raises(RecipeError, match="field 'base' names a class_path.*'toytext' has none"):
        load_recipe(untrainable)  # a class_path base is trained on the base family's data
    folder = tmp_path / "bert"
    shutil.copytree(hf_zoo["folder"], folder)
    recipe = _write(tmp_path / "copy.yaml", hf_zoo["recipe"])  # its "bert" is now this copy, beside the file
    run_build(load_recipe(recipe), tmp_path / "zoos", progress=False)
    torch.manual_seed(1)
    BertForSequenceClassification(BertForSequenceClassification.config_class.from_pretrained(str(folder))
                                  ).save_pretrained(str(folder), safe_serialization=True)
    with pytest.raises(RecipeError, match="sha256"):
        run_build(load_recipe(recipe), tmp_path / "zoos", progress=False)
