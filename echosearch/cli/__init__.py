"""The ``echosearch`` command line: a thin typer layer over the library.

Each command group lives in its own module with a ``register(app)`` function. Expected failures are
:class:`~echosearch.errors.EchosearchError` subclasses: printed as one line on stderr with their exit code.
"""

from __future__ import annotations

import importlib
import sys

import typer

try:  # typer >= 0.26 bundles click as typer._click
    from typer._click.exceptions import ClickException as _TyperClickException

    _CLICK_ERRORS: tuple[type[Exception], ...] = (_TyperClickException,)
except ImportError:  # pragma: no cover - older typer uses click itself
    _CLICK_ERRORS = ()
try:
    import click as _click

    _CLICK_ERRORS = (*_CLICK_ERRORS, _click.ClickException)
except ImportError:  # pragma: no cover
    pass

from echosearch import __version__
from echosearch.errors import EchosearchError

app = typer.Typer(
    name="echosearch",
    help="Embedding search and longitudinal patient tracking for echocardiography archives.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = ("info_cmd", "synth_cmd", "ingest_cmd", "index_cmd", "search_cmd", "longitudinal_cmd", "serve_cmd",
                   "server_cmd", "intake_cmd", "merge_cmd")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"echosearch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Embedding search and longitudinal patient tracking for echocardiography archives."""


for _name in COMMAND_MODULES:
    _module = importlib.import_module(f"echosearch.cli.{_name}")
    _module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: domain errors become one line and an exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except EchosearchError as exc:
        from echosearch.cli.common import safe_text

        typer.secho(f"error: {safe_text(exc)}", err=True, fg=typer.colors.RED)
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except _CLICK_ERRORS as exc:  # usage errors: typer bundles its own click
        exc.show()  # type: ignore[attr-defined]
        return int(exc.exit_code)  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
