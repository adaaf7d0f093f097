"""How a base network is called: the attention mask of padded token ids, and the output that is scored.

A tiny BERT (``[PAD]`` = 0) reads a batch in which one sentence is padded to the length of a longer
one. With the mask, the padded sentence's logits must equal those of the same sentence unpadded,
in :class:`Target`'s batched and per-sample paths and in PEFT's own forward given the same mask;
without it they differ (so the check can fail). A base without a classification head is scored
on the output its spec names (``output: pooler_output``), and an import onto such a base with
nothing to score is one error naming the base config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, BertModel

from tests._tolerance import network_tol
from weightdiff.base_networks import BaseCall, BaseSpec, base_call, build_base
from weightdiff.cli import main as cli_main
from weightdiff.errors import TargetMismatchError
from weightdiff.targets import Target
from weightdiff.tasks import dataset as dataset_module
from weightdiff.tasks.dataset import register_task_file
from weightdiff.zoo import Zoo

VOCAB, HIDDEN, PAD = 50, 16, 0
LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}


def _config(**extra) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=16, pad_token_id=PAD, num_labels=3, **extra)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("base_call")
    torch.manual_seed(0)
    BertForSequenceClassification(_config()).save_pretrained(str(out / "cls"), safe_serialization=True)
    BertModel(_config()).save_pretrained(str(out / "plain"), safe_serialization=True)
    return {"cls": out / "cls", "plain": out / "plain", "dir": out}


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A short sentence alone (N=1, L=4), and a batch in which it is padded to the long one's L=7."""
    short = torch.tensor([[2, 11, 12, 3]])
    batch = torch.tensor([[2, 11, 12, 3, PAD, PAD, PAD], [2, 21, 22, 23, 24, 25, 3]])
    return short, batch


def _params(target: Target, s: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {k: 0.3 * torch.randn((s, *shape), generator=gen) for k, shape in target.param_shapes().items()}


def test_padding_is_masked_in_the_batched_and_the_per_sample_paths(folders):
    base = build_base(BaseSpec.from_dict({"pretrained": str(folders["cls"]),
                                          "auto_class": "AutoModelForSequenceClassification"}))
    assert base_call(base) == BaseCall(pad_token_id=PAD)
    target = Target.lora(base, LORA)
    params = _params(target)
    short, batch = _inputs()
    alone = target.forward_batched(params, short)[:, 0]  # (S, C)
    batched = target.forward_batched(params, batch)  # (S, 2, C)
    each = target.forward_each(params, torch.stack([batch, batch.flip(0)]))  # row s on weight set s
    tol = network_tol(base, alone)
    assert torch.allclose(batched[:, 0], alone, rtol=0, atol=tol)
    assert torch.allclose(each[0, 0], alone[0], rtol=0, atol=tol)
    assert torch.allclose(each[1, 1], alone[1], rtol=0, atol=tol)
    unmasked = target.forward_batched(params, batch, attention_mask=torch.ones_like(batch))[:, 0]
    assert (unmasked - alone).abs().max() > 100 * tol  # the padding changes the function when not masked


def test_the_masked_target_equals_peft_given_the_same_mask(folders):
    spec = BaseSpec.from_dict({"pretrained": str(folders["cls"]), "auto_class": "AutoModelForSequenceClassification"})
    base = build_base(spec)
    target = Target.lora(base, LORA)
    params = _params(target, s=1)
    folder = target.save({k: v[0] for k, v in params.items()}, folders["dir"] / "adapter")
    model = PeftModel.from_pretrained(build_base(spec), str(folder.parent)).eval()
    _, batch = _inputs()
    with torch.no_grad():
        want = model(batch, attention_mask=(batch != PAD).long()).logits
    got = target.forward_batched(params, batch)[0]
    assert torch.allclose(got, want, rtol=0, atol=network_tol(base, want))


def test_the_spec_can_turn_the_mask_off_or_name_another_pad_id(folders):
    folder = str(folders["cls"])
    off = build_base(BaseSpec.from_dict({"pretrained": folder, "pad_token_id": None,
                                         "auto_class": "AutoModelForSequenceClassification"}))
    other = BaseSpec.from_dict({"pretrained": folder, "pad_token_id": 7})
    assert base_call(off) == BaseCall(pad_token_id=None)
    assert other.to_dict()["pad_token_id"] == 7 and "pad_token_id" not in BaseSpec.from_dict(
        {"pretrained": folder}).to_dict()  # the default is not written: older records stay as they were
    _, batch = _inputs()
    assert BaseCall(pad_token_id=None).kwargs(batch) == {}
    assert not BaseCall(pad_token_id=PAD).pads(torch.randn(2, 7))  # float inputs are never masked
    with pytest.raises(TargetMismatchError, match="field 'pad_token_id'"):
        BaseSpec.from_dict({"pretrained": folder, "pad_token_id": "zero"}, "base.yaml")


def test_a_base_without_a_head_is_scored_on_the_output_its_spec_names(folders):
    plain = BaseSpec.from_dict({"pretrained": str(folders["plain"]), "output": "pooler_output"})
    assert plain.to_dict()["output"] == "pooler_output"
    base = build_base(plain)
    target = Target.lora(base, LORA)
    params = _params(target)
    short, batch = _inputs()
    out = target.forward_batched(params, batch)
    assert out.shape == (2, 2, HIDDEN)
    assert torch.allclose(out[:, 0], target.forward_batched(params, short)[:, 0], rtol=0, atol=network_tol(base, out))
    wrong = Target.lora(build_base(BaseSpec.from_dict({"pretrained": str(folders["plain"]), "output": "pooled"})),
                        LORA)
    with pytest.raises(TargetMismatchError, match="no 'pooled'.*pooler_output"):
        wrong.forward_batched(params, short)


def _task_file(folder: Path, metric: str, y: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, VOCAB, (12, 5), generator=gen)
    save_file({"x_train": x[:4], "y_train": y[:4], "x_val": x[4:8], "y_val": y[4:8], "x_test": x[8:], "y_test": y[8:]},
              str(folder / f"{metric}.safetensors"))
    path = folder / f"{metric}.json"
    classes = int(y.shape[-1]) if y.is_floating_point() else 3
    path.write_text(json.dumps({"tasks": [{"name": f"bc-{metric}", "num_classes": classes,
                                           "data": f"{metric}.safetensors", "metric": metric,
                                           "descriptions": ["a tiny text task"]}]}))
    return path


def _import(folders: dict, tmp_path: Path, base_yaml: str, metric: str, y: torch.Tensor) -> tuple[int, Path]:
    register_task_file(_task_file(tmp_path, metric, y))
    spec = build_base(BaseSpec.from_dict({"pretrained": str(folders["plain"])}))
    model = get_peft_model(spec, LoraConfig(**LORA))
    model.save_pretrained(str(tmp_path / "a0"))
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"path": "a0", "task": f"dataset:name=bc-{metric}",
                                                         "split": "train", "descriptions": ["x"]}) + "\n")
    (tmp_path / "base.yaml").write_text(base_yaml)
    code = cli_main(["zoo", "import", str(tmp_path / "manifest.jsonl"), "--base-config", str(tmp_path / "base.yaml"),
                     "--name", "bc", "--root", str(tmp_path / "zoos"), "--no-progress", "true"])
    return code, tmp_path / "zoos" / "bc"


