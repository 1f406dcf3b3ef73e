"""``infscope analyze PATH...``: inspect noise outputs as rich tables or JSON.

Modes: ``inventory`` (files, type, rows, ratio, strategy, size), ``detail`` (one file from its
manifest), ``sample`` (estimates with 95 % intervals from a random sample), ``compare`` (two
files side by side), ``strategy`` (strategy effect per ratio) and ``all`` (everything plus a
readiness check for influence experiments). All logic lives in :mod:`infscope.noise.analyze`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from infscope.cli import app, console

MODES = ("inventory", "detail", "sample", "compare", "strategy", "all")


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _show_inventory(inv: dict) -> None:
    rows = [
        [f["name"], f["type"], f["rows"], f["ratio"], f["strategy"], _size(f["size_bytes"])]
        for f in inv["files"]
    ]
    console.print(_table("inventory", ["file", "type", "rows", "ratio", "strategy", "size"], rows))


def _show_detail(d: dict) -> None:
    head = [
        [k, d[k]]
        for k in ("rows", "targeted", "noisy", "changed", "failures", "label_changed", "mean_length_change")
    ]
    if "mismatches" in d:
        head.append(["manifest/file mismatches", d["mismatches"]])
    console.print(_table(f"detail: {Path(d['path']).name}", ["measure", "value"], head))
    console.print(_table("per family", ["family", "rows"], [[k, v] for k, v in d["families"].items()]))
    console.print(_table("per operator", ["operator", "rows"], [[k, v] for k, v in d["operators"].items()]))


def _show_sample(e: dict) -> None:
    rows = [["noise ratio", e["ratio_estimate"], f"[{e['ratio_ci95'][0]:.3f}, {e['ratio_ci95'][1]:.3f}]"]]
    rows += [
        [f"family {k}", v["estimate"], f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"]
        for k, v in e["families"].items()
    ]
    lo, hi = e["mean_length_change_ci95"]
    rows.append(["mean length change", e["mean_length_change"], f"[{lo:.1f}, {hi:.1f}]"])
    title = f"sample estimate: {Path(e['path']).name} ({e['sampled']} of {e['rows']} rows)"
    console.print(_table(title, ["quantity", "estimate", "95% CI"], rows))


def _show_compare(c: dict) -> None:
    fields = sorted(set(c["a"]["mean_lengths"]) | set(c["b"]["mean_lengths"]))
    rows = [["rows", c["a"]["rows"], c["b"]["rows"]]]
    rows += [[f"mean len {f}", c["a"]["mean_lengths"].get(f), c["b"]["mean_lengths"].get(f)] for f in fields]
    console.print(_table("compare", ["", Path(c["a"]["path"]).name, Path(c["b"]["path"]).name], rows))
    console.print(
        f"rows that differ: {c['rows_differ']} of {c['shared_ids']} shared ids ({_fmt(c['fields_differ'])})"
    )
    for ex in c["examples"]:
        console.print(
            f"  {ex['id']} [{ex['field']}]: {ex['a']!s:.80} -> {ex['b']!s:.80}", markup=False, highlight=False
        )


def _show_strategy(s: dict) -> None:
    for ratio, lines in s["ratios"].items():
        rows = [
            [
                x["strategy"],
                x["noisy"],
                x["family_share"],
                x["mean_severity"],
                x["mean_length_change"],
                x["label_changed"],
            ]
            for x in lines
        ]
        console.print(
            _table(
                f"strategy effect at ratio {ratio}",
                ["strategy", "noisy", "family share", "severity", "len change", "label chg"],
                rows,
            )
        )


def _show_readiness(r: dict) -> None:
    if r["ready"]:
        console.print(
            f"[green]ready[/] for influence experiments: ratios {r['ratios']}, {r['noisy_files']} noisy files"
        )
    else:
        console.print("[yellow]not ready[/]; missing:")
        for item in r["missing"]:
            console.print(f"  - {item}", markup=False, highlight=False)


def _noisy_targets(paths: list[Path]) -> list[str]:
    from infscope.noise.analyze import inventory

    return [f["path"] for f in inventory(paths)["files"] if f["type"] == "noisy" and f["manifest"]]


@app.command("analyze")
def analyze_command(
    paths: list[Path] = typer.Argument(..., help="Noise output files or folders."),
    mode: str = typer.Option(
        "inventory", "--mode", "-m", help="inventory|detail|sample|compare|strategy|all"
    ),
    sample: int = typer.Option(1000, "--sample", help="Rows sampled for estimates on large files."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random sample."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Inventory, detail, sampled estimates, comparison and strategy effect of noise outputs."""
    from infscope.errors import InfscopeError
    from infscope.noise import analyze as lib

    if mode not in MODES:
        raise InfscopeError(f"unknown --mode '{mode}'; choose one of {', '.join(MODES)}")
    if mode == "inventory":
        result: Any = lib.inventory(paths)
        show = _show_inventory
    elif mode == "detail":
        result = [lib.detail(p) for p in _noisy_targets(paths)]
        show = lambda items: [_show_detail(d) for d in items]  # noqa: E731
    elif mode == "sample":
        result = [lib.sample_estimate(p, sample=sample, seed=seed) for p in _noisy_targets(paths)]
        show = lambda items: [_show_sample(e) for e in items]  # noqa: E731
    elif mode == "compare":
        if len(paths) != 2 or not all(p.is_file() for p in paths):
            raise InfscopeError(
                "--mode compare needs exactly two data files, e.g. DATA.clean.jsonl DATA.noisy....jsonl"
            )
        result = lib.compare(paths[0], paths[1])
        show = _show_compare
    elif mode == "strategy":
        result = lib.strategy_effect(paths)
        show = _show_strategy
    else:
        result = lib.analyze_all(paths, sample=sample, seed=seed)
        show = _show_all
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str, ensure_ascii=False))
    else:
        show(result)


def _show_all(result: dict) -> None:
    _show_inventory(result["inventory"])
    for d in result["details"]:
        _show_detail(d)
    for e in result["estimates"]:
        _show_sample(e)
    if result["compare"]:
        _show_compare(result["compare"])
    _show_strategy(result["strategy"])
    _show_readiness(result["readiness"])
