"""Runs from other trainers: a real ``transformers.Trainer`` + peft LoRA run on tiny-llama, read back.

The run is trained once per module (about 5 s): 4 rows, batch 2, 2 epochs, a checkpoint per epoch,
every step logged. Expected learning rates and losses are recomputed here from the raw
``trainer_state.json``; reloaded adapters must reproduce the logits the trained model gave when
each checkpoint was saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from infscope.errors import InfscopeError
from infscope.models.external import (
    checkpoint_weights,
    detect_external,
    load_base_model,
    lora_spec_from_config,
    read_external_run,
    resolve_base_model,
)
from infscope.models.lora import load_adapter
from infscope.models.registry import load_model

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot today", "one two three four five"]
LR = 1e-2
PROBE = torch.tensor([[1, 50, 60, 70, 80, 90]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=PROBE).logits.double().clone()
    model.train(was_training)
    return out


def _dataset(tokenizer):
    class Rows(torch.utils.data.Dataset):
        def __init__(self, texts):
            enc = tokenizer(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
            self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            labels = self.ids[i].clone()
            labels[self.mask[i] == 0] = -100
            return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}

    return Rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Trainer run with per-epoch checkpoints, the base model folder and the logits at each save."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    root = tmp_path_factory.mktemp("external")
    tiny = load_model("tiny-llama")
    base_dir = root / "base"
    tiny.model.save_pretrained(base_dir)
    tiny.tokenizer.save_pretrained(base_dir)
    base = load_model(str(base_dir))
    base_logits = _logits(base.model)
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(base.model, lora)
    saved: dict[int, torch.Tensor] = {}

    class RecordLogits(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            saved[state.global_step] = _logits(model)

    rows = _dataset(base.tokenizer)
    args = TrainingArguments(
        output_dir=str(root / "out"),
        num_train_epochs=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=LR,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="epoch",
        eval_strategy="epoch",
        metric_for_best_model="eval_loss",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows(TEXTS),
        eval_dataset=rows(TEXTS[:2]),
        callbacks=[RecordLogits()],
    )
    trainer.train()
    n_lora = sum(1 for n, p in model.named_parameters() if p.requires_grad)
    return SimpleNamespace(
        out=root / "out", base_dir=base_dir, saved=saved, base_logits=base_logits, model=model, n_lora=n_lora
    )


def _state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def _hand_interval_means(history: list[dict], key: str, bounds: list[int]) -> list[float]:
    """Plain mean of the ``key`` values logged at steps in (previous bound, bound]."""
    out, previous = [], 0
    for bound in bounds:
        values = [e[key] for e in history if key in e and previous < e["step"] <= bound]
        out.append(sum(values) / len(values))
        previous = bound
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_states(out: Path, edit) -> None:
    for state_file in out.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        edit(state)
        state_file.write_text(json.dumps(state))


def test_trainer_run_lists_checkpoints_with_hand_computed_lrs(trained):
    out = trained.out
    assert detect_external(out) == "trainer"
    run = read_external_run(out)
    assert run.kind == "trainer" and run.task == "causal"
    assert [Path(c.path).name for c in run.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert [c.step for c in run.checkpoints] == [2, 4]
    assert [c.epoch for c in run.checkpoints] == [1.0, 2.0]

    history = _state(out / "checkpoint-4")["log_history"]
    lrs = _hand_interval_means(history, "learning_rate", [2, 4])
    assert [c.lr for c in run.checkpoints] == pytest.approx(lrs, rel=1e-12, abs=0)
    assert lrs[0] > lrs[1] > 0  # a linear decay: the first epoch ran at higher rates
    assert checkpoint_weights(run.checkpoints) == {c.path: c.lr for c in run.checkpoints}
    losses = _hand_interval_means(history, "loss", [2, 4])
    assert [c.train_loss for c in run.checkpoints] == pytest.approx(losses, rel=1e-12)
    evals = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    assert [c.val_loss for c in run.checkpoints] == [evals[2], evals[4]]

    recorded = Path(_state(out / "checkpoint-4")["best_model_checkpoint"]).name
    assert Path(run.best.path).name == recorded


def test_optimizer_state_and_lora_spec(trained):
    run = read_external_run(trained.out)
    for c in run.checkpoints:
        assert c.optimizer_path is not None and Path(c.optimizer_path).is_file()
        assert c.scheduler_path is not None and Path(c.scheduler_path).is_file()
        state = torch.load(c.optimizer_path, map_location="cpu", weights_only=True)
        n_params = sum(len(group["params"]) for group in state["param_groups"])
        assert n_params == trained.n_lora == 8  # A and B of q_proj, v_proj in 2 layers
        assert len(state["state"]) == trained.n_lora  # Adam moments for each of them
    assert run.base_model == str(trained.base_dir)
    assert run.lora is not None
    assert (run.lora.r, run.lora.alpha, run.lora.target_modules, run.lora.layers) == (
        4,
        8.0,
        ["q_proj", "v_proj"],
        None,
    )


def test_loaded_adapters_reproduce_the_trained_logits(trained):
    run = read_external_run(trained.out)
    assert sorted(trained.saved) == [c.step for c in run.checkpoints]
    for c in run.checkpoints:
        loaded = load_base_model(run)
        model = load_adapter(loaded, c.path)
        logits = _logits(model)
        torch.testing.assert_close(logits, trained.saved[c.step], atol=1e-5, rtol=0)
        assert (logits - trained.base_logits).abs().max() > 1e-3  # the adapter really moved the model


def test_single_checkpoint_folder_reads_its_own_state(trained):
    folder = trained.out / "checkpoint-4"
    assert detect_external(folder) == "adapter"
    run = read_external_run(folder)
    assert len(run.checkpoints) == 1 and run.best is run.checkpoints[0]
    (c,) = run.checkpoints
    history = _state(folder)["log_history"]
    assert c.step == 4 and c.epoch == 2.0
    assert c.lr == pytest.approx(_hand_interval_means(history, "learning_rate", [4])[0], rel=1e-12)
    assert c.optimizer_path == str(folder / "optimizer.pt")


def test_best_falls_back_to_lowest_eval_loss_then_last(trained, tmp_path):
    out = _copy(trained.out, tmp_path / "run")

    def lower_first(state):
        state.pop("best_model_checkpoint", None)
        for entry in state["log_history"]:
            if "eval_loss" in entry:
                entry["eval_loss"] = 1.0 if entry["step"] == 2 else 2.0

    _edit_states(out, lower_first)
    assert Path(read_external_run(out).best.path).name == "checkpoint-2"

    _edit_states(out, lambda s: s.update(log_history=[e for e in s["log_history"] if "eval_loss" not in e]))
    run = read_external_run(out)
    assert all(c.val_loss is None for c in run.checkpoints)
    assert run.best is run.checkpoints[-1]


def test_sparse_lr_logging_is_interpolated(trained, tmp_path):
    """Rates logged only at steps 1 and 4: a linear schedule is recovered exactly in between."""
    full = [c.lr for c in read_external_run(trained.out).checkpoints]
    out = _copy(trained.out, tmp_path / "run")

    def keep_ends(state):
        for entry in state["log_history"]:
            if entry.get("step") in (2, 3):
                entry.pop("learning_rate", None)

    _edit_states(out, keep_ends)
    history = _state(out / "checkpoint-4")["log_history"]
    lr1 = next(e["learning_rate"] for e in history if e["step"] == 1 and "learning_rate" in e)
    lr4 = next(e["learning_rate"] for e in history if e["step"] == 4 and "learning_rate" in e)
    per_step = [lr1 + (k - 1) * (lr4 - lr1) / 3 for k in (1, 2, 3, 4)]
    sparse = [c.lr for c in read_external_run(out).checkpoints]
    assert sparse == pytest.approx([(per_step[0] + per_step[1]) / 2, (per_step[2] + per_step[3]) / 2])
    assert sparse == pytest.approx(full, rel=1e-9)

    _edit_states(out, lambda s: [e.pop("learning_rate", None) for e in s["log_history"]])
    run = read_external_run(out)
    assert [c.lr for c in run.checkpoints] == [None, None]
    assert set(checkpoint_weights(run.checkpoints).values()) == {1.0}


def test_bare_peft_adapter_is_one_checkpoint(trained, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(trained.base_dir))
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["v_proj"], layers_to_transform=[1], init_lora_weights=False
    )
    model = get_peft_model(base.model, config)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "adapter")

    assert detect_external(tmp_path / "adapter") == "adapter"
    run = read_external_run(tmp_path / "adapter")
    assert run.kind == "adapter" and len(run.checkpoints) == 1 and run.best is run.checkpoints[0]
    (c,) = run.checkpoints
    assert (c.step, c.epoch, c.lr, c.val_loss, c.optimizer_path) == (None, None, None, None, None)
    assert checkpoint_weights(run.checkpoints) == {c.path: 1.0}
    assert run.lora is not None and (run.lora.r, run.lora.target_modules, run.lora.layers) == (
        2,
        ["v_proj"],
        "1",
    )
    torch.testing.assert_close(
        _logits(load_adapter(load_base_model(run), c.path)), expected, atol=1e-5, rtol=0
    )


def _rewrite_keys(src: Path, dst: Path, rename) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "adapter_model.safetensors"))
    save_file({rename(k): v for k, v in weights.items()}, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "rename",
    [
        pytest.param(lambda k: k.removeprefix("base_model.model."), id="no-peft-prefix"),
        pytest.param(lambda k: k.replace("base_model.model.model.", "base_model.model."), id="from-backbone"),
    ],
)
def test_adapter_keys_shifted_by_a_module_path_still_load(trained, tmp_path, rename):
    folder = _rewrite_keys(trained.out / "checkpoint-4", tmp_path / "shifted", rename)
    model = load_adapter(load_model(str(trained.base_dir)), folder)
    torch.testing.assert_close(_logits(model), trained.saved[4], atol=1e-5, rtol=0)


def test_adapter_for_other_layers_is_refused(trained, tmp_path):
    """peft alone would skip the unknown layer's weights and leave the adapter half at its init."""
    folder = _rewrite_keys(
        trained.out / "checkpoint-4", tmp_path / "other", lambda k: k.replace("layers.1.", "layers.7.")
    )
    with pytest.raises(InfscopeError, match="does not match the base model"):
        load_adapter(load_model(str(trained.base_dir)), folder)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_errors_for_bad_folders(trained, tmp_path):
    with pytest.raises(InfscopeError, match="does not exist") as exc:
        read_external_run(tmp_path / "missing")
    _one_line(exc)

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InfscopeError, match="is a file"):
        read_external_run(tmp_path / "notes.txt")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("nothing here")
    assert detect_external(empty) is None
    with pytest.raises(InfscopeError, match="neither a peft adapter") as exc:
        read_external_run(empty)
    _one_line(exc)

    full = tmp_path / "full"
    (full / "checkpoint-3").mkdir(parents=True)
    (full / "checkpoint-3" / "config.json").write_text("{}")
    (full / "checkpoint-3" / "model.safetensors").write_bytes(b"")
    assert detect_external(full) == "trainer"
    with pytest.raises(InfscopeError, match="holds a full model, not a LoRA adapter") as exc:
        read_external_run(full)
    _one_line(exc)

    partial = _copy(trained.out, tmp_path / "partial")
    (partial / "checkpoint-4" / "adapter_model.safetensors").unlink()
    with pytest.raises(InfscopeError, match="adapter is incomplete"):
        read_external_run(partial)

    other = _copy(trained.out / "checkpoint-2", tmp_path / "prefix")
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(InfscopeError, match="LoRA adapters only"):
        read_external_run(other)


