"""The dashboard's SQL box under its limits: a runaway query typed into the real page (headless
Chromium against `dashboard.serve.command`) is stopped at the time limit with a clear message,
and the Streamlit server's resident memory stays near its DuckDB memory limit meanwhile."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dashboard import demo_data
from dashboard.serve import command
from tests.test_dashboard_browser import (  # noqa: F401 - `browser` is a fixture
    StaleElementReferenceException,
    _free_port,
    _healthy,
    _run_sql,
    _texts,
    browser,
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
    port = _free_port()
    log_path = ws.parent / "streamlit.log"
    env = dict(
        os.environ,
        ESM3_SQL_TIMEOUT_S=str(TIMEOUT_S),
        ESM3_SQL_MEMORY=f"{MEMORY_MB}MB",
        ESM3_SQL_TEMP="1GB",
        ESM3_SQL_THREADS="2",
    )
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command(ws, port=port), stdout=log, stderr=subprocess.STDOUT, env=env
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(
                lambda: _healthy(url, proc, log_path), 90, "streamlit's health endpoint",
                ignore=(OSError,),
            )  # fmt: skip
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_runaway_query_in_the_sql_box_is_stopped_within_memory(limited_server, browser):  # noqa: F811
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
    _run_sql(browser, RUNAWAY)
    try:
        wait_for(
            lambda: any(
                f"query stopped after {TIMEOUT_S} s" in t
                for t in _texts(browser, '[data-testid="stAlertContentError"]')
            ),
            TIMEOUT_S + 60,
            "the timeout message on the SQL page",
            ignore=(StaleElementReferenceException,),
        )
    finally:
        done.set()
        sampler.join(timeout=5)
    stopped_after = time.monotonic() - t0
    print(
        f"server RSS {base:.0f} MB before, peak {peak[0]:.0f} MB; stopped after {stopped_after:.1f} s"
    )
    assert peak[0] < base + MEMORY_MB + MARGIN_MB, (base, peak[0])
    assert stopped_after < TIMEOUT_S + 30
    assert proc.poll() is None  # the server lives on and answers the next query
    _run_sql(browser, "SELECT count(*) AS n FROM runs")
    wait_page(browser, "SQL", figures=["1 row"], timeout=30)
