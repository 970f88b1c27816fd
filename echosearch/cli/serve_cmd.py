"""``echosearch serve``: the index's server and the Streamlit app that talks to it (127.0.0.1 unless told
otherwise, login when exposed). The work is in :mod:`echosearch.appcore.launch`."""

from __future__ import annotations

import sys

import typer

from echosearch.cli.common import IndexOpt


def serve(
    index: IndexOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; other than loopback needs login."),
    port: int = typer.Option(8501, "--port", help="TCP port of the app."),
    base_url_path: str = typer.Option("", "--base-url-path", help="URL prefix when behind a reverse proxy."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check and print the commands, do not start."),
) -> None:
    """Start the server of an index (or reuse its running one) and the Streamlit app as its client."""
    from echosearch.appcore.launch import plan, serve_app

    p = plan(index, host, port, base_url_path or None)
    if dry_run:
        typer.echo(f"server: {p.server_url} (running)" if p.server_url else "server: " + " ".join(p.server or []))
        typer.echo(" ".join(p.app))
        return

    def announce(url: str, started: bool) -> None:
        typer.echo(f"echosearch app on http://{host}:{port}/{base_url_path.strip('/')} (index {p.index}, login: "
                   f"{p.auth}); server {url} ({'started' if started else 'already running'})", err=True)
        sys.stderr.flush()

    code = serve_app(p, announce)
    if code:
        raise typer.Exit(code)
