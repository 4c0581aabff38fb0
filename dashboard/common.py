"""What every page shares: the workspace, cached reads through `esm3.metrics.queries`,
the refresh interval, the run selection, error-tolerant sections and empty states."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import streamlit as st

from esm3.metrics import queries

#: test-only: seconds every data read waits before returning, so browser tests see pages
#: whose figures render late (the race a slow lake or a loaded machine produces)
TEST_DELAY_ENV = "ESM3_DASHBOARD_TEST_DELAY_S"

REFRESH_CHOICES = {"off": 0, "2 s": 2, "5 s": 5, "10 s": 10, "30 s": 30, "1 min": 60}
DEFAULT_REFRESH = "5 s"


def test_delay() -> None:
    """Hold a data read back by $ESM3_DASHBOARD_TEST_DELAY_S seconds (unset: no delay)."""
    seconds = float(os.environ.get(TEST_DELAY_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)


def workspace() -> Path:
    """`--workspace` after `--` on the streamlit command line, else $ESM3_WORKSPACE,
    else ./workspace."""
    if "--workspace" in sys.argv or any(a.startswith("--workspace=") for a in sys.argv):
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--workspace")
        args, _ = parser.parse_known_args(sys.argv[1:])
        if args.workspace:
            return Path(args.workspace).expanduser().resolve()
    return Path(os.environ.get("ESM3_WORKSPACE") or "workspace").expanduser().resolve()


@st.cache_data(max_entries=512, ttl=3600, show_spinner=False)
def _cached(
    ws: str, sig: tuple, name: str, args: tuple, kwargs: tuple, _data: Data
) -> tuple[object, dict[str, str]]:
    # keyed on the lake's fingerprint: results are recomputed as soon as a file lands
    result = getattr(queries, name)(_data.reader, *args, **dict(kwargs))
    return result, dict(_data.reader.bad_files)


class Data:
    """Reads for one page run (or fragment run): one lazily opened `LakeReader`, results
    cached on the lake's fingerprint, unreadable files collected for the page to report."""

    def __init__(self, ws: Path | None = None, *, report: bool = True) -> None:
        self.ws = ws or workspace()
        self.report = report
        self.exists = queries.lake_exists(self.ws)
        self.sig = queries.lake_signature(self.ws) if self.exists else ()
        self._reader: queries.LakeReader | None = None
        self.bad_files: dict[str, str] = {}

    @property
    def reader(self) -> queries.LakeReader:
        if self._reader is None:
            # the pages' queries run under the same limits as the SQL box (memory,
            # threads, spill, time; ESM3_SQL_*), so one page cannot take the server down
            self._reader = queries.LakeReader(self.ws, limits=queries.Limits.from_env())
        return self._reader

    def __call__(self, fn: Callable, *args, **kwargs):
        args = tuple(tuple(a) if isinstance(a, list) else a for a in args)
        kw = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        test_delay()
        result, bad = _cached(str(self.ws), self.sig, fn.__name__, args, kw, self)
        self.bad_files.update(bad)
        return result.copy() if isinstance(result, pd.DataFrame) else result

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> Data:
        # the warning about unreadable files goes above what this block renders
        self._slot = st.empty() if self.report else None
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._slot is not None and self.bad_files:
            with self._slot.container():
                report_bad_files(self.bad_files)


def report_bad_files(bad: dict[str, str]) -> None:
    """A warning naming each lake file that could not be read (the rest still renders)."""
    if not bad:
        return
    lines = "\n".join(f"- `{path}`: {reason}" for path, reason in sorted(bad.items()))
    st.warning(
        f"{len(bad)} corrupt lake file{'s' if len(bad) > 1 else ''} skipped; the figures "
        f"below leave {'them' if len(bad) > 1 else 'it'} out:\n{lines}",
        icon=":material/broken_image:",
    )


def _control_flow(e: BaseException) -> bool:
    return any(
        c.__name__ in ("ScriptControlException", "StopException", "RerunException")
        for c in type(e).__mro__
    )


@contextlib.contextmanager
def section(what: str) -> Iterator[None]:
    """Run one part of a page; if it fails, say so and let the rest of the page render."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - one broken section must not blank the page
        if _control_flow(e):
            raise
        st.error(f"Could not show {what}: {type(e).__name__}: {e}", icon=":material/error:")


def refresh_seconds() -> int:
    """The auto-refresh interval chosen in the sidebar (`?refresh=N` in the URL sets it)."""
    return int(st.session_state.get("refresh_s", REFRESH_CHOICES[DEFAULT_REFRESH]))


def run_every() -> float | None:
    s = refresh_seconds()
    return float(s) if s > 0 else None


def no_lake(ws: Path) -> None:
    st.info(
        f"No metrics yet: `{ws}` has no `lake/` folder.\n\n"
        "The dashboard shows what the suite's jobs write there. Start something, e.g. "
        "`esm3 demo` or `make submit-train`, or point the dashboard at another workspace "
        "with `esm3 dashboard --workspace PATH` (or `ESM3_WORKSPACE=PATH`).",
        icon=":material/info:",
    )


def empty(what: str, hint: str) -> None:
    st.info(f"No {what} yet. {hint}", icon=":material/hourglass_empty:")


def require_training_steps(ws: Path, data: Data, hint: str) -> None:
    """Stop the page with a helpful empty state unless some run has logged steps."""
    if not data.exists:
        no_lake(ws)
        st.stop()
    with section("the run list"):
        runs_available = data(queries.run_ids_with_steps)
    if not runs_available:
        empty("training steps", hint)
        st.stop()


def pick_runs(data: Data, label: str = "Runs", key: str = "runs", default_n: int = 2) -> list[str]:
    """A run multiselect shared across pages (the choice survives page switches)."""
    options = data(queries.run_ids_with_steps)
    remembered = [r for r in st.session_state.get("_runs", []) if r in options]
    default = remembered or options[:default_n]
    chosen = st.multiselect(label, options, default=default, key=f"{key}_select")
    st.session_state["_runs"] = list(chosen)
    return list(chosen)


def fmt_int(v) -> str:
    return "–" if v is None or pd.isna(v) else f"{int(v):,}"


def fmt_float(v, digits: int = 3) -> str:
    return "–" if v is None or pd.isna(v) else f"{float(v):.{digits}f}"


def fmt_tokens(v) -> str:
    """Tokens with a unit: 1.57M, 54.6B, 1.2T."""
    if v is None or pd.isna(v):
        return "–"
    v = float(v)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:,.4g}{unit}"
    return f"{v:,.0f}"
