"""The ``infscope`` command: a thin typer layer over the library.

Each submodule adds its commands to :data:`app`. :func:`main` turns :class:`InfscopeError`
into a one-line message on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from infscope.errors import InfscopeError

try:  # typer >= 0.25 vendors click; older releases use the click package itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exceptions

app = typer.Typer(
    name="infscope",
    help="Find the fine-tuning examples that help or hurt a LoRA-tuned model, and measure it on known noise.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """infscope: noise benchmarks, influence scores and data cleaning for LoRA fine-tuning."""


@app.command("version")
def version_command() -> None:
    """Print the infscope version and the versions of the packages that shape results."""
    from infscope.runs import package_versions

    for name, value in package_versions().items():
        console.print(f"{name} {value}")


def _register_commands() -> None:
    """Import the command modules so that they attach their commands to ``app``."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name.endswith("_cmds"):
            importlib.import_module(f"{__name__}.{module.name}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (0 ok, 2 bad input, 1 other failure)."""
    _register_commands()
    try:
        app(args=argv, prog_name="infscope", standalone_mode=False)
    except InfscopeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 1
    except click_exceptions.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume")
        return 130
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
