"""The dashboard in a real browser: `dashboard.serve.command` on a free localhost port,
each page opened in Debian's headless Chromium (driven by chromedriver through selenium),
screenshots kept under artifacts/screenshots/. Checks: no error element, the page's title
and the seeded figures; a refused SQL statement; live steps appearing while a writer
appends; a corrupt lake file named on the page while the rest renders.

The server holds every data read back by DATA_DELAY_S (the dashboard's test-only delay), so
each page's figures arrive seconds after its frame: every check waits, bounded, for exactly
the texts it asserts (`wait_page`, `tests.waiting.wait_for`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dashboard import demo_data
from dashboard.common import TEST_DELAY_ENV
from dashboard.serve import command
from esm3.metrics.lake import LakeWriter
from tests.waiting import pause, wait_for

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="needs selenium (pip install selenium)"
)
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
STEPS = 300
WIDTH = 1400
DATA_DELAY_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str, proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"streamlit exited with {proc.returncode}: {log.read_text()}")
    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
        return r.status == 200


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("browser") / "ws"
    sims = demo_data.seed(ws, steps=STEPS)
    port = _free_port()
    log_path = ws.parent / "streamlit.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    # every data read is held back: the figures render seconds after the page's frame, so a
    # test that reads the page before its figures are there fails every time, not by chance
    env = dict(os.environ, **{TEST_DELAY_ENV: str(DATA_DELAY_S)})
    proc = subprocess.Popen(command(ws, port=port), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: _healthy(url, proc, log_path), 90, "streamlit's health endpoint",
            ignore=(OSError,),
        )  # fmt: skip
        yield url, ws, sims
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={WIDTH},1200",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _texts(driver, css: str) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]


def _main_text(driver) -> str:
    return "\n".join(_texts(driver, '[data-testid="stMain"]'))


def _charts_drawn(driver) -> int:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.vega-embed'))"
        ".filter(e => e.querySelector('svg, canvas')).length"
    )


def wait_page(driver, title: str, charts: int = 0, figures=(), timeout: float = 90) -> None:
    """Wait until the page shows its title, `charts` drawn charts and every text in
    `figures`: exactly what the test then asserts, not a proxy for "rendered"."""

    def missing() -> list[str]:
        out = [] if title in _texts(driver, "h1") else [f"the title {title!r}"]
        drawn = _charts_drawn(driver)
        if drawn < charts:
            out.append(f"{charts - drawn} of {charts} charts")
        body = _main_text(driver)
        return out + [repr(f) for f in figures if f not in body]

    wait_for(
        lambda: not missing(),
        timeout,
        lambda: f"page {title!r}; still missing: {', '.join(missing())}",
        ignore=(StaleElementReferenceException,),
    )


def _chart_sizes(driver) -> list[list[int]]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.vega-embed svg, .vega-embed canvas'))"
        ".map(e => [e.clientWidth, e.clientHeight])"
    )


def wait_layout_settled(driver, timeout: float = 30) -> None:
    """Charts re-lay out after a window resize: wait until their sizes stop changing."""
    seen: list = [None]

    def settled() -> bool:
        now = _chart_sizes(driver)
        same, seen[0] = now == seen[0], now
        return same

    wait_for(settled, timeout, "the charts to settle at the new window size")


def screenshot(driver, name: str) -> Path:
    """A full-length screenshot of the app's main area."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script(
        "const m = document.querySelector('[data-testid=stMain]');return m ? m.scrollHeight : 1200"
    )
    driver.set_window_size(WIDTH, min(5000, max(900, int(height) + 40)))
    wait_layout_settled(driver)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(WIDTH, 1200)
    assert path.stat().st_size > 10_000
    return path


def assert_no_error(driver) -> None:
    errors = _texts(driver, '[data-testid="stException"]') + _texts(
        driver, '[data-testid="stAlertContentError"]'
    )
    assert not errors, errors


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


def _run_sql(driver, sql: str) -> None:
    box = wait_for(
        lambda: driver.find_elements(By.CSS_SELECTOR, '[data-testid="stTextArea"] textarea'),
        30,
        "the SQL box",
    )[0]
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(sql)
    driver.find_element(By.CSS_SELECTOR, '[data-testid="stFormSubmitButton"] button').click()


def test_sql_refusals(server, browser):
    url, _, _ = server
    browser.get(f"{url}/sql?refresh=0")
    wait_page(browser, "SQL", figures=["3 rows"])
    for sql, says in [
        ("DROP VIEW runs", "refused: DROP statements are not allowed"),
        ("SELECT * FROM read_csv('http://example.com/x.csv')", "external access"),
    ]:
        _run_sql(browser, sql)
        wait_for(
            lambda says=says: any(
                says in t for t in _texts(browser, '[data-testid="stAlertContentError"]')
            ),
            30,
            f"the refusal {says!r}",
            ignore=(StaleElementReferenceException,),
        )
        assert not _texts(browser, '[data-testid="stException"]')
    screenshot(browser, "sql-refused")
    # the catalog is intact: a query still answers
    _run_sql(browser, "SELECT count(*) AS n FROM runs")
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
                for v in _texts(browser, '[data-testid="stMetricValue"]')
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
        lambda: f"{target:,}" in _texts(browser, '[data-testid="stMetricValue"]'),
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
                for w in _texts(browser, '[data-testid="stAlertContentWarning"]')
            ),
            60,
            f"a warning naming {named} as corrupt",
            ignore=(StaleElementReferenceException,),
        )
        assert_no_error(browser)
        screenshot(browser, "stability-corrupt-file")
    finally:
        bad.unlink()
