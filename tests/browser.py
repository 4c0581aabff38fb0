"""Shared by the browser tests: the dashboard served on a free localhost port, Debian's
headless Chromium driven by chromedriver through selenium, and waits for what a page shows.
Importing this module skips the importing test module where Chromium or selenium is absent."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dashboard.serve import command
from tests.waiting import wait_for

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
WIDTH = 1400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str, proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"streamlit exited with {proc.returncode}: {log.read_text()}")
    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
        return r.status == 200


@contextlib.contextmanager
def serve_dashboard(ws: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`dashboard.serve.command` on a free localhost port with `env` added; yields the URL
    and the server process once its health endpoint answers, stops it afterwards."""
    port = free_port()
    log_path = ws.parent / f"streamlit-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command(ws, port=port), stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, **env),
        )  # fmt: skip
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


@contextlib.contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """Headless Chromium through chromedriver, with a throwaway profile
    (the `browser` fixture in tests/conftest.py)."""
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


def texts(driver, css: str) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]


def main_text(driver) -> str:
    return "\n".join(texts(driver, '[data-testid="stMain"]'))


def charts_drawn(driver) -> int:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.vega-embed'))"
        ".filter(e => e.querySelector('svg, canvas')).length"
    )


def wait_page(driver, title: str, charts: int = 0, figures=(), timeout: float = 90) -> None:
    """Wait until the page shows its title, `charts` drawn charts and every text in
    `figures`: exactly what the test then asserts, not a proxy for "rendered"."""

    def missing() -> list[str]:
        out = [] if title in texts(driver, "h1") else [f"the title {title!r}"]
        drawn = charts_drawn(driver)
        if drawn < charts:
            out.append(f"{charts - drawn} of {charts} charts")
        body = main_text(driver)
        return out + [repr(f) for f in figures if f not in body]

    wait_for(
        lambda: not missing(),
        timeout,
        lambda: f"page {title!r}; still missing: {', '.join(missing())}",
        ignore=(StaleElementReferenceException,),
    )


def chart_sizes(driver) -> list[list[int]]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.vega-embed svg, .vega-embed canvas'))"
        ".map(e => [e.clientWidth, e.clientHeight])"
    )


def wait_layout_settled(driver, timeout: float = 30) -> None:
    """Charts re-lay out after a window resize: wait until their sizes stop changing."""
    seen: list = [None]

    def settled() -> bool:
        now = chart_sizes(driver)
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
    errors = texts(driver, '[data-testid="stException"]') + texts(
        driver, '[data-testid="stAlertContentError"]'
    )
    assert not errors, errors


def run_sql(driver, sql: str) -> None:
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
