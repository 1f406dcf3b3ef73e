"""Expert models for the ``repair`` action: write a correct response for a flagged instruction row.

An *expert* takes instruction rows (Alpaca ``instruction``/``input``/``output`` or chat ``messages``)
and answers each instruction afresh; the repair action then swaps the answer in for the flagged
response. Two experts share one protocol (:class:`Expert`) and one prompt (:func:`expert_messages`):

* :class:`LocalExpert`: a Hugging Face chat model loaded like every other infscope model
  (:func:`infscope.models.registry.load_model`), greedy by default, batched with left padding.
* :class:`OpenAIExpert`: any OpenAI-compatible server (vLLM, llama.cpp server, Ollama) through the
  official ``openai`` client, with a disk cache (a rerun sends nothing twice), a request budget and
  per-row errors for timeouts and unusable answers, so a long repair never loses finished rows.

By default the expert does not see the flagged response (a wrong answer would anchor it);
``show_original=True`` adds it, marked as a response that may be wrong. Pick an expert from a
command-line string with :func:`expert_from_spec`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

import torch

from infscope.data.formatting import chat_messages, is_chat_row, prompt_response_view
from infscope.errors import InfscopeError
from infscope.models.cache import cache_root
from infscope.models.encode import chat_renderer
from infscope.models.registry import load_model
from infscope.runs import atomic_write_json

DEFAULT_SYSTEM = (
    "You are a careful expert. Write a correct, complete and concise response to the user's "
    "instruction. Reply with the response only, without any preamble."
)
ORIGINAL_HEADER = "A response that may be wrong:"
INPUT_HEADER = "Input:"

#: Per-row error strings (a row with an error keeps its flagged response).
BUDGET_EXHAUSTED = "budget exhausted"
TIMEOUT = "timeout"
EMPTY_ANSWER = "empty answer"
GARBAGE = "garbage"
PROMPT_TOO_LONG = "prompt too long"

SPEC_HELP = "use local:MODEL (e.g. local:smollm2-135m) or openai:http://HOST:PORT/v1#MODEL"


@dataclass(frozen=True)
class RepairResult:
    """The expert's answer for one row: ``text`` when it answered, else ``error`` says why not.

    ``cached`` is true when the answer came from the expert's disk cache (nothing was sent).
    """

    id: str
    text: str | None = None
    error: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        """Whether the expert produced a usable response."""
        return self.text is not None and self.error is None


@runtime_checkable
class Expert(Protocol):
    """Writes a correct response for each instruction row, one :class:`RepairResult` per row, in order.

    ``spec`` is the string :func:`expert_from_spec` accepts for this expert (kept in audit logs).
    """

    spec: str

    def rewrite(self, rows: Sequence[Mapping[str, Any]]) -> list[RepairResult]:
        """Answer each row's instruction; never raises for one bad row (its result carries ``error``)."""
        ...


def _row_id(row: Mapping[str, Any], position: int) -> str:
    if row.get("id") is None:
        raise InfscopeError(
            f"row {position} has no id; load rows through infscope's loaders so that every row has one"
        )
    return str(row["id"])


def _chat_context(row: Mapping[str, Any]) -> tuple[list[str], list[dict[str, str]]]:
    """``(system texts, earlier turns)`` of a chat row: what comes before its last user turn."""
    turns = chat_messages(row)
    last_user = max(i for i in range(len(turns) - 1) if turns[i]["role"] == "user")
    systems = [t["content"] for t in turns[:last_user] if t["role"] == "system" and t["content"].strip()]
    earlier = [dict(t) for t in turns[:last_user] if t["role"] != "system"]
    return systems, earlier


def expert_messages(
    row: Mapping[str, Any], *, show_original: bool = False, system: str = DEFAULT_SYSTEM
) -> list[dict[str, str]]:
    """The chat messages that ask an expert for a correct response to ``row``'s instruction.

    A system message (``system``, followed by the row's own system turns for chat rows), then the
    earlier turns of a chat row, then one user message: the instruction, the Alpaca ``input`` under
    an ``Input:`` header when non-empty, and with ``show_original`` the flagged response under
    :data:`ORIGINAL_HEADER`.
    """
    instruction, response = prompt_response_view(row)
    systems: list[str] = []
    earlier: list[dict[str, str]] = []
    parts = [instruction]
    if is_chat_row(row):
        systems, earlier = _chat_context(row)
    else:
        extra = row.get("input")
        if extra is not None and str(extra).strip():
            parts.append(f"{INPUT_HEADER}\n{extra}")
    if show_original:
        parts.append(f"{ORIGINAL_HEADER}\n{response}")
        parts.append("Write a correct response to the instruction.")
    system_text = "\n\n".join([system, *systems])
    return [
        {"role": "system", "content": system_text},
        *earlier,
        {"role": "user", "content": "\n\n".join(parts)},
    ]


