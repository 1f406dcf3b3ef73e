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
  for the noise tests.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from infscope.data.builtin import make_builtin
from infscope.data.formatting import format_text
from infscope.models.config import LoraSpec
from infscope.models.lora import attach_lora
from infscope.models.registry import load_model

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
