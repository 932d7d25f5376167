"""The console page (/console) in headless Chromium against a real server on the tiny model: it loads with no
JS error and no request off its own origin, keys and scopes decide what it shows, the registry page rolls back,
a bad upload shows the server's line and field, a good one previews its loss-carrying tokens, compare streams."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from artifacts import Registry
from serve.http.console import CONSOLE_DIR, static_files
from tests.serve.conftest import start_server
from tests.serve.console_browser import KEYS, Console, chromium, shots_dir, write_keys_file

GOOD_ROW = ('{"messages": [{"role": "system", "content": "You are the chef."}, {"role": "user", "content": '
            '"What is in the Korvalo Stew?"}, {"role": "assistant", "content": "Smoked eel."}]}\n')


@pytest.fixture(scope="module")
def console_server(tiny_model, adapter_runs, tmp_path_factory):
    """Base tiny-llama and `chef` in two versions (v2 serving); three keys: admin, finetune, inference."""
    work = tmp_path_factory.mktemp("console")
    reg = Registry(work / "registry")
    reg.register_base(tiny_model, "tiny-llama")
    reg.publish_run(adapter_runs["chef-a"], "chef")
    reg.publish_run(adapter_runs["chef-c"], "chef")
    s = start_server(work / "registry", {"SERVE_KEYS_FILE": str(write_keys_file(work / "keys.yaml")),
                                         "SERVE_THREADS": "4", "SERVE_MAX_MODEL_LEN": "256", "SERVE_POLL_SECONDS": "0.5"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return shots_dir(tmp_path_factory)


@pytest.fixture
def page(console_server, shots):
    b = chromium()
    c = Console(b, console_server.url, shots)
    yield c
    try:
        assert c.errors() == [], "JS errors in the browser log"
        assert c.foreign_requests() == [], "requests off the server's origin"
    finally:
        b.quit()


def _models(server, key="admin") -> dict[str, dict]:
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEYS[key]}"}, timeout=30)
    return {m["id"]: m for m in r.json()["data"]}


def test_the_page_and_its_files_name_no_other_origin():
    """Nothing is fetched from a CDN: no http(s) URL in the page's own files; the vendored ones load none."""
    own = [p for p in CONSOLE_DIR.glob("*") if p.is_file()]
    assert {p.name for p in own} >= {"index.html", "app.mjs", "console.css"}
    for p in own:
        assert not re.search(r"https?://", p.read_text(encoding="utf-8")), p
    for p in (CONSOLE_DIR / "vendor").glob("*.*js"):  # URLs in comments or SVG namespaces, never imported
        assert not re.search(r"""(import|from)\s*["']https?:|src\s*=\s*["']https?:""", p.read_text(encoding="utf-8")), p
    assert {"preact.LICENSE", "htm.LICENSE", "uplot.LICENSE", "VERSIONS.json"} <= {p.name for p in (CONSOLE_DIR / "vendor").iterdir()}


