"""Hugging Face Hub datasets through ``datasets``, with infscope's own local cache.

A Hub dataset is downloaded once and saved with ``save_to_disk`` under the cache directory
(``~/.cache/infscope/hub``, or ``$INFSCOPE_CACHE``), one folder per name, so later loads are
offline and fast. Offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, or the Hub not
reachable within a few seconds) an uncached name fails at once with one line that says to pass a
local file instead; nothing hangs.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from infscope.data.columns import ColumnMap
from infscope.errors import InfscopeError

DEFAULT_CACHE = Path("~/.cache/infscope/hub")
CONNECT_TIMEOUT = 3.0
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubSpec:
    """Where a known Hub dataset lives and how its columns map onto infscope's."""

    path: str
    config: str | None
    task: str
    columns: ColumnMap


HUB_DATASETS: dict[str, HubSpec] = {
    "tatsu-lab/alpaca": HubSpec("tatsu-lab/alpaca", None, "instruction", ColumnMap()),
    "glue/sst2": HubSpec("nyu-mll/glue", "sst2", "classification", ColumnMap(text="sentence")),
    "glue/mrpc": HubSpec(
        "nyu-mll/glue", "mrpc", "classification", ColumnMap(text="sentence1", text_b="sentence2")
    ),
    "gsm8k": HubSpec(
        "openai/gsm8k", "main", "instruction", ColumnMap(instruction="question", output="answer")
    ),
}


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$INFSCOPE_CACHE``, else ``~/.cache/infscope/hub``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("INFSCOPE_CACHE")
    return Path(env).expanduser() if env else DEFAULT_CACHE.expanduser()


def cache_slug(name: str) -> str:
    """Folder name of a Hub dataset in the cache (``glue/sst2`` -> ``glue__sst2``)."""
    return name.strip("/").replace("/", "__")


def cached_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``name`` is (or would be) saved in the cache."""
    return hub_cache_dir(cache_dir) / cache_slug(name)


def looks_like_hub_name(source: str) -> bool:
    """A known Hub name, or ``owner/name`` without a file suffix."""
    if source in HUB_DATASETS:
        return True
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and "." not in parts[1] and not source.startswith((".", "~"))


def offline_reason() -> str | None:
    """Why the Hub cannot be reached (env flag or failed connection), or ``None`` when it can."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    result: dict[str, bool] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
            result["ok"] = True
        except OSError:
            result["ok"] = False

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT + 0.5)
    return None if result.get("ok") else f"cannot reach {host}"


def _offline_error(name: str, reason: str) -> InfscopeError:
    return InfscopeError(
        f"cannot download Hub dataset {name!r}: offline ({reason}) and not in the cache; "
        "pass a local file instead (JSON, JSONL, CSV, Parquet or a save_to_disk folder)"
    )


def download(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download ``name`` with ``datasets`` and save it (all splits) into the cache, atomically."""
    reason = offline_reason()
    if reason:
        raise _offline_error(name, reason)
    import datasets

    spec = HUB_DATASETS.get(name, HubSpec(name, None, "", ColumnMap()))
    root = hub_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        loaded = datasets.load_dataset(spec.path, spec.config, cache_dir=str(root / "_downloads"))
    except Exception as exc:  # datasets raises many types (network, missing repo, auth)
        raise InfscopeError(
            f"cannot download Hub dataset {name!r} ({type(exc).__name__}: {exc}); "
            "check the name and your connection, or pass a local file instead"
        ) from None
    target = cached_path(name, cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        loaded.save_to_disk(str(tmp / "data"))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "data", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_hub(name: str, split: str, cache_dir: str | os.PathLike | None = None) -> Any:
    """The ``split`` of Hub dataset ``name`` as a ``datasets.Dataset``, from the cache when there."""
    import datasets

    from infscope.data.readers import pick_split

    target = cached_path(name, cache_dir)
    if not target.exists():
        target = download(name, cache_dir)
    try:
        loaded = datasets.load_from_disk(str(target))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise InfscopeError(
            f"the cached copy of {name!r} at {target} is unreadable ({exc}); run `infscope cache refresh {name}`"
        ) from None
    return pick_split(loaded, split, name)


@dataclass
class CachedDataset:
    """One dataset in the cache: its name, folder, splits with row counts, and size on disk."""

    name: str
    path: Path
    splits: dict[str, int]
    size_bytes: int


def folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def _split_rows(path: Path) -> dict[str, int]:
    import json

    def rows(folder: Path) -> int:
        try:
            state = json.loads((folder / "state.json").read_text())
            import pyarrow as pa

            total = 0
            for item in state.get("_data_files", []):
                with pa.memory_map(str(folder / item["filename"])) as source:
                    total += pa.ipc.open_stream(source).read_all().num_rows
            return total
        except (OSError, ValueError, KeyError):
            return -1

    dict_file = path / "dataset_dict.json"
    if dict_file.exists():
        try:
            names = json.loads(dict_file.read_text()).get("splits", [])
        except (OSError, ValueError):
            names = []
        return {name: rows(path / name) for name in names}
    return {"train": rows(path)}


def list_cached(cache_dir: str | os.PathLike | None = None) -> list[CachedDataset]:
    """The datasets saved in the cache, sorted by name."""
    root = hub_cache_dir(cache_dir)
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and not folder.name.startswith((".", "_")):
            name = folder.name.replace("__", "/")
            out.append(CachedDataset(name, folder, _split_rows(folder), folder_size(folder)))
    return out


def clear_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete everything in the cache folder; returns the bytes freed."""
    root = hub_cache_dir(cache_dir)
    if not root.is_dir():
        return 0
    freed = folder_size(root)
    for item in root.iterdir():
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()
    return freed
