"""Real-text built-ins from apt's package lists: parsing, cleaning, seeded splits, fingerprint, cache,
the missing-source error, and (where this machine has the lists) the real datasets."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from infscope.data import debian
from infscope.data.builtin import builtin_names, make_builtin
from infscope.data.debian import DebianPackage, cut_text, parse_packages
from infscope.data.loading import load_rows
from infscope.errors import InfscopeError

# Two files as apt keeps them: Packages records (some with only a synopsis and an md5) and the
# Translation-en records that carry the long descriptions.
HAND_PACKAGES = """\
Package: alpha-tool
Version: 1.0-1
Section: utils
Description: tool for alpha things
 Alpha-tool does the first thing.
 It wraps   lines  here.
 .
 The second paragraph is not used.
Description-md5: 0001

Package: beta-lib1
Section: contrib/libs
Description: Beta runtime library
 Beta is a library
   with  verbatim spacing.
 .
 More about beta.

Package: alpha-tool
Section: net
Description: a later record of the same name
 It is ignored.

Package: aaa-beta
Section: non-free/doc
Description: Beta runtime library
 Beta is a library with verbatim spacing.

Package: no-long
Section: utils
Description: only a synopsis

Package: no-section
Description: a package without a section
 Long text.

Package: trans-only
Section: non-free-firmware/net
Description: translated tool!
Description-md5: abc123
Tag: role::program,
 implemented-in::c
"""
HAND_TRANSLATION = """\
Package: trans-only
Description-md5: abc123
Description-en: translated tool!
 The long text comes from
 the translation file.
 .
 Not this one.

Package: unused
Description-md5: ffff
Description-en: nothing refers to this
 Ignored.
