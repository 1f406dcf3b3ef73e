"""Experts for the repair action: prompts, the OpenAI-compatible expert against a server started here
(on 127.0.0.1, a few requests, stopped by the test), spec parsing and the local Hugging Face expert."""

from __future__ import annotations

import json
import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from infscope.actions.experts import (
    BUDGET_EXHAUSTED,
    DEFAULT_SYSTEM,
    EMPTY_ANSWER,
    GARBAGE,
    TIMEOUT,
    Expert,
    LocalExpert,
    OpenAIExpert,
    RepairResult,
    expert_from_spec,
    expert_messages,
)
from infscope.errors import InfscopeError

MODEL = "fake-expert"


class FakeServer:
    """A minimal OpenAI-compatible server: GET /v1/models and POST /v1/chat/completions.

    The answer is ``"fixed: " + first line of the last user message``. Words in that line change the
    reply: ``SLOW`` sleeps ``delay`` seconds first, ``GARBAGE`` sends broken JSON, ``EMPTY`` an empty
    content, ``NULL`` a null content, ``NUMBER`` a number, ``NOCHOICES`` an empty choice list.
    Every request body is kept, so tests count what was sent.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.chat_bodies: list[dict] = []
        self.model_pings = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    with owner.lock:
                        owner.model_pings += 1
                    self._send(
                        200,
                        json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode(),
                    )
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                with owner.lock:
                    owner.chat_bodies.append(body)
                if body.get("model") != MODEL:
                    self._send(404, json.dumps({"error": {"message": "model not found"}}).encode())
                    return
                line = body["messages"][-1]["content"].splitlines()[0]
                if "SLOW" in line:
                    time.sleep(owner.delay)
                if "GARBAGE" in line:
                    self._send(200, b'{"choices": [{"message": {"content": "half')
                    return
                content: object = f"fixed: {line}"
                if "EMPTY" in line:
                    content = "   "
                elif "NULL" in line:
                    content = None
                elif "NUMBER" in line:
                    content = 42
                choices = (
                    []
                    if "NOCHOICES" in line
                    else [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": content},
                        }
                    ]
                )
                reply = {
                    "id": "c1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": MODEL,
                    "choices": choices,
                }
                self._send(200, json.dumps(reply).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    with FakeServer(delay=1.5) as srv:
        yield srv


def rows_of(*instructions: str) -> list[dict]:
    return [
        {"id": f"r{i}", "instruction": text, "input": "", "output": f"flagged answer {i}"}
        for i, text in enumerate(instructions)
    ]


def expert_at(server: FakeServer, tmp_path, **kw) -> OpenAIExpert:
    return OpenAIExpert(server.url, MODEL, cache_dir=tmp_path / "cache", **kw)


# -- prompts --------------------------------------------------------------------------------------


def test_messages_alpaca_hide_the_flagged_response_by_default():
    row = {"id": "a", "instruction": "Add 2 and 3.", "input": "numbers: 2, 3", "output": "7"}
    assert expert_messages(row) == [
        {"role": "system", "content": DEFAULT_SYSTEM},
        {"role": "user", "content": "Add 2 and 3.\n\nInput:\nnumbers: 2, 3"},
    ]
    shown = expert_messages(row, show_original=True)
    assert shown[-1]["content"] == (
        "Add 2 and 3.\n\nInput:\nnumbers: 2, 3\n\nA response that may be wrong:\n7\n\n"
        "Write a correct response to the instruction."
    )
    no_input = expert_messages({"id": "b", "instruction": "Say hi.", "input": "", "output": "x"})
    assert no_input[-1]["content"] == "Say hi."


def test_messages_chat_keep_earlier_turns_and_the_views():
    row = {
        "id": "c",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "old question"},
            {"role": "assistant", "content": "wrong"},
        ],
        "instruction": "Name another colour.",  # the view wins over the stored turn
        "output": "wrong",
    }
    assert expert_messages(row) == [
        {"role": "system", "content": DEFAULT_SYSTEM + "\n\nBe brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Name another colour."},
    ]


# -- OpenAI-compatible expert ---------------------------------------------------------------------


def test_openai_expert_sends_the_prompt_and_parses_the_answer(server, tmp_path):
    rows = rows_of("Fix the grammar: he go home.", "Add 2 and 3.")
    expert = expert_at(server, tmp_path)
    assert isinstance(expert, Expert)
    results = expert.rewrite(rows)
    assert results == [
        RepairResult("r0", text="fixed: Fix the grammar: he go home."),
        RepairResult("r1", text="fixed: Add 2 and 3."),
    ]
    assert [b["model"] for b in server.chat_bodies] == [MODEL, MODEL]
    assert [b["temperature"] for b in server.chat_bodies] == [0, 0]
    assert server.chat_bodies[0]["messages"] == expert_messages(rows[0])
    assert "flagged answer" not in json.dumps(server.chat_bodies)
    assert server.model_pings == 1  # one check before the first request
    assert expert.requests_sent == 2


def test_openai_cache_second_run_sends_nothing(server, tmp_path):
    rows = rows_of("Add 2 and 3.", "Name a colour.", "Add 2 and 3.")
    first = expert_at(server, tmp_path).rewrite(rows)
    assert len(server.chat_bodies) == 2  # the duplicate instruction is answered from the cache
    assert [r.cached for r in first] == [False, False, True]
    again = expert_at(server, tmp_path).rewrite(rows)
    assert len(server.chat_bodies) == 2 and server.model_pings == 1
    assert [r.text for r in again] == [r.text for r in first] and all(r.cached for r in again)
    # another model or another prompt option is another cache entry
    expert_at(server, tmp_path, show_original=True).rewrite(rows[:1])
    assert len(server.chat_bodies) == 3


def test_openai_budget(server, tmp_path):
    with pytest.raises(InfscopeError, match="budget"):
        expert_at(server, tmp_path, budget=0)
    assert server.chat_bodies == [] and server.model_pings == 0
    rows = rows_of("one", "two", "three", "four")
    results = expert_at(server, tmp_path, budget=2).rewrite(rows)
    assert len(server.chat_bodies) == 2
    assert [r.text for r in results] == ["fixed: one", "fixed: two", None, None]
    assert [r.error for r in results] == [None, None, BUDGET_EXHAUSTED, BUDGET_EXHAUSTED]
    # nothing lost: a rerun with budget for the rest sends only the two missing rows
    resumed = expert_at(server, tmp_path, budget=2).rewrite(rows)
    assert len(server.chat_bodies) == 4
    assert [r.text for r in resumed] == ["fixed: one", "fixed: two", "fixed: three", "fixed: four"]


def test_openai_timeout_is_a_row_error_and_nothing_is_lost(server, tmp_path):
    rows = rows_of("first", "SLOW one", "last")
    expert = expert_at(server, tmp_path, timeout=0.3, max_retries=1)
    start = time.monotonic()
    results = expert.rewrite(rows)
    assert time.monotonic() - start < 5
    assert [r.error for r in results] == [None, TIMEOUT, None]
    assert [r.text for r in results] == ["fixed: first", None, "fixed: last"]
    slow_sent = [b for b in server.chat_bodies if "SLOW" in b["messages"][-1]["content"]]
    assert len(slow_sent) == 2  # first try + one retry
    assert expert.requests_sent == 4
    # timeouts are not cached: a rerun asks only for the slow row again
    server.delay = 0.0
    again = expert_at(server, tmp_path, timeout=0.3, max_retries=1).rewrite(rows)
    assert len(server.chat_bodies) == 5
    assert [r.text for r in again] == ["fixed: first", "fixed: SLOW one", "fixed: last"]


def test_openai_unusable_answers_mark_their_rows(server, tmp_path):
    rows = rows_of("GARBAGE", "EMPTY", "NULL", "NUMBER", "NOCHOICES", "fine")
    results = expert_at(server, tmp_path).rewrite(rows)
    assert [r.error for r in results] == [GARBAGE, EMPTY_ANSWER, EMPTY_ANSWER, GARBAGE, GARBAGE, None]
    assert [r.ok for r in results] == [False] * 5 + [True]
    assert results[-1].text == "fixed: fine"
    # failures are not cached: asked again on a rerun, the good row is not
    expert_at(server, tmp_path).rewrite(rows)
    assert len(server.chat_bodies) == 6 + 5


def test_openai_unknown_model_is_one_line_error(server, tmp_path):
    expert = OpenAIExpert(server.url, "no-such-model", cache_dir=tmp_path)
    with pytest.raises(InfscopeError) as info:
        expert.rewrite(rows_of("hello"))
    message = str(info.value)
    assert "\n" not in message and "no-such-model" in message and MODEL in message


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_openai_closed_port_is_one_line_error_at_first_request(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    expert = OpenAIExpert(url, MODEL, cache_dir=tmp_path, timeout=2)  # construction sends nothing
    with pytest.raises(InfscopeError) as info:
        expert.rewrite(rows_of("hello"))
    message = str(info.value)
    assert "\n" not in message and url in message and "start the server or fix --expert-url" in message
    assert expert.requests_sent == 0
    with pytest.raises(InfscopeError, match="start the server"):
        expert.check()


def test_openai_api_key_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert OpenAIExpert("http://127.0.0.1:1/v1", MODEL, cache_dir=tmp_path).api_key == "none"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert OpenAIExpert("http://127.0.0.1:1/v1", MODEL, cache_dir=tmp_path).api_key == "sk-test"
    assert OpenAIExpert("http://127.0.0.1:1/v1", MODEL, api_key="k", cache_dir=tmp_path).api_key == "k"


def test_cache_key_depends_on_every_input(tmp_path):
    base = OpenAIExpert("http://127.0.0.1:1/v1", MODEL, cache_dir=tmp_path)
    msgs = expert_messages(rows_of("x")[0])
    key = base.cache_key(msgs)
    assert key == OpenAIExpert("http://127.0.0.1:1/v1/", MODEL, cache_dir=tmp_path / "o").cache_key(msgs)
    others = [
        OpenAIExpert("http://127.0.0.1:2/v1", MODEL, cache_dir=tmp_path).cache_key(msgs),
        OpenAIExpert("http://127.0.0.1:1/v1", "other", cache_dir=tmp_path).cache_key(msgs),
        OpenAIExpert("http://127.0.0.1:1/v1", MODEL, cache_dir=tmp_path, max_tokens=7).cache_key(msgs),
        base.cache_key(expert_messages(rows_of("y")[0])),
    ]
    assert len({key, *others}) == 5


# -- specs ----------------------------------------------------------------------------------------


def test_expert_from_spec():
    local = expert_from_spec("local:tiny-llama", max_new_tokens=5)
    assert isinstance(local, LocalExpert) and local.model_name == "tiny-llama" and local.max_new_tokens == 5
    assert expert_from_spec("local").model_name == "smollm2-135m"
    remote = expert_from_spec("openai:http://127.0.0.1:8000/v1#qwen2.5:0.5b", budget=3)
    assert isinstance(remote, OpenAIExpert)
    assert (remote.base_url, remote.model, remote.budget) == ("http://127.0.0.1:8000/v1", "qwen2.5:0.5b", 3)
    assert remote.spec == "openai:http://127.0.0.1:8000/v1#qwen2.5:0.5b"
    assert expert_from_spec(local.spec).model_name == "tiny-llama"
    for bad, words in [
        ("gpt4", "unknown expert spec"),
        ("remote:http://x/v1#m", "unknown expert spec"),
        ("openai:http://127.0.0.1:8000/v1", "lacks the URL or the model"),
        ("openai:#m", "lacks the URL or the model"),
        ("openai:127.0.0.1:8000/v1#m", r"not an http\(s\) URL"),
    ]:
        with pytest.raises(InfscopeError, match=words) as info:
            expert_from_spec(bad)
        assert "\n" not in str(info.value)


# -- local expert ---------------------------------------------------------------------------------


LOCAL_ROWS = rows_of("Fix the grammar: she go to school.", "Add 2 and 3.", "Name a colour.") + [
    {
        "id": "chat",
        "messages": [
            {"role": "user", "content": "Say yes."},
            {"role": "assistant", "content": "no"},
        ],
    }
]


def spread_tiny(seed: int = 3, **kw) -> LocalExpert:
    """A tiny-llama expert whose weights are redrawn wider (seeded), so greedy answers vary by prompt.

    The built-in's small initialisation answers newlines to everything, which would hide batching bugs.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny-llama has no chat template: infscope's own is used
        expert = LocalExpert("tiny-llama", seed=seed, **kw)
        expert.check()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in expert._load().model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return expert


