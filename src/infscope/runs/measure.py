"""Per-stage measurement: seconds, peak resident memory (and CUDA peak), package versions."""

from __future__ import annotations

import os
import platform
import resource
import threading
from dataclasses import dataclass, field
from typing import Any


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
