"""Chat rows (``messages``): loading, views, assistant-only label masks, noise, fine-tuning, errors."""

from __future__ import annotations

import copy
import json
import math
import random
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import word_sentences
from infscope.data.columns import ColumnMap
from infscope.data.formatting import (
    format_text,
    prompt_response_view,
    render_chat,
    with_instruction,
    with_response,
)
from infscope.data.loading import load_rows
from infscope.errors import InfscopeError
from infscope.models import encode as encode_module
from infscope.models.encode import IGNORE_INDEX, encode_rows
from infscope.models.finetune import FinetuneConfig, finetune
from infscope.models.lora import LoraSpec
from infscope.models.loss import per_example_loss
from infscope.models.registry import load_model
from infscope.noise.inject import inject_noise

# A ChatML-style template (what SmolLM2 and many instruct models use), set on the tiny tokenizer to
# exercise the tokenizer-template path; the tiny tokenizers themselves have no chat template.
CHATML = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CHATS = [
    {
        "id": "c1",
        "messages": [
            turn("system", "Be brief."),
            turn("user", "Say hello."),
            turn("assistant", "Hello there."),
            turn("user", "Count to three."),
            turn("assistant", "1 2 3"),
        ],
    },
    {"id": "c2", "messages": [turn("user", "Name a color."), turn("assistant", "Blue.")]},
    {
        "id": "c3",
        "messages": [
            turn("user", "Rewrite in past tense: the cat runs."),
            turn("assistant", "The cat ran."),
            turn("user", "And the dog walks?"),
            turn("assistant", "The dog walked."),
        ],
    },
]


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny-llama").tokenizer


@pytest.fixture(scope="module")
def chatml_tok(tok):
    other = copy.deepcopy(tok)
    other.chat_template = CHATML
    return other


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# ---------------------------------------------------------------- loading


def test_load_messages_jsonl_json_and_parquet_agree(tmp_path):
    records = [{k: v for k, v in r.items() if k != "id"} for r in CHATS]  # ids by position
    write_jsonl(tmp_path / "chat.jsonl", records)
    loaded = load_rows(tmp_path / "chat.jsonl")
    assert loaded.task == "instruction" and loaded.format == "jsonl"
    assert [r["id"] for r in loaded.rows] == ["row-00000", "row-00001", "row-00002"]
    for row, record in zip(loaded.rows, records, strict=True):
        assert row["messages"] == record["messages"]
        users = [t["content"] for t in record["messages"] if t["role"] == "user"]
        assert row["instruction"] == users[-1]
        assert row["output"] == record["messages"][-1]["content"]
        assert "input" not in row
    (tmp_path / "chat.json").write_text(json.dumps(records), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "chat.parquet")
    for name in ("chat.json", "chat.parquet"):
        other = load_rows(tmp_path / name)
        assert other.task == "instruction" and other.rows == loaded.rows
        assert all(type(r["messages"]) is list and type(r["messages"][0]) is dict for r in other.rows)


