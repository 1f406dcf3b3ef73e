"""Shared test settings and builders.

Settings: one torch thread (tiny models gain nothing from more, and shared CI cores slow down
several-fold when threads compete) and no transformers deprecation noise. Test modules need no
thread fixture of their own.

Builders, shared so that each is written once (test modules import them with ``from conftest import
...``: pytest puts this folder on ``sys.path`` when it loads this file):

- :func:`tuned_tiny_llama` and the ``tuned_llama`` fixture: tiny-llama with a LoRA adapter whose B
  matrices are moved off their zero init, so every LoRA matrix has gradients, as after fine-tuning;
- :class:`FakeInputs`: the few ``MethodInputs`` members the forward methods (mirrored, tracin_we,
  repsim) read, over given rows and a model;
- the ``llama`` and ``bert`` fixtures (plain tiny models, bert with 3 labels) and :data:`ALPACA_ROWS`,
  three short Alpaca rows (one with an input) to encode and score;
- :data:`WORDS`, :func:`word_sentences` and :func:`instruction_rows`: seeded random instruction text
  for the noise tests;
- :func:`tiny_peft_llama` and :func:`token_rows`: a peft-wrapped tiny Llama built from config and
  column-form encoded rows for it, for the gradient-store tests that need no registry model;
- :func:`unscored_tiny_llama_run` and :func:`distributed_collect`: a small tiny-llama pipeline run with
  its scoring removed, and ``python -m infscope.distributed_collect`` on it (under torchrun for more
  than one process);
- :func:`sentence_transform_data` and :func:`tiny_bert_cli_run`: a built-in instruction set and a
  fine-tuned tiny-bert classification run, both made through the CLI.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from infscope.cli import main
from infscope.data.builtin import make_builtin
from infscope.data.formatting import format_text
from infscope.models.config import LoraSpec
from infscope.models.lora import attach_lora
from infscope.models.registry import load_model
from infscope.pipeline import PipelineConfig, run_pipeline

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


# ---------------------------------------------------------------- a tuned tiny-llama


def tuned_tiny_llama(spec: LoraSpec | None = None, *, seed: int = 1):
    """tiny-llama (seed 0) with LoRA ``spec`` (seed 0), each lora_B set to 0.05 * N(0, 1) drawn from ``seed``.

    Frozen (no parameter requires grad) and in eval mode: a fixed "tuned" adapter to score with.
    """
    loaded = load_model("tiny-llama", seed=0)
    attach_lora(loaded, spec, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    loaded.model.requires_grad_(False)
    loaded.model.eval()
    return loaded


@pytest.fixture(scope="module")
def tuned_llama():
    """(tuned tiny-llama, 12 sentence_transform train rows, 3 test rows as queries); one per test module."""
    split = make_builtin("sentence_transform", seed=0, n_classes=3, per_class=4, n_test_per_class=1)
    return tuned_tiny_llama(), split.train, split.test


class FakeInputs:
    """The few MethodInputs members the forward methods use: ``rows`` to score, ``queries``, the model,
    and ``encode`` (task, max_length, batch_size, response_only) as the run's encode options."""

    seed, task, canary_ids = 0, "instruction", []

    def __init__(self, loaded, rows: list[dict], queries: list[dict], encode: dict, aggregate: bool = True):
        self._loaded, self._rows, self._queries, self._encode = loaded, rows, queries, encode
        self.aggregate = aggregate

    @property
    def train_ids(self) -> list[str]:
        return [r["id"] for r in self._rows]

    def model(self, which: str = "checkpoint"):
        return self._loaded

    def rows(self) -> list[dict]:
        return self._rows

    def query_rows(self) -> list[dict]:
        return self._queries

    def encode_options(self) -> dict:
        return {**self._encode, "label_names": None}


# ---------------------------------------------------------------- plain tiny models and rows


@pytest.fixture(scope="module")
def llama():
    """tiny-llama as built (no adapter), one per test module."""
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def bert():
    """tiny-bert for classification with 3 labels, one per test module."""
    return load_model("tiny-bert", task="classification", num_labels=3)


ALPACA_ROWS = [
    {
        "id": "a",
        "instruction": "Rewrite the sentence in past tense.",
        "input": "The cat runs.",
        "output": "The cat ran.",
    },
    {"id": "b", "instruction": "Say hello.", "input": "", "output": "Hello there, my friend!"},
    {"id": "c", "instruction": "Count to three.", "input": "", "output": "1 2 3"},
]


# ---------------------------------------------------------------- random instruction text

WORDS = [
    "the",
    "cat",
    "is",
    "on",
    "a",
    "mat",
    "and",
    "it",
    "was",
    "happy",
    "because",
    "people",
    "receive",
    "letters",
    "with",
    "care",
]


