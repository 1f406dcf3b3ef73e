"""Real text nobody here wrote: Debian package descriptions from apt's package lists.

apt keeps the archive's index files under ``/var/lib/apt/lists`` after ``apt-get update``:
``*_Packages`` (one record per package: ``Package``, ``Section``, ``Description`` = synopsis line,
``Description-md5``) and, unless ``Acquire::Languages`` is ``none`` as in Docker images,
``*_i18n_Translation-en`` (``Description-en`` = synopsis + long description, keyed by the same md5).
Files may be lz4/zstd compressed (read through ``apt-helper cat-file``, which ships with apt) or
gz/xz/bz2/plain (read with the standard library). A local file in the same record format (an
``apt-cache show`` dump, a Packages file with long descriptions, or a Packages file followed by its
Translation-en file) replaces the system lists when ``$INFSCOPE_DEBIAN_PACKAGES`` names it.

Each package becomes a :class:`DebianPackage` (name, archive section without its ``contrib/``-style
prefix, and a summary = synopsis + first long-description paragraph with Debian's layout removed,
cut near :data:`MAX_CHARS`). Packages without a section, synopsis or long description are skipped, a
name seen twice keeps its first record (files in name order), and a summary seen twice keeps the
package first in name order. The parsed packages are cached under ``$INFSCOPE_CACHE/debian`` (else
``~/.cache/infscope/debian``) with the source's fingerprint: the SHA-256 of the source files' bytes,
so a new ``apt-get update`` rebuilds the cache and changes the recorded fingerprint.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infscope.errors import InfscopeError

APT_LISTS_DIR = Path("/var/lib/apt/lists")
SOURCE_ENV = "INFSCOPE_DEBIAN_PACKAGES"
CACHE_ENV = "INFSCOPE_CACHE"
#: Longest summary kept, in characters (the cut prefers a sentence end; see :func:`cut_text`).
MAX_CHARS = 400
#: Bump when parsing or cleaning changes, so old caches are rebuilt.
CACHE_VERSION = 1
_UPDATE_HINT = "run `apt-get update -o Acquire::Languages=en` (as root) or set {env} to a local Packages file"
_INDEX_RE = re.compile(r"_(Packages|i18n_Translation-en)(\.(lz4|zst|gz|xz|bz2))?$")
_RECORD_SPLIT_RE = re.compile(r"\n[ \t]*\n")
_FIELDS = ("Package", "Section", "Description", "Description-md5", "Description-en")
_MARKER_RE = re.compile(r"\n[ \t]+\.[ \t]*(?=\n|$)")
_SENTENCE_END_RE = re.compile(r"[.!?](?= )")

#: Instruction wordings of ``debian_describe``; the first without paraphrase, a random one with it.
DESCRIBE_TEMPLATES = (
    "Describe what the Debian package {name} is for.",
    "What is the Debian package {name} used for?",
    "Explain the purpose of the Debian package {name}.",
    "In a few sentences, what does the Debian package {name} do?",
    "Give a short description of the Debian package {name}.",
)


@dataclass(frozen=True)
class DebianPackage:
    """One package: its name, archive section (``python``, ``libs`` ...) and cleaned summary."""

    name: str
    section: str
    summary: str


@dataclass
class DebianIndex:
    """Parsed packages (sorted by name, unique names and summaries), where they came from and the
    source's fingerprint (first 16 hex digits of its SHA-256)."""

    packages: list[DebianPackage]
    source: str
    fingerprint: str

    def section_counts(self) -> list[tuple[str, int]]:
        """(section, packages) pairs, most packages first, ties by section name."""
        counts = Counter(package.section for package in self.packages)
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    def by_section(self) -> dict[str, list[DebianPackage]]:
        """Packages of each section, in name order."""
        groups: dict[str, list[DebianPackage]] = {}
        for package in self.packages:
            groups.setdefault(package.section, []).append(package)
        return groups


# ---------------------------------------------------------------- parsing