def test_messages_column_can_be_mapped_and_saved_rows_reload(tmp_path):
    records = [{"conversation": r["messages"], "key": r["id"]} for r in CHATS]
    write_jsonl(tmp_path / "conv.jsonl", records)
    loaded = load_rows(tmp_path / "conv.jsonl", columns=ColumnMap(messages="conversation", id="key"))
    assert [r["id"] for r in loaded.rows] == ["c1", "c2", "c3"]
    assert [r["messages"] for r in loaded.rows] == [r["messages"] for r in CHATS]
    # a saved infscope chat file (messages plus its views) loads back to the same rows
    write_jsonl(tmp_path / "saved.jsonl", loaded.rows)
    assert load_rows(tmp_path / "saved.jsonl").rows == loaded.rows
    # ...but a view column that disagrees with the turns is refused
    bad = [dict(loaded.rows[0], output="Something else.")]
    write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(InfscopeError, match="row 'c1'.*'output' column that differs"):
        load_rows(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------- views


def test_prompt_response_view_and_replacements():
    chat = {**CHATS[0], "extra": 7}
    alpaca = {"id": "a", "instruction": "Say hi.", "input": "ctx", "output": "Hi.", "text": "stale"}
    before = copy.deepcopy([chat, alpaca])
    assert prompt_response_view(chat) == ("Count to three.", "1 2 3")
    assert prompt_response_view(alpaca) == ("Say hi.", "Hi.")

    new = with_response(chat, "4 5 6")
    assert new["messages"][:-1] == chat["messages"][:-1]
    assert new["messages"][-1] == turn("assistant", "4 5 6")
    assert new["output"] == "4 5 6" and new["extra"] == 7
    assert prompt_response_view(new) == ("Count to three.", "4 5 6")

    new = with_instruction(chat, "Count to six.")
    changed = [i for i, (a, b) in enumerate(zip(chat["messages"], new["messages"], strict=True)) if a != b]
    assert changed == [3] and new["messages"][3] == turn("user", "Count to six.")
    assert prompt_response_view(new) == ("Count to six.", "1 2 3")

    new = with_instruction(alpaca, "Wave.")
    assert new == {**alpaca, "instruction": "Wave.", "text": format_text(new)}
    assert new["text"].startswith("### Instruction:\nWave.\n\n### Input:\nctx")
    assert with_response(alpaca, "Yo.")["output"] == "Yo."
    # round trip and no mutation of the inputs
    assert with_instruction(alpaca, prompt_response_view(alpaca)[0])["instruction"] == "Say hi."
    assert [chat, alpaca] == before
    with pytest.raises(InfscopeError, match="not an instruction row"):
        with_response({"id": "t", "text": "x", "label": 1}, "y")


def test_builtin_template_text():
    text = format_text(CHATS[1])
    assert text == "### User:\nName a color.\n\n### Assistant:\nBlue."
    assert render_chat(CHATS[1]["messages"], bos="<s>", eos="</s>") == "<s>" + text + "</s>"


# ---------------------------------------------------------------- encoding


def reference_encoding(messages, tokenizer, render):
    """Per-turn reference: tokenise each turn's prefix on its own; reply tokens lie between the
    generation prompt before the reply and the conversation up to and including it."""
    full = tokenizer(render(messages, False), add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(full)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer(render(messages[:k], True), add_special_tokens=False)["input_ids"])
        end = len(tokenizer(render(messages[: k + 1], False), add_special_tokens=False)["input_ids"])
        labels[start:end] = full[start:end]
    return full, labels


def target_runs(ids, labels):
    """Contiguous runs of target tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def test_builtin_template_mask_matches_per_turn_reference(tok):
    def render(messages, generation):
        return render_chat(messages, add_generation_prompt=generation, bos=tok.bos_token, eos=tok.eos_token)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = encode_rows(CHATS, tok, task="causal")
    assert enc.ids == ["c1", "c2", "c3"] and enc.truncated == []
    for row, ids, labels in zip(CHATS, enc.input_ids, enc.labels, strict=True):
        ref_ids, ref_labels = reference_encoding(row["messages"], tok, render)
        assert ids == ref_ids and labels == ref_labels
        assert ids[0] == tok.bos_token_id
        # hand check: the targets are exactly each reply followed by EOS, system/user masked
        replies = [m["content"] + tok.eos_token for m in row["messages"] if m["role"] == "assistant"]
        assert [tok.decode(run) for run in target_runs(ids, labels)] == replies
    assert enc.n_targets().tolist() == [
        sum(
            len(tok(m["content"] + tok.eos_token, add_special_tokens=False)["input_ids"])
            for m in r["messages"]
            if m["role"] == "assistant"
        )
        for r in CHATS
    ]


def test_tokenizer_chat_template_mask_matches_per_turn_reference(chatml_tok):
    def render(messages, generation):
        return chatml_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tokenizer with a template gives no fallback warning
        enc = encode_rows(CHATS, chatml_tok, task="instruction")
    for row, ids, labels in zip(CHATS, enc.input_ids, enc.labels, strict=True):
        ref_ids, ref_labels = reference_encoding(row["messages"], chatml_tok, render)
        assert ids == ref_ids and labels == ref_labels
        replies = [m["content"] + "</s>\n" for m in row["messages"] if m["role"] == "assistant"]
        assert [chatml_tok.decode(run) for run in target_runs(ids, labels)] == replies
    full = encode_rows(CHATS, chatml_tok, task="causal", response_only=False)
    assert full.labels == full.input_ids == enc.input_ids


def test_fallback_warns_once(tok, monkeypatch):
    monkeypatch.setattr(encode_module, "_FALLBACK_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode_rows(CHATS, tok, task="causal")
        encode_rows(CHATS[:1], tok, task="causal")
    messages = [str(w.message) for w in caught if "no chat template" in str(w.message)]
    assert len(messages) == 1 and "built-in template" in messages[0]


def test_mixed_rows_and_truncation(tok):
    alpaca = {"id": "a", "instruction": "Say hi.", "input": "", "output": "Hi."}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = encode_rows([CHATS[0], alpaca, CHATS[1]], tok, task="causal")
        chat_only = encode_rows([CHATS[0], CHATS[1]], tok, task="causal")
        alpaca_only = encode_rows([alpaca], tok, task="causal")
        assert mixed.input_ids == [chat_only.input_ids[0], alpaca_only.input_ids[0], chat_only.input_ids[1]]
        assert mixed.labels == [chat_only.labels[0], alpaca_only.labels[0], chat_only.labels[1]]
        short = encode_rows(CHATS[:1], tok, task="causal", max_length=24)
    assert short.truncated == ["c1"] and len(short.input_ids[0]) == 24
    ids, labels = short.input_ids[0], short.labels[0]
    assert ids[0] == tok.bos_token_id  # BOS kept, the prompt cut from the left
    last_reply = tok("1 2 3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids[-len(last_reply) :] == last_reply and labels[-len(last_reply) :] == last_reply


# ---------------------------------------------------------------- noise


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    rows = []
    for i in range(n):
        messages = [turn("system", "You are kind.")] if i % 2 else []
        for _ in range(rng.randint(1, 3)):
            messages += [
                turn("user", word_sentences(rng, 1)),
                turn("assistant", word_sentences(rng, rng.randint(1, 3))),
            ]
        rows.append({"id": f"chat-{i:03d}", "messages": messages})
    return rows


@pytest.mark.parametrize("weights", [None, "response_swap=1", "grammar=0.5,quality=0.5"])
def test_noise_edits_only_the_last_assistant_or_user_turn(weights):
    raw = chat_rows(80)
    before = copy.deepcopy(raw)
    result = inject_noise(raw, task="instruction", ratio=0.5, weights=weights, seed=4)
    assert raw == before
    assert result.summary["actual_noisy"] == 40
    fields = set()
    for row, new, rec in zip(raw, result.rows, result.manifest, strict=True):
        old_turns, new_turns = row["messages"], new["messages"]
        assert len(old_turns) == len(new_turns)
        changed = [i for i, (a, b) in enumerate(zip(old_turns, new_turns, strict=True)) if a != b]
        if not rec["is_noisy"]:
            assert changed == []
            continue
        fields.add(rec["field"])
        last_user = max(i for i, t in enumerate(old_turns) if t["role"] == "user")
        position = len(old_turns) - 1 if rec["field"] == "output" else last_user
        assert changed == [position]
        assert old_turns[position]["content"] == rec["original"]
        assert new_turns[position]["content"] == rec["noisy"] != rec["original"]
        assert new_turns[position]["role"] == old_turns[position]["role"]
        assert new["output"] == new_turns[-1]["content"]
        assert new["instruction"] == new_turns[last_user]["content"]
        assert "input" not in new
    assert fields <= {"output", "instruction"}
    if weights == "response_swap=1":
        assert fields == {"output"}
        replies = {r["messages"][-1]["content"] for r in raw}
        assert all(rec["noisy"] in replies for rec in result.manifest if rec["is_noisy"])
    if weights is None:
        assert fields == {"output", "instruction"}


# ---------------------------------------------------------------- fine-tuning


def test_tiny_llama_finetunes_on_chat_rows(tmp_path):
    loaded = load_model("tiny-llama")
    colors = ["red", "blue", "green", "red", "blue", "green", "red", "blue"]
    rows = [
        {
            "id": f"r{i}",
            "messages": [
                turn("system", "Answer with one word."),
                turn("user", f"Name the color of item {i}."),
                turn("assistant", color),
                turn("user", "And again?"),
                turn("assistant", color),
            ],
        }
        for i, color in enumerate(colors)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = encode_rows(rows, loaded.tokenizer, task="causal")
        before = per_example_loss(loaded.model, enc)
        config = FinetuneConfig(epochs=3, lr=5e-3, batch_size=4, lora=LoraSpec(r=4))
        result = finetune(loaded, rows, rows[:2], config, tmp_path / "ft", progress=False)
        after = per_example_loss(loaded.model, enc)
    train_losses = [c.train_loss for c in result.checkpoints]
    assert all(math.isfinite(x) for x in [*train_losses, *before, *after])
    assert train_losses[-1] < train_losses[0]
    assert after.mean() < before.mean() - 0.5


# ---------------------------------------------------------------- errors

BAD = [
    ([turn("user", "Hi."), turn("user", "Hello?")], r"row 'bad' .*no assistant turn.*add the reply"),
    ([turn("user", "Hi."), turn("robot", "Beep.")], r"row 'bad' .*unknown role 'robot'.*use one of"),
    (
        "user: Hi. assistant: Hello.",
        r"row 'bad' .*'messages' of type str, not a list.*store it as a JSON list",
    ),
    (
        [turn("user", "Hi."), turn("assistant", "Hello."), turn("user", "Bye.")],
        r"row 'bad' .*ends with a user",
    ),
    (
        [turn("assistant", "Hello."), turn("user", "Hi."), turn("assistant", "Yes.")],
        r"row 'bad' .*first non-system",
    ),
]


@pytest.mark.parametrize(("messages", "match"), BAD)
def test_malformed_messages_raise_one_line_naming_row_and_fix(tmp_path, tok, messages, match):
    records = [CHATS[1], {"id": "bad", "messages": messages}]
    write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(InfscopeError, match=match) as info:
        load_rows(tmp_path / "bad.jsonl")
    assert "\n" not in str(info.value) and "bad.jsonl" in str(info.value)
    with pytest.raises(InfscopeError, match=match):
        encode_rows(records, tok, task="causal")
    with pytest.raises(InfscopeError, match=match):
        inject_noise(records, task="instruction", ratio=0.5, seed=0)


def test_other_chat_errors(tmp_path, tok):
    write_jsonl(tmp_path / "input.jsonl", [{**CHATS[1], "input": "context"}])
    with pytest.raises(InfscopeError, match="row 'c2'.*non-empty 'input'.*put the context in the user turn"):
        load_rows(tmp_path / "input.jsonl")
    write_jsonl(tmp_path / "chat.jsonl", CHATS)
    with pytest.raises(InfscopeError, match="use --task instruction"):
        load_rows(tmp_path / "chat.jsonl", task="classification")
    empty = {"id": "e", "messages": [turn("user", "Hi."), turn("assistant", "  ")]}
    with pytest.raises(InfscopeError, match="rows e have an empty last assistant turn"):
        encode_rows([empty], tok, task="causal")