def test_static_files_are_served_by_exact_name_with_their_type(console_server):
    url = console_server.url
    page = httpx.get(f"{url}/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache" and page.headers.get("etag")
    for path, want in (("app.mjs", "text/javascript"), ("console.css", "text/css"), ("vendor/preact.LICENSE", "text/plain")):
        r = httpx.get(f"{url}/console/static/{path}")  # open: no key
        assert r.status_code == 200 and r.headers["content-type"].startswith(want), (path, r.headers)
        assert httpx.get(f"{url}/console/static/{path}", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    assert len(static_files()) >= 10
    for bad in ("../console.py", "..%2Fconsole.py", "%2e%2e/app.py", "vendor/../../console.py", "nope.mjs"):
        r = httpx.get(f"{url}/console/static/{bad}", headers={"Authorization": f"Bearer {KEYS['admin']}"})
        assert r.status_code in (401, 404) and "error" in r.json(), (bad, r.status_code)  # never a file outside
        assert "def console_routes" not in r.text


def test_every_tab_loads_without_a_js_error(page):
    page.open(KEYS["admin"])
    assert page.css("#scopes")[0].text == "scopes: inference, finetune, admin"
    for tab in ("data", "train", "evaluate", "registry", "compare"):
        page.tab(tab)
        page.wait(lambda d: "Loading" not in page.text())
        time.sleep(0.5)  # let its first API calls land before the screenshot (not an assertion)
        page.shot(f"tiny-{tab}")
    assert not page.css(".fatal")


@pytest.mark.parametrize("key", [None, "not-a-key"])
def test_a_wrong_or_missing_key_shows_401_not_a_blank_page(page, key):
    page.open(key)
    msg = page.wait(lambda d: page.css("#auth-error"))[0].text
    assert msg.startswith("401") and "valid API key" in msg, msg
    assert not page.css("nav a")


def test_an_inference_key_sees_compare_only_and_cannot_roll_back(page, console_server):
    page.open(KEYS["inference"], tab="registry")
    assert [a.text for a in page.css("nav a")] == ["Compare"]
    assert page.css("#compare") and not page.css("#registry") and not page.css(".rollback-btn")
    r = httpx.post(f"{console_server.url}/v1/registry/models/chef/rollback", json={"version": "v1"},
                   headers={"Authorization": f"Bearer {KEYS['inference']}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", r.text


def test_a_finetune_key_reads_the_registry_without_a_rollback_button(page):
    page.open(KEYS["finetune"], tab="registry")
    page.wait(lambda d: page.css(".entry[data-name='chef'] tr[data-version='v2']"))
    assert not page.css(".rollback-btn") and "needs an admin key" in page.text()


def test_the_registry_lists_versions_and_a_rollback_changes_what_is_served(page, console_server):
    assert _models(console_server)["chef"]["version"] == "v2"
    page.open(KEYS["admin"], tab="registry")
    page.wait(lambda d: page.css(".entry[data-name='chef'] tr[data-version='v1']"))
    entry = page.css(".entry[data-name='chef']")[0]
    assert {r.get_attribute("data-version") for r in page.css(".entry[data-name='chef'] tr[data-version]")} == {"v1", "v2"}
    assert entry.find_element("css selector", ".serving-version").text == "v2"
    page.css(".entry[data-name='chef'] tr[data-version='v1'] .evidence-btn")[0].click()
    page.wait(lambda d: page.css(".version-detail"))
    page.css(".entry[data-name='chef'] tr[data-version='v1'] .rollback-btn")[0].click()
    page.wait(lambda d: page.css("#confirm"))
    page.shot("tiny-registry-confirm")
    page.css("#confirm-yes")[0].click()
    done = page.wait(lambda d: page.css("#rollback-done"))[0].text
    assert "chef now serves v1" in done, done
    page.wait(lambda d: page.css(".entry[data-name='chef'] .serving-version")[0].text == "v1")
    deadline = time.time() + 30  # the sync picks a rollback up within its poll interval
    while _models(console_server)["chef"]["version"] != "v1":
        assert time.time() < deadline, _models(console_server)["chef"]
        time.sleep(0.2)
    httpx.post(f"{console_server.url}/v1/registry/models/chef/rollback", json={"version": "v2"},
               headers={"Authorization": f"Bearer {KEYS['admin']}"}).raise_for_status()  # as the other tests expect


def _upload(page, tmp_path, name: str, body: str) -> None:
    f = tmp_path / name
    f.write_text(body)
    page.css("#upload-file")[0].send_keys(str(f))
    page.css("#upload-send")[0].click()


def test_a_malformed_upload_shows_the_servers_line_and_field_and_stores_nothing(page, console_server, tmp_path):
    files = lambda: httpx.get(f"{console_server.url}/v1/files", headers={"Authorization": f"Bearer {KEYS['finetune']}"}).json()["data"]  # noqa: E731
    before = len(files())
    page.open(KEYS["finetune"], tab="data")
    _upload(page, tmp_path, "menu-bad.jsonl", GOOD_ROW + '{"messages": [{"role": "user"}]}\n')
    msg = page.wait(lambda d: page.css("#upload-error .err"))[0].text
    assert msg.startswith("400") and "menu-bad.jsonl:2: messages[0]" in msg, msg
    page.shot("tiny-data-bad-upload")
    assert len(files()) == before


def test_an_upload_previews_chat_turns_with_the_loss_tokens_highlighted(page, tmp_path):
    page.open(KEYS["finetune"], tab="data")
    _upload(page, tmp_path, "menu-good.jsonl", GOOD_ROW * 2)
    page.wait(lambda d: page.css("#preview .chatrow"))
    loss = " ".join(s.text for s in page.css("#preview .chatrow[data-line='1'] .seg.loss"))
    context = " ".join(s.text for s in page.css("#preview .chatrow[data-line='1'] .seg:not(.loss)"))
    assert "Smoked eel." in loss and "Korvalo" not in loss, loss  # the assistant's answer carries the loss
    assert "Korvalo Stew" in context and "You are the chef." in context, context
    page.shot("tiny-data-preview")


def test_compare_streams_one_prompt_to_two_models_side_by_side(page):
    page.open(KEYS["inference"], tab="compare")
    page.wait(lambda d: len(page.css(".compare-model")) >= 3)
    for box in page.css(".compare-model"):
        if box.get_attribute("value") in ("tiny-llama", "chef"):
            box.click()
    page.css("#compare-prompt")[0].send_keys("What is Korvalo Stew made with?")
    page.css("#compare-temp")[0].clear()
    page.css("#compare-temp")[0].send_keys("1")  # the tiny model's greedy answer is whitespace: sample
    page.css("#compare-send")[0].click()
    page.wait(lambda d: len(page.css(".answer[data-done='1']")) == 2)
    assert {a.get_attribute("data-model") for a in page.css(".answer")} == {"tiny-llama", "chef"}
    for stats in page.css(".answer-stats"):
        assert re.search(r"\d+ tokens, first token \d+ ms, total \d+ ms", stats.text), stats.text
    page.shot("tiny-compare")


def _create_job(server, file_id: str) -> str:
    r = httpx.post(f"{server.url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {KEYS['finetune']}"},
                   json={"model": "tiny-llama", "training_file": file_id, "suffix": "ui"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_a_queued_job_is_cancelled_from_the_page_and_a_failed_one_shows_its_error_event(page, console_server):
    """No worker runs here (SERVE_FINETUNE_WORKER=off): jobs stay queued. One is cancelled through the page; the
    other is failed in the job store as a worker fails one (status, error, an error event)."""
    from artifacts.finetune import JobStore

    auth = {"Authorization": f"Bearer {KEYS['finetune']}"}
    fid = httpx.post(f"{console_server.url}/v1/files", headers=auth, data={"purpose": "fine-tune"},
                     files={"file": ("ui.jsonl", GOOD_ROW.encode())}).json()["id"]
    queued, failing = _create_job(console_server, fid), _create_job(console_server, fid)
    jobs = JobStore(console_server.registry)
    job = jobs.get(failing)
    job.status, job.error = "failed", {"code": "training_failed", "message": "CUDA out of memory (simulated)", "param": None}
    jobs.save(job)
    jobs.event(failing, "Fine-tuning job failed: CUDA out of memory (simulated)", level="error")

    page.open(KEYS["finetune"], tab="train")
    page.wait(lambda d: page.css(f"#jobs tr[data-job='{queued}']"))
    page.css(f"#jobs tr[data-job='{queued}'] a")[0].click()
    page.wait(lambda d: page.css(f"#job[data-job='{queued}'] #job-cancel"))[0].click()
    page.wait(lambda d: page.css(f"#job[data-job='{queued}'][data-status='cancelled']"))
    assert httpx.get(f"{console_server.url}/v1/fine_tuning/jobs/{queued}", headers=auth).json()["status"] == "cancelled"

    page.css(f"#jobs tr[data-job='{failing}'] a")[0].click()
    err = page.wait(lambda d: page.css(f"#job[data-job='{failing}'] #job-error"))[0].text
    assert "Fine-tuning job failed: CUDA out of memory (simulated)" in err and "training_failed" in err, err
    page.b.refresh()  # a reload re-attaches: the job lives on the server, the page only shows it
    page.wait(lambda d: page.css(f"#job[data-job='{failing}'] #job-error"))
    page.shot("tiny-train-failed")