"""
HAND_EXPECTED = [
    DebianPackage("aaa-beta", "doc", "Beta runtime library. Beta is a library with verbatim spacing."),
    DebianPackage(
        "alpha-tool", "utils", "tool for alpha things. Alpha-tool does the first thing. It wraps lines here."
    ),
    DebianPackage("trans-only", "net", "translated tool! The long text comes from the translation file."),
]


def test_parse_hand_written_lists_gives_exact_packages():
    assert parse_packages([HAND_PACKAGES, HAND_TRANSLATION]) == HAND_EXPECTED
    # without the translation file, trans-only has no long description and is skipped
    assert [p.name for p in parse_packages([HAND_PACKAGES])] == ["aaa-beta", "alpha-tool"]


def test_cut_text_prefers_sentence_end_then_word():
    assert cut_text("short text.", 40) == "short text."
    text = "First sentence is here. Second sentence runs on and on past the limit."
    assert cut_text(text, 40) == "First sentence is here."
    long_words = "word " * 30
    cut = cut_text("Tiny. " + long_words, 40)
    assert cut == "Tiny. word word word word word word..." and len(cut) <= 40
    assert cut_text("x" * 50, 20) == "x" * 17 + "..."


# ---------------------------------------------------------------- a larger generated source

SECTIONS = {"utils": 12, "libs": 10, "contrib/net": 9, "doc": 3}


def _fake_source() -> tuple[str, dict[str, tuple[str, str]]]:
    """Packages text with SECTIONS sizes, plus name -> (section, summary) as they must come out."""
    records, expected = [], {}
    for section, count in SECTIONS.items():
        short = section.split("/")[-1]
        for i in range(count):
            name = f"{short}-pkg{i:02d}"
            records.append(
                f"Package: {name}\nSection: {section}\nDescription: the {short} package {i}\n"
                f" It does {short} job number {i}\n quite well.\n .\n Unused paragraph.\n"
            )
            expected[name] = (short, f"the {short} package {i}. It does {short} job number {i} quite well.")
    # a duplicate summary under a later name is dropped
    records.append(
        "Package: utils-pkg99\nSection: utils\nDescription: the utils package 0\n It does utils job number 0\n"
        " quite well.\n"
    )
    return "\n".join(records), expected


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    text, expected = _fake_source()
    path = tmp_path / "packages.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv(debian.SOURCE_ENV, str(path))
    monkeypatch.setenv(debian.CACHE_ENV, str(tmp_path / "cache"))
    return path, expected


def _sha16(*files: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def test_names_registered():
    assert {"debian_sections", "debian_describe"} <= set(builtin_names())
    with pytest.raises(InfscopeError, match="debian_describe"):
        make_builtin("no_such_set")


def test_sections_rows_split_and_seed(fake_source):
    _, expected = fake_source
    split = make_builtin("debian_sections", seed=1, n_classes=3, per_class=6, n_test_per_class=2)
    assert split.task == "classification"
    assert split.label_names == ["utils", "libs", "net"]
    assert Counter(r["class"] for r in split.train) == {0: 4, 1: 4, 2: 4}
    assert Counter(r["class"] for r in split.test) == {0: 2, 1: 2, 2: 2}
    names = []
    for row in split.train + split.test:
        assert set(row) == {"id", "text", "label", "class"}
        assert re.fullmatch(r"debs-c\d-\d{4}", row["id"])
        name, _, summary = row["text"].partition(": ")
        assert row["label"] == row["class"]
        assert expected[name] == (split.label_names[row["label"]], summary)
        names.append(name)
    assert len(set(names)) == len(names) == 18  # train and test distinct, no repeats
    assert "utils-pkg99" not in names
    again = make_builtin("debian_sections", seed=1, n_classes=3, per_class=6, n_test_per_class=2)
    assert (again.train, again.test) == (split.train, split.test)
    other = make_builtin("debian_sections", seed=2, n_classes=3, per_class=6, n_test_per_class=2)
    assert {r["text"] for r in other.train} != {r["text"] for r in split.train}


def test_describe_rows_and_paraphrase(fake_source):
    _, expected = fake_source
    split = make_builtin("debian_describe", seed=0, n_classes=2, per_class=10, n_test_per_class=3)
    assert split.task == "instruction" and split.label_names == ["utils", "libs"]
    assert len(split.train) == 14 and len(split.test) == 6
    for row in split.train + split.test:
        name = re.fullmatch(r"Describe what the Debian package (\S+) is for\.", row["instruction"]).group(1)
        assert row["input"] == ""
        assert expected[name] == (split.label_names[row["class"]], row["output"])
    # libs has exactly 10 packages: all of them appear
    assert sum(r["class"] == 1 for r in split.train + split.test) == 10
    varied = make_builtin("debian_describe", n_classes=2, per_class=10, n_test_per_class=2, paraphrase=True)
    wordings = {re.sub(r"\S+-pkg\d+", "NAME", r["instruction"]) for r in varied.train}
    assert len(wordings) > 1
    assert wordings <= {t.format(name="NAME") for t in debian.DESCRIBE_TEMPLATES}


def test_fingerprint_recorded_and_cache_reused(fake_source, monkeypatch):
    path, _ = fake_source
    split = make_builtin("debian_sections", n_classes=2, per_class=3, n_test_per_class=1)
    assert split.source == str(path.resolve())
    assert split.source_fingerprint == _sha16(path)
    cached = json.loads((debian.cache_dir() / "packages.json").read_text(encoding="utf-8"))
    assert cached["fingerprint"] == split.source_fingerprint and len(cached["packages"]) == 34

    def no_parsing(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    real_parser = debian.parse_packages
    monkeypatch.setattr(debian, "parse_packages", no_parsing)
    debian._LOADED.clear()  # read the cache file, not the in-process copy
    again = make_builtin("debian_sections", n_classes=2, per_class=3, n_test_per_class=1)
    assert again.train == split.train
    monkeypatch.setattr(debian, "parse_packages", real_parser)
    path.write_text(path.read_text(encoding="utf-8").replace("quite well", "very well"), encoding="utf-8")
    changed = make_builtin("debian_sections", n_classes=2, per_class=3, n_test_per_class=1)
    assert changed.source_fingerprint == _sha16(path) != split.source_fingerprint
    assert all("very well" in r["text"] for r in changed.train)


def test_bad_counts(fake_source):
    with pytest.raises(InfscopeError, match="has 1 to 4 classes"):
        make_builtin("debian_sections", n_classes=5, per_class=2, n_test_per_class=1)
    with pytest.raises(InfscopeError, match="'doc' has only 3 packages"):
        make_builtin("debian_sections", n_classes=4, per_class=4, n_test_per_class=1)
    with pytest.raises(InfscopeError, match="--test-per-class"):
        make_builtin("debian_describe", n_classes=2, per_class=4, n_test_per_class=4)


def _one_line_error(monkeypatch, lists_dir: Path) -> str:
    monkeypatch.delenv(debian.SOURCE_ENV, raising=False)
    monkeypatch.setattr(debian, "APT_LISTS_DIR", lists_dir)
    with pytest.raises(InfscopeError) as caught:
        make_builtin("debian_sections", n_classes=2, per_class=3, n_test_per_class=1)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_absent_source_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv(debian.CACHE_ENV, str(tmp_path / "cache"))
    message = _one_line_error(monkeypatch, tmp_path / "missing")
    assert message.startswith("no apt package lists found") and "apt-get update" in message
    assert debian.SOURCE_ENV in message
    # lists without Translation-en: no long descriptions, a one-line error too
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "x_dists_main_binary-amd64_Packages").write_text("Package: a\nSection: utils\nDescription: s\n")
    assert "no packages with long descriptions" in _one_line_error(monkeypatch, lists)
    monkeypatch.setenv(debian.SOURCE_ENV, str(tmp_path / "nope.txt"))
    with pytest.raises(InfscopeError, match="is not a file"):
        make_builtin("debian_describe", n_classes=1, per_class=2, n_test_per_class=1)


def test_system_lists_compressed_files(tmp_path, monkeypatch):
    """apt's lists folder: a gzip Packages file and an lz4 Translation file (through apt-helper)."""
    helper = shutil.which("apt-helper") or "/usr/lib/apt/apt-helper"
    if shutil.which("lz4") is None or not Path(helper).exists():
        pytest.skip("needs the lz4 tool and apt-helper")
    lists = tmp_path / "lists"
    lists.mkdir()
    packages = lists / "deb_dists_main_binary-amd64_Packages.gz"
    packages.write_bytes(gzip.compress(HAND_PACKAGES.encode()))
    plain = tmp_path / "Translation-en"
    plain.write_text(HAND_TRANSLATION, encoding="utf-8")
    translation = lists / "deb_dists_main_i18n_Translation-en.lz4"
    subprocess.run(["lz4", "-q", str(plain), str(translation)], check=True)
    (lists / "deb_dists_InRelease").write_text("not an index")
    monkeypatch.delenv(debian.SOURCE_ENV, raising=False)
    monkeypatch.setenv(debian.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(debian, "APT_LISTS_DIR", lists)
    index = debian.load_index()
    assert index.packages == HAND_EXPECTED
    assert index.fingerprint == _sha16(packages, translation)


# ---------------------------------------------------------------- the real lists, where present


def _has_real_lists() -> bool:
    files = debian.system_index_files()
    return any("_Packages" in p.name for p in files) and any("Translation-en" in p.name for p in files)


@pytest.mark.skipif(not _has_real_lists(), reason="no apt lists with Translation-en on this machine")
def test_real_lists_build_both_datasets(tmp_path, monkeypatch):
    monkeypatch.delenv(debian.SOURCE_ENV, raising=False)
    monkeypatch.setenv(debian.CACHE_ENV, str(tmp_path / "cache"))
    index = debian.load_index()
    counts = Counter(p.section for p in index.packages)
    sections = make_builtin("debian_sections", seed=0, n_classes=5, per_class=4, n_test_per_class=1)
    describe = make_builtin("debian_describe", seed=0, n_classes=5, per_class=4, n_test_per_class=1)
    top = sections.label_names
    assert describe.label_names == top and len(top) == 5
    assert min(counts[s] for s in top) >= max(c for s, c in counts.items() if s not in top)
    assert [counts[s] for s in top] == sorted((counts[s] for s in top), reverse=True)
    assert sections.source_fingerprint == index.fingerprint == describe.source_fingerprint
    # the archive's own Section field (apt-cache, not our parser) agrees with each row's class
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    archive = {}
    for record in dump.split("\n\n"):
        name, section = (
            re.search(r"^Package: (\S+)", record, re.M),
            re.search(r"^Section: (\S+)", record, re.M),
        )
        if name and section:
            archive.setdefault(name.group(1), section.group(1).split("/")[-1])
    for split in (sections, describe):
        assert len(split.train) == 15 and len(split.test) == 5
        for row in split.train + split.test:
            name = row["text"].split(": ", 1)[0] if "text" in row else row["instruction"].split()[-3]
            assert archive[name] == top[row["class"]]
            summary = row["text"].split(": ", 1)[1] if "text" in row else row["output"]
            assert 20 < len(summary) <= debian.MAX_CHARS and "\n" not in summary
    loaded = load_rows("builtin:debian_describe", split="test")
    assert loaded.task == "instruction" and len(loaded.rows) == 100 and len(loaded.label_names) == 10
