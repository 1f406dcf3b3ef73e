"""``infscope cache info|clear|refresh``: manage the local copy of Hub datasets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from infscope.cli import app, console

cache_app = typer.Typer(help="Manage the local cache of Hugging Face Hub datasets.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

_CACHE_DIR_HELP = "Cache folder (default: $INFSCOPE_CACHE or ~/.cache/infscope/hub)."


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


@cache_app.command("info")
def info_command(cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_CACHE_DIR_HELP)) -> None:
    """Show the cache folder, the datasets in it (splits, rows) and their size."""
    from infscope.data.hub import folder_size, hub_cache_dir, list_cached

    root = hub_cache_dir(cache_dir)
    console.print(f"cache: {root}", highlight=False, soft_wrap=True)
    cached = list_cached(root)
    if not cached:
        console.print("no cached datasets")
        return
    table = Table("dataset", "splits (rows)", "size")
    for item in cached:
        splits = ", ".join(f"{name} ({rows})" for name, rows in item.splits.items())
        table.add_row(item.name, splits, _size(item.size_bytes))
    console.print(table)
    console.print(f"total: {_size(folder_size(root))}")


@cache_app.command("clear")
def clear_command(
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_CACHE_DIR_HELP),
) -> None:
    """Delete every cached dataset."""
    from infscope.data.hub import clear_cache, hub_cache_dir

    root = hub_cache_dir(cache_dir)
    if not yes and not typer.confirm(f"delete everything in {root}?"):
        console.print("nothing deleted")
        return
    freed = clear_cache(root)
    console.print(f"cleared {root} ({_size(freed)} freed)", highlight=False, soft_wrap=True)


@cache_app.command("refresh")
def refresh_command(
    name: str = typer.Argument(
        ..., help="Hub dataset: tatsu-lab/alpaca, glue/sst2, glue/mrpc, gsm8k or owner/name."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_CACHE_DIR_HELP),
) -> None:
    """Download a Hub dataset again and replace its cached copy."""
    from infscope.data.hub import download

    path = download(name, cache_dir)
    console.print(f"refreshed {name} -> {path}", highlight=False, soft_wrap=True)
