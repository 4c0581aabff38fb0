"""The dashboard in a real browser: `dashboard.serve.command` on a free localhost port,
each page opened in Debian's headless Chromium (driven by chromedriver through selenium),
screenshots kept under artifacts/screenshots/. Checks: no error element, the page's title
and the seeded figures; a refused SQL statement; live steps appearing while a writer
appends; a corrupt lake file named on the page while the rest renders."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dashboard import demo_data
from dashboard.serve import command
from esm3.metrics.lake import LakeWriter

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
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
STEPS = 300
WIDTH = 1400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("browser") / "ws"
    sims = demo_data.seed(ws, steps=STEPS)
    port = _free_port()
    log = open(ws.parent / "streamlit.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        command(ws, port=port), stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"streamlit did not start: {(ws.parent / 'streamlit.log').read_text()}")
            time.sleep(0.3)
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


def wait_until(cond, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def wait_rendered(driver, title: str, charts: int, timeout: float = 90) -> None:
    """The page's title is shown, the script is done and `charts` charts have drawn."""

    def ready() -> bool:
        if title not in _texts(driver, "h1"):
            return False
        if driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidgetRunningIcon"]'):
            return False
        drawn = driver.execute_script(
            "return Array.from(document.querySelectorAll('.vega-embed'))"
            ".filter(e => e.querySelector('svg, canvas')).length"
        )
        return drawn >= charts

    wait_until(ready, timeout, f"page {title!r} with {charts} charts")


def screenshot(driver, name: str) -> Path:
    """A full-length screenshot of the app's main area."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script(
        "const m = document.querySelector('[data-testid=stMain]');return m ? m.scrollHeight : 1200"
    )
    driver.set_window_size(WIDTH, min(5000, max(900, int(height) + 40)))
    time.sleep(0.5)  # let charts re-layout to the new size
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
    wait_rendered(browser, title, charts)
    assert_no_error(browser)
    body = browser.find_element(By.CSS_SELECTOR, '[data-testid="stMain"]').text
    for figure in figures:
        assert figure in body, f"{figure!r} not on page {title!r}"
    screenshot(browser, path or "overview")


def _run_sql(driver, sql: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, '[data-testid="stTextArea"] textarea')
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(sql)
    driver.find_element(By.CSS_SELECTOR, '[data-testid="stFormSubmitButton"] button').click()


def test_sql_refusals(server, browser):
    url, _, _ = server
    browser.get(f"{url}/sql?refresh=0")
    wait_rendered(browser, "SQL", 0)
    for sql, says in [
        ("DROP VIEW runs", "refused: DROP statements are not allowed"),
        ("SELECT * FROM read_csv('http://example.com/x.csv')", "external access"),
    ]:
        _run_sql(browser, sql)
        wait_until(
            lambda says=says: any(
                says in t for t in _texts(browser, '[data-testid="stAlertContentError"]')
            ),
            30,
            f"the refusal {says!r}",
        )
        assert not _texts(browser, '[data-testid="stException"]')
    screenshot(browser, "sql-refused")
    # the catalog is intact: a query still answers
    _run_sql(browser, "SELECT count(*) AS n FROM runs")
    wait_until(lambda: "1 row" in browser.find_element(By.TAG_NAME, "body").text, 30, "a result")


def test_live_steps_while_a_writer_appends(server, browser):
    url, ws, sims = server
    sim = sims["train-a"]
    browser.get(f"{url}/?refresh=1")
    wait_rendered(browser, "Overview", 0)
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
                    time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failures.append(e)

    t = threading.Thread(target=writer)
    t.start()
    # the page shows an intermediate step while the writer is still going, then the last
    wait_until(
        lambda: (
            any(
                v.replace(",", "").isdigit() and sim.last_step < int(v.replace(",", "")) < target
                for v in _texts(browser, '[data-testid="stMetricValue"]')
            )
            or not t.is_alive()
        ),
        60,
        "a new step on the page",
    )
    t.join(timeout=60)
    assert not t.is_alive() and not failures, failures
    assert wrote[-1] == target  # the writer was never held up by the page's reads
    wait_until(
        lambda: f"{target:,}" in _texts(browser, '[data-testid="stMetricValue"]'),
        60,
        f"step {target} on the page",
    )
    assert_no_error(browser)
    screenshot(browser, "overview-live")


def test_corrupt_file_named_rest_renders(server, browser):
    url, ws, sims = server
    bad = ws / "lake" / "train_steps" / "run_id=train-b" / "part-zz-corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    try:
        browser.get(f"{url}/stability?refresh=0")
        wait_rendered(browser, "Stability", 6)
        warnings = " ".join(_texts(browser, '[data-testid="stAlertContentWarning"]'))
        assert str(bad.relative_to(ws)) in warnings and "corrupt" in warnings
        assert_no_error(browser)
        screenshot(browser, "stability-corrupt-file")
    finally:
        bad.unlink()
