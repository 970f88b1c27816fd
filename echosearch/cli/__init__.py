"""The ``echosearch`` command line: a thin typer layer over the library.

Each command is a module-level function of one of the ``*_cmd`` modules, registered on :data:`app` below (in the
order ``--help`` lists them); the options that several commands share (``--index``, ``--json``, ``--server``) are
declared once in :mod:`echosearch.cli.common`. Expected failures are :class:`~echosearch.errors.EchosearchError`
subclasses: printed as one line on stderr with their exit code.
"""

from __future__ import annotations

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
from echosearch.cli import (
    index_cmd,
    info_cmd,
    ingest_cmd,
    intake_cmd,
    longitudinal_cmd,
    merge_cmd,
    search_cmd,
    serve_cmd,
    server_cmd,
    synth_cmd,
)
from echosearch.errors import EchosearchError

app = typer.Typer(
    name="echosearch",
    help="Embedding search and longitudinal patient tracking for echocardiography archives.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"echosearch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Embedding search and longitudinal patient tracking for echocardiography archives."""


# every command, in the order --help lists them
app.command()(info_cmd.locate)
app.command()(info_cmd.info)
app.command()(synth_cmd.synth)
app.command()(ingest_cmd.scan)
app.command()(ingest_cmd.preview)
app.command()(index_cmd.index)
app.command()(index_cmd.train)
app.command("train-identity")(index_cmd.train_identity)
app.add_typer(index_cmd.model_app, name="model")
app.command()(search_cmd.search)
app.command()(search_cmd.reports)
app.command()(search_cmd.reindex)
app.command()(longitudinal_cmd.audit)
app.command()(longitudinal_cmd.changes)
app.command()(longitudinal_cmd.match)
app.command("eval")(longitudinal_cmd.eval_)
app.command()(serve_cmd.serve)
app.command()(server_cmd.server)
app.command()(intake_cmd.receive)
app.command()(intake_cmd.pull)
app.command()(merge_cmd.merge)


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
