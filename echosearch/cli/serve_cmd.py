"""``echosearch serve``: the Streamlit app on one index (127.0.0.1 unless told otherwise, login when exposed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from echosearch.errors import IndexNotFoundError


def streamlit_command(script: Path, index: Path, host: str, port: int, base_url_path: str | None = None) -> list[str]:
    """The ``streamlit run`` command line (headless, explicit address, no usage statistics)."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(script),
           "--server.headless", "true", "--server.address", host, "--server.port", str(port),
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--global.showWarningOnDirectExecution", "false", "--client.toolbarMode", "viewer"]
    if base_url_path:
        cmd += ["--server.baseUrlPath", base_url_path]
    return cmd + ["--", "--index", str(index)]


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        index: Path = typer.Option(..., "--index", "-i", help="Index folder."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; other than loopback needs login."),
        port: int = typer.Option(8501, "--port", help="TCP port."),
        base_url_path: str = typer.Option("", "--base-url-path", help="URL prefix when behind a reverse proxy."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Check and print the command, do not start."),
    ) -> None:
        """Start the Streamlit app (search, patient timeline, identity audit, index status)."""
        from echosearch.app_api import INDEX_ENV, app_script, check_serve_safety
        from echosearch.catalog import CATALOG_FILE

        index = index.resolve()
        if not (index / CATALOG_FILE).is_file():
            raise IndexNotFoundError(f"no index at {index} (missing {CATALOG_FILE}); run `echosearch index` first")
        from echosearch.serve.client import recorded_server

        running = recorded_server(index)
        if running is not None:  # the app opens the catalog itself: it cannot share it with a server yet
            from echosearch.errors import CatalogError

            raise CatalogError(f"an echosearch server holds {index} at {running['url']}: stop it to start the app "
                               "on this index (the app does not yet reach the server over HTTP)")
        script = app_script()
        mode = check_serve_safety(host, script.parent)
        cmd = streamlit_command(script, index, host, port, base_url_path or None)
        if dry_run:
            typer.echo(" ".join(cmd))
            return
        env = {**os.environ, INDEX_ENV: str(index)}
        typer.echo(f"echosearch app on http://{host}:{port}/{base_url_path.strip('/')} (index {index}, login: {mode})",
                   err=True)
        sys.stderr.flush()
        if os.name == "posix":  # become the Streamlit process: signals and exit status go straight to it
            os.execve(cmd[0], cmd, env)
        try:
            code = subprocess.call(cmd, env=env)
        except KeyboardInterrupt:
            code = 0
        if code:
            raise typer.Exit(code)