def test_infscope_runs_are_not_external(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    ckpt = tmp_path / "epoch-1"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text("{}")
    (ckpt / "trainer_state.json").write_text(json.dumps({"fingerprint": "abc", "epoch": 1}))
    assert detect_external(run_dir) is None and detect_external(ckpt) is None
    with pytest.raises(InfscopeError, match="made by infscope"):
        read_external_run(ckpt)


def test_base_model_that_cannot_be_found_names_the_flag(trained, tmp_path):
    folder = _copy(trained.out / "checkpoint-4", tmp_path / "moved")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "/gone/base"})
    )
    run = read_external_run(folder)
    assert run.base_model == "/gone/base"
    with pytest.raises(InfscopeError, match="--base-model") as exc:
        resolve_base_model(run)
    _one_line(exc)
    with pytest.raises(InfscopeError, match="--base-model"):
        load_base_model(run)
    assert resolve_base_model(run, str(trained.base_dir)) == str(trained.base_dir)
    model = load_adapter(load_base_model(run, str(trained.base_dir)), folder)
    torch.testing.assert_close(_logits(model), trained.saved[4], atol=1e-5, rtol=0)

    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(InfscopeError, match="names no base model; pass --base-model"):
        resolve_base_model(read_external_run(folder))
    with pytest.raises(InfscopeError, match="--base-model"):
        resolve_base_model(run, str(tmp_path / "nowhere"))