def iter_records(text: str, fields: tuple[str, ...] | None = None) -> Iterator[dict[str, str]]:
    """Records of a Debian control-format text (blank-line separated), with only ``fields`` if given;
    a field's continuation lines (starting with a space or tab) are kept after a newline, as written."""
    names = "|".join(re.escape(name) for name in fields) if fields else "[A-Za-z0-9-]+"
    # a leading newline literal lets the regex engine jump from line to line
    field_re = re.compile(rf"\n({names}):[ \t]*(.*(?:\n[ \t].*)*)")
    for block in _RECORD_SPLIT_RE.split(text):
        record = dict(field_re.findall("\n" + block))
        if record:
            yield record


def clean_text(text: str) -> str:
    """Whitespace (newlines, Debian's leading spaces) collapsed to single spaces, ends stripped."""
    return " ".join(text.split())


def first_paragraph(long_description: str) -> str:
    """The long description's first non-empty paragraph (paragraphs end at `` .`` lines), cleaned."""
    for part in _MARKER_RE.split("\n" + long_description):
        cleaned = clean_text(part)
        if cleaned:
            return cleaned
    return ""


def cut_text(text: str, max_chars: int = MAX_CHARS) -> str:
    """``text`` if it fits, else cut at the last sentence end within ``max_chars`` (when that keeps at
    least half), else at the last space with ``...`` appended; the result has at most ``max_chars``."""
    if len(text) <= max_chars:
        return text
    ends = [m.start() for m in _SENTENCE_END_RE.finditer(text, 0, max_chars)]
    if ends and ends[-1] + 1 >= max_chars // 2:
        return text[: ends[-1] + 1]
    head = text[: max_chars - 3]
    space = head.rfind(" ")
    head = head[:space] if space > 0 else head
    return head.rstrip(" ,;:") + "..."


def make_summary(synopsis: str, long_description: str, max_chars: int = MAX_CHARS) -> str:
    """Synopsis (ended with a full stop) + the first long-description paragraph, cut; ``""`` when
    either part is empty."""
    head, body = clean_text(synopsis), first_paragraph(long_description)
    if not head or not body:
        return ""
    if head[-1] not in ".!?":
        head += "."
    return cut_text(f"{head} {body}", max_chars)


def _split_description(value: str) -> tuple[str, str]:
    synopsis, _, long_description = value.partition("\n")
    return synopsis, long_description


def parse_packages(texts: list[str], max_chars: int = MAX_CHARS) -> list[DebianPackage]:
    """Packages of control-format ``texts`` (Packages records, and Translation records whose long
    descriptions fill in by ``Description-md5``), skipped and de-duplicated as the module says."""
    records = [record for text in texts for record in iter_records(text, _FIELDS)]
    long_by_md5 = {
        record["Description-md5"]: _split_description(record["Description-en"])[1]
        for record in records
        if "Description-en" in record and "Description-md5" in record
    }
    by_name: dict[str, DebianPackage] = {}
    for record in records:
        name, section = record.get("Package", "").strip(), record.get("Section", "").strip()
        if not name or not section or "Description" not in record or name in by_name:
            continue
        synopsis, long_description = _split_description(record["Description"])
        if not long_description.strip():
            long_description = long_by_md5.get(record.get("Description-md5", "").strip(), "")
        summary = make_summary(synopsis, long_description, max_chars)
        if summary:
            by_name[name] = DebianPackage(name, section.rsplit("/", 1)[-1], summary)
    seen: set[str] = set()
    packages = []
    for name in sorted(by_name):
        package = by_name[name]
        if package.summary not in seen:
            seen.add(package.summary)
            packages.append(package)
    return packages


# ---------------------------------------------------------------- sources


def _read_index(path: Path) -> str:
    """Text of one index file; lz4/zstd through ``apt-helper cat-file``, others by the standard library."""
    suffix = path.suffix
    if suffix in (".lz4", ".zst"):
        helper = shutil.which("apt-helper") or "/usr/lib/apt/apt-helper"
        if not Path(helper).exists():
            raise InfscopeError(
                f"{path} is {suffix[1:]}-compressed and apt-helper is missing; install apt or pass a plain file"
            )
        result = subprocess.run([helper, "cat-file", str(path)], capture_output=True, check=False)
        if result.returncode != 0:
            raise InfscopeError(f"apt-helper could not read {path}; run `apt-get update` (as root) again")
        data = result.stdout
    else:
        opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(suffix, open)
        with opener(path, "rb") as handle:
            data = handle.read()
    return data.decode("utf-8", errors="replace")