class LocalExpert:
    """A local Hugging Face chat model as the expert (default: the built-in SmolLM2-135M-Instruct).

    The model loads on first use (:meth:`check` loads it at once). Rows are rendered with the
    tokenizer's chat template (infscope's built-in template when it has none), sorted by length,
    left-padded into batches of ``batch_size`` and decoded greedily when ``temperature == 0``, so the
    answers do not depend on the batching; with ``temperature > 0`` each batch samples from a
    generator seeded with ``seed``. Answers are the generated tokens only (the prompt is cut off).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        max_new_tokens: int = 256,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        temperature: float = 0.0,
        seed: int = 0,
        show_original: bool = False,
        system: str = DEFAULT_SYSTEM,
    ) -> None:
        if int(max_new_tokens) < 1:
            raise InfscopeError(
                f"max_new_tokens must be at least 1, got {max_new_tokens}; pass a positive count"
            )
        if int(batch_size) < 1:
            raise InfscopeError(f"batch_size must be at least 1, got {batch_size}; pass a positive size")
        if float(temperature) < 0:
            raise InfscopeError(f"temperature must be >= 0, got {temperature}; pass 0 for greedy decoding")
        self.model_name = str(model)
        self.max_new_tokens = int(max_new_tokens)
        self.device = device
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.show_original = bool(show_original)
        self.system = system
        self.spec = f"local:{self.model_name}"
        self._loaded: Any = None

    def check(self) -> None:
        """Load the model now (a bad name or path fails here with a one-line error)."""
        self._load()

    def _load(self) -> Any:
        if self._loaded is None:
            self._loaded = load_model(
                self.model_name, task="causal", device=self.device, dtype=self.dtype, seed=self.seed
            )
        return self._loaded

    def prompts(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """The rendered prompt text of each row, ending where the assistant's answer starts."""
        render = chat_renderer(self._load().tokenizer)
        return [
            render(expert_messages(r, show_original=self.show_original, system=self.system), True)
            for r in rows
        ]

    def _context_limit(self) -> int | None:
        config = self._load().model.config
        limit = getattr(config, "max_position_embeddings", None)
        return int(limit) if limit else None

    def _generate(self, batch: list[list[int]]) -> list[str]:
        """Left-pad token lists into one batch, generate, and decode only the new tokens."""
        from transformers import GenerationConfig  # transformers is heavy; the expert loads it lazily

        loaded = self._load()
        tokenizer, model = loaded.tokenizer, loaded.model
        pad_id = int(tokenizer.pad_token_id)
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids) :] = 1
        eos = model.generation_config.eos_token_id
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature if self.temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
        )
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            out = model.generate(
                input_ids=input_ids.to(loaded.device),
                attention_mask=attention.to(loaded.device),
                generation_config=config,
            )
        return tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)

    def rewrite(self, rows: Sequence[Mapping[str, Any]]) -> list[RepairResult]:
        """Answer every row; rows whose prompt leaves no room to answer get ``error="prompt too long"``."""
        ids = [_row_id(r, i) for i, r in enumerate(rows)]
        if not rows:
            return []
        tokenizer = self._load().tokenizer
        encoded = tokenizer(self.prompts(rows), add_special_tokens=False)["input_ids"]
        limit = self._context_limit()
        results: dict[int, RepairResult] = {}
        todo = []
        for i, ids_i in enumerate(encoded):
            if limit is not None and len(ids_i) + self.max_new_tokens > limit:
                results[i] = RepairResult(ids[i], error=PROMPT_TOO_LONG)
            else:
                todo.append(i)
        todo.sort(key=lambda i: (-len(encoded[i]), i))  # similar lengths share a batch: little padding
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for i, text in zip(chunk, self._generate([encoded[i] for i in chunk]), strict=True):
                answer = text.strip()
                results[i] = (
                    RepairResult(ids[i], text=answer) if answer else RepairResult(ids[i], error=EMPTY_ANSWER)
                )
        return [results[i] for i in range(len(rows))]


def _openai_module() -> Any:
    """The ``openai`` package, imported on first use: only the remote expert needs this optional extra."""
    try:
        import openai
    except ImportError:
        raise InfscopeError(
            "the openai expert needs the openai package; install it with `pip install 'infscope[repair]'`"
        ) from None
    return openai


def _check_url(base_url: str) -> str:
    url = str(base_url).strip().rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InfscopeError(
            f"expert URL {base_url!r} is not an http(s) URL; pass the server's API root, e.g. "
            "http://127.0.0.1:8000/v1"
        )
    return url


