"""The planner: sizes against real models and published counts, check_plan warnings, the CLI."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch

from infscope.cli import main
from infscope.errors import InfscopeError
from infscope.grads import collect_to_store
from infscope.grads import plan as plan_module
from infscope.grads.hooks import PerExampleGradients
from infscope.grads.plan import (
    KNOWN,
    Architecture,
    architecture_of,
    build_plan,
    check_plan,
    format_plan,
    known_architecture,
    lora_block_dims,
    projected_dims,
)
from infscope.models.config import LoraSpec
from infscope.models.lora import attach_lora
from infscope.models.registry import load_model

Usage = namedtuple("Usage", "total used free")


def short_name(name: str) -> str:
    """``base_model.model.model.layers.1.self_attn.q_proj.lora_A.default`` -> ``layers.1.q_proj.lora_A``."""
    name = name[name.index("layers.") :].replace(".default", "")
    return name.replace("self_attn.", "").replace("mlp.", "")


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama", seed=0)
    base_params = sum(p.numel() for p in loaded.model.parameters())
    arch = architecture_of(loaded.model, "tiny-llama")
    model = attach_lora(loaded, LoraSpec(r=4, target_modules=["q_proj", "v_proj", "down_proj"], layers="1"))
    return model, arch, base_params


def test_analytic_block_dims_equal_the_real_lora_model(tiny):
    model, arch, base_params = tiny
    engine = PerExampleGradients(model, None)
    for block_by in ("matrix", "module", "layer"):
        real = engine.layout(block_by).dims
        analytic = lora_block_dims(arch, 4, ["q_proj", "v_proj", "down_proj"], [1], block_by)
        assert sorted(real.values()) == sorted(analytic.values()), block_by
        short = {short_name(r): d for r, d in real.items()}
        assert short == analytic, block_by
    assert arch.params() == base_params


def test_known_architectures_match_published_counts():
    # Parameter counts from the model cards / config arithmetic (embeddings included).
    assert KNOWN["llama-2-7b"].params() == 6_738_415_616
    assert KNOWN["llama-3-8b"].params() == 8_030_261_248
    assert KNOWN["smollm2-135m"].params() == 134_515_008
    # Per-row LoRA r=8 gradient on q,v: r (in + out) per module and layer, by hand.
    assert sum(lora_block_dims(KNOWN["smollm2-135m"], 8, ["q_proj", "v_proj"], None).values()) == 30 * (
        8 * (576 + 576) + 8 * (576 + 192)
    )  # 460,800 values = 1.8 MB in float32
    assert sum(lora_block_dims(KNOWN["llama-2-7b"], 8, ["q_proj", "v_proj"], None).values()) == 4_194_304
    assert sum(lora_block_dims(KNOWN["llama-3-8b"], 8, ["q_proj", "v_proj"], None).values()) == 3_407_872
    assert known_architecture("meta-llama/Llama-2-7b-hf") is KNOWN["llama-2-7b"]
    assert known_architecture("meta-llama/Meta-Llama-3-8B") is KNOWN["llama-3-8b"]
    assert known_architecture("gpt2") is None
    assert projected_dims({"a": 100, "b": 10}, 50) == {"a": 50, "b": 10}


def test_forward_flops_by_hand():
    arch = Architecture("toy", hidden=8, layers=2, intermediate=16, vocab=10, heads=2, kv_heads=1)
    # q 8x8, k 8x4, v 8x4, o 8x8 = 192; mlp 3 x 8 x 16 = 384; per token 2 (2 x 576 + 80) = 2464
    assert arch.forward_flops(3) == 2464 * 3 + 2 * 9 * 8 * 2


def test_sizes_only_plan_for_a_model_not_on_disk():
    plan = build_plan("meta-llama/Llama-2-7b-hf", 52_002, project=8192)
    assert plan.probe is None and plan.probe_note == "no probe: sizes only"
    assert plan.row_dim == 4_194_304
    assert plan.store_bytes("float32", None) == 52_002 * 4_194_304 * 4
    assert plan.store_bytes("bfloat16", 8192) == 52_002 * 128 * 8192 * 2
    text = format_plan(plan)
    assert "no probe: sizes only" in text and "813 GiB" in text and "ASSUMED" in text
    with pytest.raises(InfscopeError, match="--hidden"):
        build_plan("someone/unknown-model", 10)


def test_probe_times_a_tiny_model(tiny):
    plan = build_plan("tiny-llama", 1000, rank=2, seq_len=16, batch_size=4, probe_rows=8)
    p = plan.probe
    assert p is not None and p.rows == 8 and p.grads_s_per_row > 0 and p.finetune_s_per_row > 0
    stages = {s.name: s for s in plan.stages}
    assert stages["gradient pass"].seconds == pytest.approx(p.grads_s_per_row * 1000)
    assert stages["scoring (streamed)"].seconds == pytest.approx(3 * p.grads_s_per_row * 1000)
    _, arch, _ = tiny
    assert plan.row_dim == sum(lora_block_dims(arch, 2, ["q_proj", "v_proj"], None).values())


def test_check_plan_warns_when_the_disk_is_short(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * 2**20, 9 * 2**20, 2**20))
    with pytest.warns(UserWarning) as record:
        lines = check_plan(3 * 2**30, tmp_path / "store")
    assert len(lines) == 1 and str(record[0].message) == lines[0]
    assert "3 GiB" in lines[0] and "1 MiB is free" in lines[0]
    assert "--project D" in lines[0] and "--grad-dtype bfloat16" in lines[0]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**40, 0, 2**39))
    assert check_plan(3 * 2**30, tmp_path / "store") == []


def test_check_plan_warns_when_memory_is_short(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  4000 kB\nMemFree:  1000 kB\nMemAvailable:  2048 kB\n")
    monkeypatch.setattr(plan_module, "MEMINFO", meminfo)
    assert plan_module.available_memory(meminfo) == 2 * 2**20
    monkeypatch.setattr(plan_module, "available_memory", lambda: 2 * 2**20)
    with pytest.warns(UserWarning, match=r"scoring will need about 5 MiB of memory but 2 MiB"):
        lines = check_plan(1, tmp_path, scoring_memory=5 * 2**20)
    assert len(lines) == 1


def test_collect_to_store_checks_the_plan_first(tmp_path, monkeypatch, tiny):
    model, _, _ = tiny
    data = {"input_ids": torch.randint(0, 100, (6, 5)), "labels": torch.randint(0, 100, (6, 5))}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**20, 2**20 - 1024, 1024))
    with pytest.warns(UserWarning, match="1 KiB is free") as record, pytest.raises(InfscopeError):
        collect_to_store(model, data, tmp_path / "store", progress=False)
    assert any("--grad-dtype bfloat16" in str(w.message) for w in record)


def test_cli_plan_sizes_only(capsys):
    code = main(["plan", "--model", "llama-3-8b", "--rows", "52002", "--project", "8192", "--no-probe"])
    out = capsys.readouterr().out
    assert code == 0
    assert "3,407,872 values" in out and "no probe: sizes only" in out
    assert main(["plan", "--model", "x/y", "--rows", "10", "--hidden", "64", "--no-probe"]) == 2
    assert "--layers" in capsys.readouterr().err