def system_index_files(lists_dir: Path | None = None) -> list[Path]:
    """apt's Packages and English Translation files under ``lists_dir``, in name order."""
    folder = APT_LISTS_DIR if lists_dir is None else lists_dir
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _INDEX_RE.search(p.name))


def source_files() -> tuple[list[Path], str]:
    """The files to read and a label for them: ``$INFSCOPE_DEBIAN_PACKAGES`` if set, else apt's lists.

    Raises a one-line :class:`InfscopeError` when neither exists.
    """
    local = os.environ.get(SOURCE_ENV)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise InfscopeError(f"{SOURCE_ENV}={local} is not a file; point it at a Debian Packages file")
        return [path], str(path.resolve())
    files = system_index_files()
    if not any("_Packages" in p.name for p in files):
        raise InfscopeError(
            f"no apt package lists found in {APT_LISTS_DIR}; " + _UPDATE_HINT.format(env=SOURCE_ENV)
        )
    return files, f"apt lists {APT_LISTS_DIR}"


def fingerprint_files(files: list[Path]) -> str:
    """First 16 hex digits of the SHA-256 over each file's name and bytes, in the order given."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode("utf-8") + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where the parsed packages are cached: ``$INFSCOPE_CACHE/debian`` or ``~/.cache/infscope/debian``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "infscope") / "debian"


def _read_cache(path: Path, fingerprint: str) -> list[DebianPackage] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if data.get("version") != CACHE_VERSION or data.get("fingerprint") != fingerprint:
        return None
    return [DebianPackage(*item) for item in data["packages"]]


def _write_cache(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write (temp file + rename); a cache that cannot be written is skipped, not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False) as handle:
            json.dump(payload, handle, ensure_ascii=False)
        os.replace(handle.name, path)
    except OSError:
        pass


_LOADED: dict[tuple[str, str], list[DebianPackage]] = {}


def load_index() -> DebianIndex:
    """The Debian packages of this machine (or ``$INFSCOPE_DEBIAN_PACKAGES``): kept in memory per
    (source, fingerprint), else from the cache when the fingerprint matches, else parsed and cached."""
    files, source = source_files()
    fingerprint = fingerprint_files(files)
    if (source, fingerprint) in _LOADED:
        return DebianIndex(_LOADED[source, fingerprint], source, fingerprint)
    path = cache_dir() / "packages.json"
    packages = _read_cache(path, fingerprint)
    if packages is None:
        packages = parse_packages([_read_index(p) for p in files])
        if not packages:
            raise InfscopeError(
                f"{source} has no packages with long descriptions; " + _UPDATE_HINT.format(env=SOURCE_ENV)
            )
        payload = {
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "source": source,
            "files": [str(p) for p in files],
            "packages": [[p.name, p.section, p.summary] for p in packages],
        }
        _write_cache(path, payload)
    _LOADED.clear()  # one source at a time: the memory of a machine-wide list is not small
    _LOADED[source, fingerprint] = packages
    return DebianIndex(packages, source, fingerprint)


# ---------------------------------------------------------------- rows


def section_row(package: DebianPackage, cls: int, rng: random.Random, paraphrase: bool) -> dict[str, Any]:
    """``debian_sections`` row: ``text = "NAME: summary"``, ``label`` = section index."""
    return {"text": f"{package.name}: {package.summary}", "label": cls}


def describe_row(package: DebianPackage, cls: int, rng: random.Random, paraphrase: bool) -> dict[str, Any]:
    """``debian_describe`` row: asks what package NAME is for; the output is its summary."""
    template = rng.choice(DESCRIBE_TEMPLATES) if paraphrase else DESCRIBE_TEMPLATES[0]
    return {"instruction": template.format(name=package.name), "input": "", "output": package.summary}
