"""The dashboard in a real browser: `dashboard.serve.command` on a free localhost port,
each page opened in Debian's headless Chromium (driven by chromedriver through selenium),
screenshots kept under artifacts/screenshots/. Checks: no error element, the page's title
and the seeded figures; a refused SQL statement; live steps appearing while a writer
appends; a corrupt lake file named on the page while the rest renders.

The server holds every data read back by DATA_DELAY_S (the dashboard's test-only delay), so
each page's figures arrive seconds after its frame: every check waits, bounded, for exactly
the texts it asserts (`wait_page`, `tests.waiting.wait_for`)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dashboard import demo_data
from dashboard.common import TEST_DELAY_ENV
from esm3.metrics.lake import LakeWriter
from tests.browser import (
    StaleElementReferenceException,
    assert_no_error,
    run_sql,
    screenshot,
    serve_dashboard,
    texts,
    wait_page,
)
from tests.waiting import pause, wait_for

pytestmark = pytest.mark.browser

STEPS = 300
DATA_DELAY_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("browser") / "ws"
    sims = demo_data.seed(ws, steps=STEPS)
    # every data read is held back: the figures render seconds after the page's frame, so a
    # test that reads the page before its figures are there fails every time, not by chance
    with serve_dashboard(ws, **{TEST_DELAY_ENV: str(DATA_DELAY_S)}) as (url, _):
        yield url, ws, sims


def _page_expectations(sims) -> list[tuple[str, str, int, list[str]]]:
    a, b = sims["train-a"], sims["train-b"]
    return [
        ("", "Overview", 0, [f"{a.last_step:,}", f"{b.last_step:,}", f"{a.last_loss:.3f}"]),
        ("tokens", "Token counts", 4, ["612.2B", "484.4B", "106B"]),
        ("loss", "Loss", 1, [f"{a.last_loss:.3f}", f"{b.last_loss:.3f}"]),
        ("stability", "Stability", 6, ["Spikes", "Rollbacks", "15"]),
        ("jobs", "Jobs", 2, ["12", "mmseqs easy-linclust exited 137"]),
        ("sql", "SQL", 0, ["3 rows"]),
    ]


@pytest.mark.parametrize(
    "index", range(6), ids=["overview", "tokens", "loss", "stability", "jobs", "sql"]
)
def test_page_renders(server, browser, index):
    url, _, sims = server
    path, title, charts, figures = _page_expectations(sims)[index]
    browser.get(f"{url}/{path}?refresh=0")
    wait_page(browser, title, charts, figures)
    assert_no_error(browser)
    screenshot(browser, path or "overview")


def test_sql_refusals(server, browser):
    url, _, _ = server
    browser.get(f"{url}/sql?refresh=0")
    wait_page(browser, "SQL", figures=["3 rows"])
    for sql, says in [
        ("DROP VIEW runs", "refused: DROP statements are not allowed"),
        ("SELECT * FROM read_csv('http://example.com/x.csv')", "external access"),
    ]:
        run_sql(browser, sql)
        wait_for(
            lambda says=says: any(
                says in t for t in texts(browser, '[data-testid="stAlertContentError"]')
            ),
            30,
            f"the refusal {says!r}",
            ignore=(StaleElementReferenceException,),
        )
        assert not texts(browser, '[data-testid="stException"]')
    screenshot(browser, "sql-refused")
    # the catalog is intact: a query still answers
    run_sql(browser, "SELECT count(*) AS n FROM runs")
    wait_page(browser, "SQL", figures=["1 row"], timeout=30)


def test_live_steps_while_a_writer_appends(server, browser):
    url, ws, sims = server
    sim = sims["train-a"]
    browser.get(f"{url}/?refresh=1")
    wait_page(browser, "Overview", figures=[f"{sim.last_step:,}"])
    target = sim.last_step + 40
    wrote: list[int] = []
    failures: list[BaseException] = []

    def writer() -> None:  # a training job logging a step every 50 ms
        try:
            rng = np.random.default_rng(3)
            with LakeWriter(ws, "train_steps", flush_rows=8, flush_seconds=0.5) as w:
                for step in range(sim.last_step + 1, target + 1):
                    w.add(demo_data.step_row("train-a", step, 1, STEPS, rng, False))
                    wrote.append(step)
                    pause(0.05)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failures.append(e)

    t = threading.Thread(target=writer)
    t.start()
    # the page shows an intermediate step while the writer is still going, then the last
    wait_for(
        lambda: (
            any(
                v.replace(",", "").isdigit() and sim.last_step < int(v.replace(",", "")) < target
                for v in texts(browser, '[data-testid="stMetricValue"]')
            )
            or not t.is_alive()
        ),
        60,
        "a new step on the page",
        ignore=(StaleElementReferenceException,),
    )
    t.join(timeout=60)
    assert not t.is_alive() and not failures, failures
    assert wrote[-1] == target  # the writer was never held up by the page's reads
    wait_for(
        lambda: f"{target:,}" in texts(browser, '[data-testid="stMetricValue"]'),
        60,
        f"step {target} on the page",
        ignore=(StaleElementReferenceException,),
    )
    assert_no_error(browser)
    screenshot(browser, "overview-live")


def test_corrupt_file_named_rest_renders(server, browser):
    url, ws, sims = server
    bad = ws / "lake" / "train_steps" / "run_id=train-b" / "part-zz-corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    try:
        browser.get(f"{url}/stability?refresh=0")
        named = str(bad.relative_to(ws))
        wait_page(browser, "Stability", 6, ["Spikes", "Rollbacks"])
        wait_for(
            lambda: any(
                named in w and "corrupt" in w
                for w in texts(browser, '[data-testid="stAlertContentWarning"]')
            ),
            60,
            f"a warning naming {named} as corrupt",
            ignore=(StaleElementReferenceException,),
        )
        assert_no_error(browser)
        screenshot(browser, "stability-corrupt-file")
    finally:
        bad.unlink()
