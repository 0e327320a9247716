"""The app (dd_jax.app) in a subprocess, and its page in headless Chromium from the system packages, driven by
selenium: what tests/test_app.py and scripts/app_screenshot.py share.

Chromium and chromedriver are Debian's (`apt-get install chromium chromium-driver`: /usr/bin/chromium,
/usr/bin/chromedriver); nothing is downloaded (selenium's driver manager is kept offline).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")
PANELS = ("composite", "background", "foreground")  # the page's elem_ids of the three layers shown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """`python -m dd_jax.app` on a free port: its URL, its log (stderr) and the folder it owns."""

    def __init__(self, cwd: str, log: str, args: tuple[str, ...] = (), timeout: float = 300):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}/"
        self.t0 = time.time()
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "dd_jax.app", "--port", str(self.port), *args],
                                         cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        while not (m := re.search(r"^ready: \S+ \(uploads and results in (\S+),", self.text(), re.M)):
            if self.proc.poll() is not None or time.time() - self.t0 > timeout:
                self.stop()
                raise RuntimeError(f"the app did not start (exit {self.proc.returncode}):\n{self.text()}")
            time.sleep(0.5)
        self.workdir, self.startup_s = m.group(1), time.time() - self.t0

    def text(self) -> str:
        with open(self.log) as f:
            return f.read()

    def requests(self) -> list[str]:
        """The app's line per request: `request N: ... K new compilation(s)`."""
        return re.findall(r"^request \d+: .*$", self.text(), re.M)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            return f"no {path}: apt-get install chromium chromium-driver"
    if importlib.util.find_spec("selenium") is None:
        return 'no selenium: pip install -e ".[test]"'
    return None


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator:
    """A headless Chromium (selenium WebDriver) with a fresh profile, quit at the end."""
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's driver manager: never downloads
    from selenium import webdriver  # pylint: disable=g-import-not-at-top
    from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory(prefix="dd_jax_chromium_") as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        try:
            yield driver
        finally:
            driver.quit()


def shown(driver, elem_id: str) -> tuple[str, int, int] | None:
    """(src, natural width, natural height) of the loaded picture in the page's `elem_id`, or None."""
    from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top

    for img in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img"):
        w, h = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
        if w and h:
            return img.get_attribute("src"), w, h
    return None


def decompose(driver, url: str, files: list[str], timeout: float = 120) -> dict[str, tuple[str, int, int]]:
    """Loads the page, uploads `files`, clicks Decompose and waits for the layers: {panel: shown(panel)}."""
    from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
    from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#images input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#images input[type=file]").send_keys("\n".join(files))
    uploaded = "#images a[data-testid=download-link][href*='/gradio_api/file=']"  # a file on the server: its link
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, uploaded)) >= len(files))
    driver.find_element(By.CSS_SELECTOR, "#run").click()
    wait.until(lambda d: all(shown(d, p) for p in PANELS))
    return {p: shown(driver, p) for p in PANELS}