def test_a_headless_base_imports_for_a_regression_of_its_pooled_output(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dataset_module, "_SPECS", {})
    y = torch.randn(12, HIDDEN, generator=torch.Generator().manual_seed(2))
    code, zoo_dir = _import(folders, tmp_path, f"pretrained: {folders['plain']}\noutput: pooler_output\n", "mse", y)
    assert code == 0
    base_row = json.loads((zoo_dir / "base" / "entry.json").read_text())
    assert set(base_row["metrics"]) == {"train_mse", "val_mse", "test_mse"}
    zoo = Zoo.open(zoo_dir)
    assert zoo.verify() == []
    x, target_y = dataset_module.load_dataset(dataset_module.dataset_spec("bc-mse")).split("test")
    pooled = zoo.target().forward_batched({k: v[None] for k, v in zoo.load(zoo.rows()[0]["id"]).items()}, x)[0]
    want = float(((pooled - target_y) ** 2).mean(-1).mean())  # the adapter is B = 0: the base's own output
    assert abs(base_row["metrics"]["test_mse"] - want) <= 1e-5 * max(1.0, want)
    entry_mse = zoo.rows()[0]["metrics"]["test_mse"]
    info = zoo.info()  # the zoo's own score, not an accuracy it does not record
    assert info["metric"] == "test_mse" and "test_acc" not in info
    assert info["test_mse"] == {"n": 1, "mean": entry_mse, "min": entry_mse, "max": entry_mse}
    assert info["splits"]["train"]["test_mse"]["n"] == 1
    assert cli_main(["zoo", "info", str(zoo_dir)]) == 0
    out = capsys.readouterr().out
    assert f"test mse mean {entry_mse:.4f}" in out and f"base network: test mse {base_row['metrics']['test_mse']:.4f}" in out


def test_a_headless_base_with_nothing_to_score_is_one_error_naming_the_base(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dataset_module, "_SPECS", {})
    code, zoo_dir = _import(folders, tmp_path, f"pretrained: {folders['plain']}\n", "accuracy",
                            torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2)))
    err = capsys.readouterr().err
    assert code == 2 and not zoo_dir.exists()
    lines = [line for line in err.splitlines() if line.startswith("weightdiff: error:")]
    assert len(lines) == 1 and "base.yaml" in lines[0] and "'output'" in lines[0], err
