"""The audit log of a cleaning run, and ``--undo``: restore the input file byte for byte.

The log is JSONL. Its first line is a header: the input's path, format, SHA-256 fingerprint and
size, the input's bytes themselves (zlib-compressed, base64), the cleaned file's fingerprint, the
method, action and kept round. Every further line is one :class:`~infscope.actions.changes.Change`
of the kept rounds (``kind: change``). Undo needs nothing but the log: it decompresses the bytes,
checks them against the recorded fingerprint, and (when given the data file it is asked to undo)
checks that file is the cleaned output (or the input) this log belongs to.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from infscope.actions.changes import Change
from infscope.errors import InfscopeError
from infscope.runs import atomic_write_bytes, atomic_write_text, file_fingerprint, json_line, read_jsonl

LOG_VERSION = 1


def sha256_file(path: str | os.PathLike) -> str:
    """Full SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def audit_header(input_path: Path, input_format: str, cleaned_path: Path, **info: Any) -> dict[str, Any]:
    """The header record: what undo needs (input bytes and fingerprints) plus ``info`` (method, action...)."""
    data = input_path.read_bytes()
    return {
        "kind": "header",
        "version": LOG_VERSION,
        "input": str(input_path),
        "input_format": input_format,
        "input_sha256": hashlib.sha256(data).hexdigest(),
        "input_fingerprint": file_fingerprint(input_path),
        "input_size": len(data),
        "input_bytes": base64.b64encode(zlib.compress(data, 9)).decode("ascii"),
        "cleaned": str(cleaned_path),
        "cleaned_sha256": sha256_file(cleaned_path),
        **info,
    }


def write_audit(path: str | os.PathLike, header: Mapping[str, Any], changes: Iterable[Change]) -> Path:
    """Write the header and one line per change, atomically."""
    lines = [json_line(dict(header))] + [json_line(c.to_dict()) for c in changes]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_audit(path: str | os.PathLike) -> tuple[dict[str, Any], list[Change]]:
    """The header and changes of an audit log; one-line errors for files that are not one."""
    records = read_jsonl(path)
    if not records or records[0].get("kind") != "header" or "input_bytes" not in records[0]:
        raise InfscopeError(
            f"{path} is not an infscope clean audit log (no header line); pass the audit.jsonl of a clean run"
        )
    return records[0], [Change.from_dict(r) for r in records[1:] if r.get("kind") == "change"]


def original_bytes(header: Mapping[str, Any], source: str = "the audit log") -> bytes:
    """The input's bytes stored in the header, checked against its recorded SHA-256."""
    try:
        data = zlib.decompress(base64.b64decode(header["input_bytes"], validate=True))
    except (ValueError, zlib.error, TypeError, KeyError):
        raise InfscopeError(f"{source} holds damaged input bytes; it cannot restore the input") from None
    if hashlib.sha256(data).hexdigest() != header.get("input_sha256"):
        raise InfscopeError(
            f"the input bytes in {source} do not match its recorded fingerprint; the log was edited or damaged"
        )
    return data


def undo(log: str | os.PathLike, out: str | os.PathLike, data: str | os.PathLike | None = None) -> Path:
    """Write the input a clean run started from to ``out``, byte for byte (atomically).

    ``data``, when given, must be the cleaned file this log describes (or the original input):
    a file with any other content is refused, so a log is never applied to the wrong data.
    """
    header, _ = read_audit(log)
    restored = original_bytes(header, str(log))
    if data is not None:
        target = Path(data)
        if not target.is_file():
            raise InfscopeError(f"{target} not found; pass the cleaned file the audit log belongs to")
        digest = sha256_file(target)
        if digest not in (header.get("cleaned_sha256"), header.get("input_sha256")):
            raise InfscopeError(
                f"audit log {log} does not match {target} (its fingerprint {digest[:16]} is neither the cleaned "
                f"output {str(header.get('cleaned_sha256'))[:16]} nor the input {str(header['input_sha256'])[:16]}); "
                "pass the log written with that file"
            )
    return atomic_write_bytes(out, restored)
