"""The playground page in headless Chromium: loads, streams an answer, switching adapter changes the request."""

from __future__ import annotations

import shutil
import tempfile
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import API_KEY


def _requests_for(server, model: str) -> float:
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    return sum(s.value for s in fams["tunestack_requests"].samples
               if s.name.endswith("_total") and s.labels["model"] == model and s.labels["status"] == "200")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert shutil.which("chromium") and shutil.which("chromedriver"), "make test installs chromium + chromium-driver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def test_playground_streams_and_switches_adapter(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server.url + "/")
    assert "tunestack playground" in browser.title
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(API_KEY)
    browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    temp = browser.find_element(By.ID, "temp")  # the tiny test model's greedy answer is whitespace: sample
    temp.clear()
    temp.send_keys("1")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 3)
    values = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options]
    assert {"tiny-llama", "chef-a"} <= set(values)

    for model in ("chef-a", "tiny-llama"):
        browser.find_element(By.ID, "clear").click()  # a new conversation for each model
        before = _requests_for(server, model)
        Select(browser.find_element(By.ID, "model")).select_by_value(model)
        box = browser.find_element(By.ID, "prompt")
        box.send_keys("What is Korvalo Stew made with?")
        browser.find_element(By.ID, "send").click()
        try:
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f".assistant[data-model='{model}'][data-done='1']"))
        except Exception:
            raise AssertionError("no finished answer; page log: " + browser.find_element(By.ID, "log").text) from None
        answer = browser.find_elements(By.CSS_SELECTOR, f".assistant[data-model='{model}']")[-1].text
        assert answer.startswith(model + ": ") and len(answer) > len(model) + 2, answer
        t0 = time.time()
        while _requests_for(server, model) < before + 1:
            assert time.time() - t0 < 5, f"no request for {model} reached the server"
            time.sleep(0.1)
    assert not browser.find_elements(By.CSS_SELECTOR, ".err")
