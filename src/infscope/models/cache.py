"""Where converted and built-in model checkpoints live, and how a cache entry is written atomically.

A cache entry is a directory holding a normal Hugging Face checkpoint (config, safetensors,
tokenizer) plus a marker file written last. A directory without the marker is unfinished and is
never read. Entries are built in a temporary sibling and renamed into place, so an interrupted
build leaves nothing half-written behind and two concurrent builds cannot mix files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infscope.errors import InfscopeError

MARKER = "infscope_model.json"
CACHE_ENV = "INFSCOPE_CACHE"


def cache_root() -> Path:
    """Root of infscope's cache: ``$INFSCOPE_CACHE`` if set, else ``~/.cache/infscope``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "infscope"


def model_cache_dir(key: str) -> Path:
    """Directory of one cached model, ``<cache root>/models/<key>``."""
    return cache_root() / "models" / key


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished cache entry (its marker was written)."""
    return (path / MARKER).is_file()


def build_cached(key: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Return the cache entry ``key``, calling ``build(tmp_dir)`` once to create it if missing.

    ``build`` writes a checkpoint into the empty directory it is given and returns metadata that
    is stored in the marker. The directory is renamed into place only after ``build`` succeeds.
    """
    target = model_cache_dir(key)
    if is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise InfscopeError(
            f"cannot write the model cache under {target.parent} ({exc.strerror or exc}); "
            f"set {CACHE_ENV} to a writable directory"
        ) from None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        meta = build(tmp)
        (tmp / MARKER).write_text(json.dumps({"key": key, **meta}, indent=2, sort_keys=True) + "\n")
        if target.exists() and not is_complete(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):  # lost a race only if the other build finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
