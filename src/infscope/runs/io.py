"""Reading and writing files: atomic writes, JSON and JSONL, fingerprints.

The package's JSON and JSONL helpers (record files, manifests, row files and metadata go through
them; modules still call ``json.dumps`` for strings they embed elsewhere, such as a fingerprint's
canonical form). Every file is written to a temporary sibling and renamed, so an interrupted write
never leaves a half-written file behind. JSON is written indented with sorted keys, so equal content
gives equal bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from infscope.errors import InfscopeError


def json_default(value: Any) -> Any:
    """Make numpy scalars/arrays and paths JSON-serialisable (used by every JSON writer)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"value of type {type(value).__name__} is not JSON serialisable")


def json_line(obj: Any) -> str:
    """One compact JSON line (no newline), unicode kept, numpy values converted."""
    return json.dumps(obj, ensure_ascii=False, default=json_default)


def parse_jsonl(text: str, source: str, fix: str = "fix that line") -> list[dict[str, Any]]:
    """Objects of JSONL ``text``; a bad line raises an error naming ``source``, the line number and ``fix``."""
    records: list[dict[str, Any]] = []
    # split on "\n" only: str.splitlines would also break lines at U+2028 etc. inside JSON strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InfscopeError(f"malformed JSON on line {number} of {source} ({exc.msg}); {fix}") from None
        if not isinstance(record, dict):
            raise InfscopeError(
                f"line {number} of {source} is a JSON {type(record).__name__}, not an object; {fix}"
            )
        records.append(record)
    return records


def read_jsonl(path: str | os.PathLike, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """Objects of a JSONL file (an empty list for an absent file when ``missing_ok``)."""
    target = Path(path)
    if missing_ok and not target.exists():
        return []
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InfscopeError(f"{target} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InfscopeError(f"cannot read {target} ({exc}); check the path and permissions") from None
    return parse_jsonl(text, str(target), "fix or regenerate the file")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value of a file, with a one-line error for a missing or malformed file."""
    target = Path(path)
    try:
        return json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InfscopeError(f"{target} not found; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InfscopeError(f"cannot read {target} ({exc}); fix or regenerate it") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes owner-only files; give results the usual umask mode
            os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for equal content)."""
    return atomic_write_text(
        path,
        json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=json_lenient_default) + "\n",
    )


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be written there."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-", delete=True):
            pass
    except OSError as exc:
        raise InfscopeError(
            f"output directory {directory} is not writable ({exc.strerror or exc}); pass a writable --out"
        ) from None
    return directory


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits), used to record which source was read."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """Write one JSON object per line, atomically."""
    return atomic_write_text(path, "".join(json_line(record) + "\n" for record in records))


def json_lenient_default(value: Any) -> Any:
    """Like :func:`json_default`, but anything else becomes its ``str`` (for free-form metadata)."""
    try:
        return json_default(value)
    except TypeError:
        return str(value)
