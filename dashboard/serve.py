"""Start the dashboard: `serve(workspace)` runs `streamlit run dashboard/app.py` on it.

`esm3 dashboard` and `make dashboard` call this; `python -m dashboard.serve --help` too.
Binds to localhost unless told otherwise: the catalog is the user's, not the network's.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
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


#: seconds Streamlit gets to stop after a forwarded signal before it is killed
STOP_GRACE_S = 15.0


def serve(workspace: Path, host: str = "127.0.0.1", port: int = 8501, headless: bool = True) -> int:
    """Run the dashboard in the foreground until stopped; returns streamlit's exit code.

    SIGTERM and SIGINT stop Streamlit too: they are forwarded and Streamlit is waited for,
    so a stopped `esm3 dashboard` leaves nothing serving.
    """
    env = dict(os.environ, ESM3_WORKSPACE=str(Path(workspace).expanduser().resolve()))
    procs: list[subprocess.Popen[bytes]] = []
    stopped: list[float] = []

    def forward(signum: int, frame: object) -> None:  # noqa: ARG001 - handler signature
        stopped.append(time.monotonic())
        for proc in procs:
            proc.send_signal(signum)  # a no-op once it has exited

    # handlers first: a signal that comes while Streamlit starts is not lost
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # its own process group: a terminal's Ctrl-C reaches Streamlit once, through us
        procs.append(
            subprocess.Popen(command(workspace, host, port, headless), env=env, process_group=0)
        )
        if stopped:
            procs[0].terminate()
        return _wait(procs[0], stopped)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for proc in procs:
            if proc.poll() is None:  # we are leaving on an error: do not leave it serving
                proc.kill()
                proc.wait()


def _wait(proc: subprocess.Popen[bytes], stopped: list[float]) -> int:
    """Streamlit's exit code (128 + N if a signal N ended it); killed if it has not
    stopped STOP_GRACE_S after the first forwarded signal."""
    while True:
        try:
            rc = proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if stopped and time.monotonic() - stopped[0] > STOP_GRACE_S:
                proc.kill()
            continue
        return 128 - rc if rc < 0 else rc


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
