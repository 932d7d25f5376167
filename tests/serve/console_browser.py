"""Headless Chromium driving /console: the browser (with its console and network logs), keys, tabs, screenshots."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import shutil
import tempfile
from pathlib import Path

import yaml

from tests.conftest import ROOT

ARTIFACTS = ROOT / "test-artifacts" / "console"  # screenshots of each page (ignored by git; docs/img holds a set)
KEYS = {"admin": "console-admin-key", "finetune": "console-finetune-key", "inference": "console-inference-key"}
SCOPES = {"admin": ["inference", "finetune", "admin"], "finetune": ["inference", "finetune"], "inference": ["inference"]}


def write_keys_file(path: Path) -> Path:
    """SERVE_KEYS_FILE holding the three test keys by their sha256 (the file never holds a key)."""
    path.write_text(yaml.safe_dump([{"name": k, "sha256": hashlib.sha256(v.encode()).hexdigest(), "scopes": SCOPES[k]}
                                    for k, v in KEYS.items()]))
    return path


def chromium():
    """A headless Chromium that keeps its console log and its network log (performance) for the tests to read."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert shutil.which("chromium") and shutil.which("chromedriver"), "make test installs chromium + chromium-driver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    drv.set_page_load_timeout(30)
    return drv


class Console:
    """One browser on one server's /console; every log line it read is kept for the end-of-test checks."""

    def __init__(self, browser, url: str, shots: Path):
        self.b, self.url, self.shots = browser, url, shots
        self.console_log: list[dict] = []
        self.requests: list[str] = []

    def open(self, key: str | None, tab: str = "") -> None:
        from selenium.webdriver.common.by import By

        self.b.get(f"{self.url}/console#{tab}")
        self.wait(lambda d: d.find_elements(By.ID, "key"))
        box = self.b.find_element(By.ID, "key")
        box.clear()
        if key:
            box.send_keys(key)
        self.b.find_element(By.ID, "key-save").click()
        self.wait(lambda d: d.find_elements(By.ID, "scopes") or d.find_elements(By.ID, "auth-error"))

    def wait(self, cond, seconds: float = 60):
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.b, seconds, poll_frequency=0.2).until(cond)
        except Exception:
            raise AssertionError(f"page never got there; page text:\n{self.text()[-3000:]}\nlog: {self.errors()}") from None

    def tab(self, name: str) -> None:
        from selenium.webdriver.common.by import By

        self.b.find_element(By.ID, f"tab-{name}").click()
        self.wait(lambda d: d.find_elements(By.ID, name))

    def css(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.b.find_elements(By.CSS_SELECTOR, selector)

    def text(self) -> str:
        return self.b.execute_script("return document.body ? document.body.innerText : ''") or ""

    def shot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        w, h = self.b.execute_script("const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]")
        shot = self.b.execute_cdp_cmd("Page.captureScreenshot", {  # the whole page, not only the window
            "format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": w, "height": min(h, 1800), "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, ARTIFACTS / path.name)
        return path

    def read_logs(self) -> None:
        self.console_log += self.b.get_log("browser")
        for entry in self.b.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                self.requests.append(msg["params"]["request"]["url"])

    def errors(self) -> list[dict]:
        """Uncaught JS errors and console.error lines; a failed fetch (source "network", e.g. an expected 401) is
        the server's answer, which the page shows, not a JS error."""
        self.read_logs()
        return [e for e in self.console_log if e["level"] == "SEVERE" and e.get("source") != "network"]

    def foreign_requests(self) -> list[str]:
        self.read_logs()
        # chrome:// pages are the browser's own (its new-tab page before the first get), not the network
        return [u for u in self.requests if u.startswith(("http:", "https:", "ws:", "wss:", "ftp:"))
                and not u.startswith(self.url + "/")]


def shots_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("console-shots")
    print(f"\nconsole screenshots: {d} (copied to {ARTIFACTS})", file=sys.stderr)
    return d
