"""Run directories, atomic writes and per-stage measurement.

A run directory holds every artifact of one experiment plus ``run.json``: the arguments it was
made with, package versions, and per-stage time and peak memory. Reusing a directory with other
arguments is refused unless the caller asks to overwrite, so results never mix silently.
Every file is written to a temporary sibling and renamed, so an interrupted write never leaves
a half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infscope.errors import InfscopeError

RUN_FILE = "run.json"


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
        path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
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


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape results, for the record in run.json and metadata."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("infscope", "torch", "transformers", "peft", "datasets", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Samples resident memory in a background thread to report a stage's own peak (bytes).

    ``ru_maxrss`` only gives the peak of the whole process so far; a sampler gives the peak while
    one stage runs. On CUDA the allocator's own peak is read as well.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_cuda = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, _current_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak_rss = _current_rss_bytes()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, _current_rss_bytes())
        try:
            import torch

            if torch.cuda.is_available():
                self.peak_cuda = int(torch.cuda.max_memory_allocated())
        except ImportError:  # pragma: no cover
            pass


@dataclass
class StageRecord:
    """Time and peak memory of one pipeline stage."""

    name: str
    seconds: float
    peak_rss_mb: float
    peak_cuda_mb: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def changed_args(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ; a key one side lacks counts as ``None`` there.

    Options added in a later version default to ``None``, so runs recorded before they existed
    still match the same command.
    """
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def same_args(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when two recorded argument sets describe the same run (see :func:`changed_args`)."""
    return not changed_args(old, new)


class RunDir:
    """A run directory guarded by the arguments that made it.

    ``RunDir(path, args)`` creates the directory and ``run.json``. Opening an existing run with
    different ``args`` raises :class:`InfscopeError` unless ``overwrite=True``, which clears it.
    Stages are recorded with :meth:`stage`; :meth:`done` tells whether a stage already finished
    so interrupted runs resume where they stopped.
    """

    def __init__(self, path: str | os.PathLike, args: dict[str, Any], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.args = json.loads(json.dumps(args, sort_keys=True, default=str))
        run_file = self.path / RUN_FILE
        if run_file.exists():
            record = json.loads(run_file.read_text())
            if not same_args(record.get("args") or {}, self.args):
                if not overwrite:
                    changed = changed_args(record.get("args") or {}, self.args)
                    raise InfscopeError(
                        f"run directory {self.path} was made with other arguments ({', '.join(changed)} differ); "
                        "pass --overwrite to replace it or choose another --out"
                    )
                shutil.rmtree(self.path)
                record = None
        else:
            record = None
        if record is None:
            ensure_writable_dir(self.path)
            record = {
                "args": self.args,
                "versions": package_versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "stages": {},
            }
            atomic_write_json(run_file, record)
        self.record = record

    def file(self, *parts: str) -> Path:
        """Path of an artifact inside the run directory."""
        return self.path.joinpath(*parts)

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished in an earlier call."""
        return stage in self.record["stages"]

    def stage_info(self, stage: str) -> dict[str, Any]:
        """The info a finished stage recorded (empty if it did not finish)."""
        return self.record["stages"].get(stage, {}).get("info", {})

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        """Time a stage and record its peak memory; the record is saved only if the stage succeeds."""
        rec = StageRecord(name=name, seconds=0.0, peak_rss_mb=0.0)
        start = time.perf_counter()
        with PeakMemory() as mem:
            yield rec
        rec.seconds = time.perf_counter() - start
        rec.peak_rss_mb = mem.peak_rss / 2**20
        rec.peak_cuda_mb = mem.peak_cuda / 2**20
        self.record["stages"][name] = {
            "seconds": round(rec.seconds, 3),
            "peak_rss_mb": round(rec.peak_rss_mb, 1),
            "peak_cuda_mb": round(rec.peak_cuda_mb, 1),
            "info": rec.info,
        }
        atomic_write_json(self.path / RUN_FILE, self.record)

    def stages(self) -> dict[str, dict[str, Any]]:
        """All finished stages with their time, peak memory and info."""
        return dict(self.record["stages"])