def word_sentences(rng: random.Random, k: int, words: tuple[int, int] = (4, 10)) -> str:
    """``k`` capitalised sentences of ``words[0]``..``words[1]`` random WORDS each, drawn from ``rng``."""
    return " ".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))).capitalize() + "." for _ in range(k)
    )


def instruction_rows(
    n: int = 80,
    seed: int = 0,
    *,
    id_digits: int = 3,
    instruction_words: tuple[int, int] = (3, 12),
    output_words: tuple[int, int] = (4, 10),
    output_sentences: tuple[int, int] = (1, 3),
) -> list[dict]:
    """``n`` seeded Alpaca rows ``row-000``...: a one-sentence instruction, an input on every third row,
    a few output sentences, ``class`` = index mod 4, and the formatted ``text``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        instruction = word_sentences(rng, 1, instruction_words)
        output = word_sentences(rng, rng.randint(*output_sentences), output_words)
        row = {
            "id": f"row-{i:0{id_digits}d}",
            "instruction": instruction,
            "input": "" if i % 3 else "Some context here.",
            "output": output,
            "class": i % 4,
        }
        row["text"] = format_text(row)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- a peft tiny Llama and token rows


def tiny_peft_llama(vocab: int = 40, *, layers: int = 2, positions: int = 64) -> nn.Module:
    """A tiny LlamaForCausalLM (16 hidden, 2 heads, 1 kv head) from config, seeded 0, wrapped by peft with
    LoRA r=2 on q_proj/v_proj and a non-zero init, so every LoRA matrix has gradients."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=positions,
    )
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(cfg), lora)


def token_rows(n: int, vocab: int, *, seed: int, cycle: int = 4, prefix: str = "r") -> dict[str, list]:
    """``n`` column-form encoded rows (as models.encode would give) ``{prefix}0``...: row i holds
    ``3 + i % cycle`` random tokens below ``vocab`` drawn from ``seed``, labels with the first masked."""
    gen = torch.Generator().manual_seed(seed)
    cols: dict[str, list] = {"ids": [], "input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        toks = torch.randint(0, vocab, (3 + i % cycle,), generator=gen).tolist()
        cols["ids"].append(f"{prefix}{i}")
        cols["input_ids"].append(toks)
        cols["attention_mask"].append([1] * len(toks))
        cols["labels"].append([-100] + toks[1:])
    return cols


# ---------------------------------------------------------------- runs and processes for distributed scoring


def unscored_tiny_llama_run(base: Path) -> Path:
    """A tiny-llama pipeline run at ``base`` (3 classes x 8 train + 2 val rows, 25 % noise, 1 epoch,
    max length 48) with its scoring folder removed, so scoring it starts from the checkpoint."""
    config = PipelineConfig(
        model="tiny-llama",
        classes=3,
        train_per_class=8,
        val_per_class=2,
        epochs=1,
        max_length=48,
        noise_ratio=0.25,
        methods=("loss",),
    )
    run_pipeline(config, base)
    shutil.rmtree(base / "scoring")
    return base


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def distributed_collect(run: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``python -m infscope.distributed_collect RUN ARGS`` in a child process (under torchrun on
    127.0.0.1 when ``processes`` > 1), one thread each, without this process's rank variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = ["-m", "infscope.distributed_collect", str(run), *args]
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        cmd = [*launcher, "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *cmd]
    return subprocess.run(
        [sys.executable, *cmd],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


# ---------------------------------------------------------------- data and runs made through the CLI


def sentence_transform_data(path: Path) -> Path:
    """``infscope data make sentence_transform`` (3 classes, 8 rows + 2 test rows each) written to ``path``."""
    sizes = ["--classes", "3", "--per-class", "8", "--test-per-class", "2"]
    assert main(["data", "make", "sentence_transform", *sizes, "--out", str(path)]) == 0
    return path


def tiny_bert_cli_run(folder: Path, n_rows: int) -> Path:
    """``infscope finetune`` of tiny-bert (1 epoch, 1 thread) on ``n_rows`` two-class rows ``r0``...
    ("bad night i" / "good day i", label i % 2) written to ``folder/cls.jsonl``; returns ``folder/run``."""
    rows = [
        {"id": f"r{i}", "text": ("good day " if i % 2 else "bad night ") + str(i), "label": i % 2}
        for i in range(n_rows)
    ]
    data = folder / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = folder / "run"
    options = ["--model", "tiny-bert", "--epochs", "1", "--threads", "1"]
    assert main(["finetune", str(data), "--out", str(run), *options]) == 0
    return run
