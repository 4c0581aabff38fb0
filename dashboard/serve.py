"""Start the dashboard: `serve(workspace)` runs `streamlit run dashboard/app.py` on it.

`esm3 dashboard` and `make dashboard` call this; `python -m dashboard.serve --help` too.
Binds to localhost unless told otherwise: the catalog is the user's, not the network's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().with_name("app.py")


def command(
    workspace: Path, host: str = "127.0.0.1", port: int = 8501, headless: bool = True
) -> list[str]:
    """The streamlit command line that `serve` runs."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(int(port)),
        "--server.headless", "true" if headless else "false",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",
        "--", "--workspace", str(Path(workspace).expanduser().resolve()),
    ]  # fmt: skip


def serve(workspace: Path, host: str = "127.0.0.1", port: int = 8501, headless: bool = True) -> int:
    """Run the dashboard in the foreground until interrupted; returns streamlit's exit code."""
    env = dict(os.environ, ESM3_WORKSPACE=str(Path(workspace).expanduser().resolve()))
    try:
        return subprocess.call(command(workspace, host, port, headless), env=env)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dashboard.serve", description=__doc__)
    p.add_argument(
        "--workspace",
        type=Path,
        default=Path(os.environ.get("ESM3_WORKSPACE") or "workspace"),
        help="workspace root (default: $ESM3_WORKSPACE or ./workspace)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--no-headless", action="store_true", help="open a browser window")
    a = p.parse_args(argv)
    return serve(a.workspace, a.host, a.port, headless=not a.no_headless)


if __name__ == "__main__":
    raise SystemExit(main())
