"""The dashboard's SQL box under its limits: a runaway query typed into the real page (headless
Chromium against `dashboard.serve.command`) is stopped at the time limit with a clear message,
and the Streamlit server's resident memory stays near its DuckDB memory limit meanwhile."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dashboard import demo_data
from tests.browser import (
    StaleElementReferenceException,
    run_sql,
    serve_dashboard,
    texts,
    wait_page,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.browser

TIMEOUT_S = 8
MEMORY_MB = 400
MARGIN_MB = 600  # Streamlit, pandas and the page's own state
RUNAWAY = (
    "SELECT a.range AS x, b.range AS y FROM range(1000000) a, range(100000) b ORDER BY random()"
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("limits") / "ws"
    demo_data.seed(ws, steps=50)
    limits = dict(
        ESM3_SQL_TIMEOUT_S=str(TIMEOUT_S),
        ESM3_SQL_MEMORY=f"{MEMORY_MB}MB",
        ESM3_SQL_TEMP="1GB",
        ESM3_SQL_THREADS="2",
    )
    with serve_dashboard(ws, **limits) as server:
        yield server


def _stopped_message(browser, says: str, timeout: float) -> str:
    """Wait for an error on the SQL page containing `says`; return it."""
    errors = '[data-testid="stAlertContentError"]'
    found = wait_for(
        lambda: [t for t in texts(browser, errors) if says in t],
        timeout,
        lambda: f"{says!r} on the SQL page (it shows: {texts(browser, errors)})",
        ignore=(StaleElementReferenceException,),
    )
    return found[0]


def test_runaway_query_in_the_sql_box_is_stopped_within_memory(limited_server, browser):
    """A sort of 1e11 random rows: stopped by whichever limit it reaches first (the spill
    space on a fast machine, the time limit on a slow one), the server's RSS bounded."""
    url, proc = limited_server
    browser.get(f"{url}/sql?refresh=0")
    wait_page(browser, "SQL", figures=["rows"])
    base = rss_mb(proc.pid)
    peak = [base]
    done = threading.Event()

    def sample() -> None:  # the server's resident memory, every 50 ms while the query runs
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    run_sql(browser, RUNAWAY)
    try:
        said = _stopped_message(browser, "query stopped", TIMEOUT_S + 60)
    finally:
        done.set()
        sampler.join(timeout=5)
    print(
        f"server RSS {base:.0f} MB before, peak {peak[0]:.0f} MB; "
        f"stopped after {time.monotonic() - t0:.1f} s: {said}"
    )
    assert peak[0] < base + MEMORY_MB + MARGIN_MB, (base, peak[0])
    assert proc.poll() is None  # the server lives on and answers the next query
    run_sql(browser, "SELECT count(*) AS n FROM runs")
    wait_page(browser, "SQL", figures=["1 row"], timeout=30)


def test_a_long_query_is_stopped_at_the_time_limit(limited_server, browser):
    """1e13 products summed: constant memory, far more than TIMEOUT_S of work anywhere, so
    only the watchdog can end it."""
    url, proc = limited_server
    browser.get(f"{url}/sql?refresh=0")
    wait_page(browser, "SQL", figures=["rows"])
    run_sql(browser, "SELECT sum(a.range * b.range) FROM range(10000000) a, range(1000000) b")
    _stopped_message(browser, f"query stopped after {TIMEOUT_S} s", TIMEOUT_S + 60)
    assert proc.poll() is None