@pytest.fixture(scope="module")
def tiny_expert():
    return spread_tiny(max_new_tokens=6, batch_size=3)


def _one_by_one(expert: LocalExpert, rows: list[dict]) -> list[RepairResult]:
    """Reference: each row alone, no padding, straight through the model's greedy ``generate``."""
    loaded = expert._load()
    out = []
    for row, prompt in zip(rows, expert.prompts(rows), strict=True):
        ids = loaded.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        gen = loaded.model.generate(
            input_ids=ids,
            attention_mask=ids.new_ones(ids.shape),
            max_new_tokens=expert.max_new_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
        text = loaded.tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
        out.append(
            RepairResult(row["id"], text=text) if text else RepairResult(row["id"], error=EMPTY_ANSWER)
        )
    return out


def test_local_expert_batched_equals_one_by_one(tiny_expert):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = tiny_expert.rewrite(LOCAL_ROWS)
        reference = _one_by_one(tiny_expert, LOCAL_ROWS)
    assert [r.id for r in batched] == ["r0", "r1", "r2", "chat"]
    assert batched == reference
    assert all(r.ok and isinstance(r.text, str) for r in batched)
    assert len({r.text for r in batched}) == len(batched)  # answers depend on the prompt


def test_local_expert_prompt_has_instruction_not_flagged_answer(tiny_expert):
    prompt = tiny_expert.prompts(LOCAL_ROWS[:1])[0]
    assert "she go to school" in prompt and DEFAULT_SYSTEM in prompt and "flagged answer" not in prompt
    assert prompt.rstrip().endswith("### Assistant:")


def test_local_expert_deterministic_for_a_seed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [
            spread_tiny(seed, max_new_tokens=6, batch_size=2, temperature=1.0).rewrite(LOCAL_ROWS)
            for seed in (5, 5, 6)
        ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # sampling really follows the seed


def test_local_expert_prompt_too_long_is_a_row_error(tiny_expert):
    long_row = rows_of("word " * 3000)[0]
    results = tiny_expert.rewrite([long_row, LOCAL_ROWS[1]])
    assert results[0].error == "prompt too long" and results[0].text is None
    assert results[1] == tiny_expert.rewrite([LOCAL_ROWS[1]])[0]


def test_local_expert_bad_arguments():
    with pytest.raises(InfscopeError, match="max_new_tokens"):
        LocalExpert("tiny-llama", max_new_tokens=0)
    with pytest.raises(InfscopeError, match="unknown model"):
        LocalExpert("no-such-model-xyz").check()


@pytest.mark.slow
def test_smollm2_rewrites_two_rows():
    rows = rows_of("What is the capital of France?", "Fix the grammar: she go to school yesterday.")
    results = LocalExpert("smollm2-135m", max_new_tokens=32, batch_size=2).rewrite(rows)
    assert [r.id for r in results] == ["r0", "r1"]
    assert all(r.ok and r.text.strip() for r in results)
    assert "Paris" in results[0].text