class OpenAIExpert:
    """An OpenAI-compatible chat endpoint as the expert, with a disk cache and a request budget.

    Each row is one ``chat.completions.create`` call (``temperature=0``, ``max_tokens``). Answers are
    cached under ``cache_dir`` (default ``<infscope cache>/experts``) by the SHA-256 of the base URL,
    model, messages and parameters, so a rerun sends nothing already answered. ``budget`` caps the
    chat requests this expert sends over its lifetime, retries included; once it is spent, the
    remaining uncached rows get ``error="budget exhausted"`` (finished answers are cached, so a rerun
    with more budget resumes). Each timeout is retried ``max_retries`` times, then the row gets
    ``error="timeout"``; an answer that is empty or not text gives ``"empty answer"`` or ``"garbage"``.
    An endpoint that cannot be reached at all fails at the first request with one line naming the
    URL (:meth:`check` pings ``GET /models``, without spending budget).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 2,
        budget: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_tokens: int = 512,
        show_original: bool = False,
        system: str = DEFAULT_SYSTEM,
    ) -> None:
        self.base_url = _check_url(base_url)
        if not str(model).strip():
            raise InfscopeError(
                f"no model name for the expert at {self.base_url}; pass the model the server serves"
            )
        if budget is not None and int(budget) < 1:
            raise InfscopeError(
                f"the expert's request budget is {budget}, so nothing can be sent; pass a budget of at least 1"
            )
        if float(timeout) <= 0:
            raise InfscopeError(f"timeout must be positive, got {timeout}; pass seconds, e.g. 30")
        if int(max_retries) < 0:
            raise InfscopeError(f"max_retries must be >= 0, got {max_retries}; pass 0 to never retry")
        if int(max_tokens) < 1:
            raise InfscopeError(f"max_tokens must be at least 1, got {max_tokens}; pass a positive count")
        self.model = str(model).strip()
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or "none"
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.budget = None if budget is None else int(budget)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "experts"
        self.max_tokens = int(max_tokens)
        self.show_original = bool(show_original)
        self.system = system
        self.spec = f"openai:{self.base_url}#{self.model}"
        self.requests_sent = 0
        self.served_models: list[str] | None = None
        self._client: Any = None
        self._reached = False

    # -- client and endpoint --------------------------------------------------------------------

    def _get_client(self) -> Any:
        if self._client is None:
            openai = _openai_module()
            # Retries are ours (each one counts against the budget), so the client never retries.
            self._client = openai.OpenAI(
                base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0
            )
        return self._client

    def _unreachable(self, exc: Exception) -> InfscopeError:
        cause = str(getattr(exc, "__cause__", None) or exc).strip().splitlines()
        reason = cause[0] if cause else type(exc).__name__
        return InfscopeError(
            f"cannot reach the expert at {self.base_url} ({reason}); start the server or fix --expert-url"
        )

    def check(self) -> list[str] | None:
        """Ping ``GET /models``; return the served model ids (``None`` if the server does not list them).

        Raises a one-line :class:`InfscopeError` when the endpoint cannot be reached or rejects the key.
        """
        openai = _openai_module()
        try:
            page = self._get_client().models.list()
            self.served_models = [str(m.id) for m in getattr(page, "data", None) or []]
        except openai.APITimeoutError:
            raise InfscopeError(
                f"the expert at {self.base_url} did not answer GET /models within {self.timeout:g} s; "
                "start the server, wait until it has loaded, or raise the timeout"
            ) from None
        except openai.APIConnectionError as exc:
            raise self._unreachable(exc) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise self._auth_error(exc) from None
        except (
            openai.APIStatusError,
            openai.APIResponseValidationError,
            ValueError,
            AttributeError,
            TypeError,
        ):
            self.served_models = None  # reached, but it does not list models the usual way
        self._reached = True
        return self.served_models

    def _auth_error(self, exc: Any) -> InfscopeError:
        return InfscopeError(
            f"the expert at {self.base_url} rejected the API key (HTTP {getattr(exc, 'status_code', '?')}); "
            "set OPENAI_API_KEY or pass api_key"
        )

    def _not_found(self) -> InfscopeError:
        served = f" (it serves {', '.join(self.served_models)})" if self.served_models else ""
        return InfscopeError(
            f"the expert at {self.base_url} answered 404 for model {self.model!r}{served}; "
            "fix the model name after '#' and check that the URL is the API root (often ending in /v1)"
        )

    # -- cache ----------------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        return {"temperature": 0.0, "max_tokens": self.max_tokens}

    def cache_key(self, messages: list[dict[str, str]]) -> str:
        """SHA-256 of everything that decides the answer: base URL, model, messages and parameters."""
        payload = {
            "base_url": self.base_url,
            "model": self.model,
            "messages": messages,
            "params": self._params(),
        }
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cached(self, key: str) -> str | None:
        path = self._cache_path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # missing or unreadable: ask again and overwrite
        text = entry.get("text") if isinstance(entry, dict) else None
        return text if isinstance(text, str) and text.strip() else None

    def _store(self, key: str, messages: list[dict[str, str]], text: str) -> None:
        try:
            atomic_write_json(
                self._cache_path(key),
                {"base_url": self.base_url, "model": self.model, "messages": messages, "text": text},
            )
        except OSError as exc:
            raise InfscopeError(
                f"cannot write the expert cache under {self.cache_dir} ({exc.strerror or exc}); "
                "pass a writable cache_dir"
            ) from None

    # -- requests -------------------------------------------------------------------------------

    def _budget_left(self) -> bool:
        return self.budget is None or self.requests_sent < self.budget

    @staticmethod
    def _answer(response: Any) -> tuple[str | None, str | None]:
        """``(text, None)`` from a completion, or ``(None, "empty answer" | "garbage")``."""
        try:
            choices = response.choices
            if not choices:
                return None, GARBAGE
            content = choices[0].message.content
        except (AttributeError, IndexError, KeyError, TypeError):
            return None, GARBAGE
        if content is None:
            return None, EMPTY_ANSWER
        if not isinstance(content, str):
            return None, GARBAGE
        text = content.strip()
        return (text, None) if text else (None, EMPTY_ANSWER)

    def _complete(self, messages: list[dict[str, str]]) -> tuple[str | None, str | None]:
        """Send one row (with retries) and return ``(text, error)``; configuration errors raise."""
        openai = _openai_module()
        client = self._get_client()
        error = TIMEOUT
        for attempt in range(self.max_retries + 1):
            if not self._budget_left():
                return None, BUDGET_EXHAUSTED
            self.requests_sent += 1
            try:
                response = client.chat.completions.create(
                    model=self.model, messages=messages, **self._params()
                )
            except openai.APITimeoutError:
                error = TIMEOUT
                continue
            except openai.APIConnectionError as exc:
                if not self._reached:
                    raise self._unreachable(exc) from None
                error = "connection error"
                time.sleep(min(0.5 * 2**attempt, 4.0))
                continue
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise self._auth_error(exc) from None
            except openai.NotFoundError:
                raise self._not_found() from None
            except openai.APIStatusError as exc:
                self._reached = True
                error = f"http {exc.status_code}"
                if exc.status_code == 429 or exc.status_code >= 500:
                    time.sleep(min(0.5 * 2**attempt, 4.0))
                    continue
                return None, error
            except (openai.APIResponseValidationError, ValueError):
                self._reached = True
                return None, GARBAGE
            self._reached = True
            return self._answer(response)
        return None, error

    def rewrite(self, rows: Sequence[Mapping[str, Any]]) -> list[RepairResult]:
        """Answer every row: cached answers first, then one request per uncached row, in row order."""
        ids = [_row_id(r, i) for i, r in enumerate(rows)]
        results: list[RepairResult] = []
        for row_id, row in zip(ids, rows, strict=True):
            messages = expert_messages(row, show_original=self.show_original, system=self.system)
            key = self.cache_key(messages)
            hit = self._cached(key)
            if hit is not None:
                results.append(RepairResult(row_id, text=hit, cached=True))
                continue
            if not self._budget_left():
                results.append(RepairResult(row_id, error=BUDGET_EXHAUSTED))
                continue
            if not self._reached:
                self.check()
            text, error = self._complete(messages)
            if text is not None:
                self._store(key, messages, text)
            results.append(RepairResult(row_id, text=text, error=error))
        return results


def expert_from_spec(spec: str, **options: Any) -> Expert:
    """The expert a command-line string names: ``local:MODEL`` or ``openai:URL#MODEL``.

    ``MODEL`` of a local expert is a built-in name, checkpoint directory or Hub name (``local`` alone
    means ``smollm2-135m``); ``URL`` is an OpenAI-compatible API root such as
    ``http://127.0.0.1:8000/v1``. ``options`` go to the expert's constructor.
    """
    text = str(spec).strip()
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind == "local":
        model = rest.strip() if sep else ""
        return LocalExpert(model or "smollm2-135m", **options)
    if kind == "openai":
        url, hash_sep, model = rest.strip().rpartition("#")
        if not sep or not hash_sep or not url.strip() or not model.strip():
            raise InfscopeError(
                f"expert spec {text!r} lacks the URL or the model name; write openai:http://HOST:PORT/v1#MODEL"
            )
        return OpenAIExpert(url, model.strip(), **options)
    raise InfscopeError(f"unknown expert spec {text!r}; {SPEC_HELP}")