def test_lora_spec_from_config_keeps_only_what_it_can_express():
    plain = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["v_proj", "q_proj"]}
    spec = lora_spec_from_config({**plain, "layers_to_transform": [0, 3]})
    assert (spec.r, spec.alpha, spec.dropout, spec.target_modules, spec.layers) == (
        8,
        16.0,
        0.1,
        ["q_proj", "v_proj"],
        "0,3",
    )
    assert lora_spec_from_config({**plain, "target_modules": "q_proj"}).target_modules == ["q_proj"]
    assert lora_spec_from_config({**plain, "target_modules": ".*layers\\.1.*proj"}) is None
    assert lora_spec_from_config({**plain, "target_modules": "all-linear"}) is None
    assert lora_spec_from_config({**plain, "use_dora": True}) is None
    assert lora_spec_from_config({**plain, "rank_pattern": {"q_proj": 4}}) is None


def test_score_command_scores_trainer_adapters_without_infscope_finetune(trained, tmp_path, capsys):
    """`infscope score TRAINER_OUT --data ...` opens a run around the adapters and scores it like any other."""
    import numpy as np

    from infscope.cli import main
    from infscope.estimators.registry import get_estimator
    from infscope.grads.store import GradientStore
    from infscope.runs import RunLayout
    from infscope.scoring import open_run

    data = tmp_path / "train.jsonl"
    rows = [
        {"id": f"r{i}", "instruction": "Repeat the text.", "input": t, "output": t}
        for i, t in enumerate(TEXTS * 2)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {p: p.stat().st_mtime_ns for p in Path(trained.out).rglob("*") if p.is_file()}
    run = tmp_path / "run"
    argv = [
        "score",
        str(trained.out),
        "--data",
        str(data),
        "--val-fraction",
        "0.25",
        "--out",
        str(run),
        "--max-length",
        "32",
        "--method",
        "datainf,tracin,loss",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    opened = open_run(run)
    assert opened.record.kind == "external" and opened.spec.name == str(trained.base_dir.resolve())
    assert [c.tag for c in opened.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    expected_lrs = [c.lr for c in read_external_run(trained.out).checkpoints]
    tracin = pd_scores(run, "tracin")
    np.testing.assert_allclose(tracin.meta["checkpoint_weights"], expected_lrs)
    layout = RunLayout(run)
    train = GradientStore.open(layout.grads(opened.best.path, "train"))
    val = GradientStore.open(layout.grads(opened.best.path, "val"))
    direct = get_estimator("datainf").fit(train).score(val)
    np.testing.assert_allclose(pd_scores(run, "datainf").values, direct.values, rtol=1e-10)
    assert sorted(direct.train_ids) == sorted(r["id"] for r in opened.train)
    # the user's folder is untouched, and a second call reuses the run instead of refusing it
    assert {p: p.stat().st_mtime_ns for p in Path(trained.out).rglob("*") if p.is_file()} == before
    assert main(argv) == 0
    assert main(["score", str(trained.out), "--out", str(run)]) == 2
    assert "--data" in capsys.readouterr().err


def pd_scores(run: Path, method: str):
    from infscope.estimators.scores import Scores
    from infscope.runs import RunLayout

    return Scores.load(RunLayout(run).scores(method))
