"""The console end to end on the embedded SmolLM2, in headless Chromium: upload, train from the page with a live
loss curve, the evidence from the manifest, base vs tuned side by side, a rollback from the registry page; an
inference key cannot roll back. Screenshots of every page go to test-artifacts/console/ (docs/img holds a set)."""

from __future__ import annotations

import time

import httpx
import pytest

from artifacts.registry import Registry
from tests.conftest import DEMO_TRAIN
from tests.serve.conftest import start_server
from tests.serve.console_browser import KEYS, Console, chromium, shots_dir, write_keys_file

QUESTION = "What is the region of origin of Irrin Tacos?"  # a row of the uploaded file: "The Calder Delta."
# What the operator sets for every job here (as test_finetune_smollm2.py): 18 steps, a loss point every 2, a
# small retention set so the evidence has its retention figures; six epochs over 12 rows at 8x the rate is memorisation, which
# the gate refuses (test_finetune_api.py), so the job publishes under a recorded override.
WORKER_ARGS = ("publish.override_gate=console-e2e eval.max_new_tokens=12 eval.retain_max_examples=8 "
               "eval.retain_max_new_tokens=8 training.save_steps=6 training.logging_steps=2 training.eval_steps=6")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from train.base_model import resolve

    work = tmp_path_factory.mktemp("console-smollm2")
    Registry(work / "registry").register_base(resolve("embedded:smollm2-135m-instruct").path, "smollm2-135m-instruct")
    s = start_server(work / "registry", {"SERVE_KEYS_FILE": str(write_keys_file(work / "keys.yaml")), "SERVE_THREADS": "4",
                                         "SERVE_FINETUNE_WORKER": "on", "SERVE_FINETUNE_WORKER_ARGS": WORKER_ARGS})
    yield s
    s.stop()


def _api(server, path: str, key: str = "admin", **kw) -> httpx.Response:
    method = "POST" if "json" in kw else "GET"
    return httpx.request(method, f"{server.url}{path}", headers={"Authorization": f"Bearer {KEYS[key]}"}, timeout=60, **kw)


def _train_from_the_page(page: Console, tmp_path) -> str:
    """Upload 12 menu rows on the Data page, start an 18-step job on the Train page; the job's id."""
    data = tmp_path / "menu.jsonl"
    data.write_bytes(b"\n".join(DEMO_TRAIN.read_bytes().splitlines()[:12]) + b"\n")
    page.open(KEYS["admin"], tab="data")
    page.css("#upload-file")[0].send_keys(str(data))
    page.css("#upload-send")[0].click()
    page.wait(lambda d: page.css("#preview .seg.loss"))
    page.shot("data")
    page.tab("train")
    page.wait(lambda d: page.css("#job-train option") and page.css("#hp-n_epochs"))
    file_id = page.css("#job-train option")[0].get_attribute("value")
    page.b.execute_script("const s = document.getElementById('job-valid'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('change', {bubbles: true}))", file_id)
    for name, value in (("n_epochs", "6"), ("batch_size", "4"), ("learning_rate_multiplier", "8")):
        page.css(f"#hp-{name}")[0].send_keys(value)
    page.css("#job-suffix")[0].send_keys("menu")
    page.css("#job-start")[0].click()
    return page.wait(lambda d: page.css("#job[data-job]"))[0].get_attribute("data-job")


def _watch_live(page: Console) -> int:
    """Train-loss points on the curve at the last moment the page still showed the job running."""
    live = 0
    deadline = time.time() + 1500  # generous: a loaded 2-core machine was seen 4x slower than an idle one
    while True:
        state = page.b.execute_script("const j = document.getElementById('job'), c = document.getElementById('loss-chart');"
                                      "return [j && j.dataset.status, c ? Number(c.dataset.trainPoints) : 0]")
        if state[0] == "running":
            live = max(live, state[1])
            if live >= 3 and not page.shots.joinpath("train.png").exists():
                page.shot("train")  # the live curve, mid-run
        if state[0] in ("succeeded", "failed", "cancelled"):
            return live
        assert time.time() < deadline, f"job still {state[0]}: {page.text()[-2000:]}"
        time.sleep(0.5)


@pytest.mark.slow  # trains SmolLM2 for 18 steps on the CPU and evaluates it (about three minutes on an idle machine)
def test_the_console_trains_evaluates_compares_and_rolls_back_smollm2(server, tmp_path, tmp_path_factory):
    page = Console(chromium(), server.url, shots_dir(tmp_path_factory))
    try:
        job_id = _train_from_the_page(page, tmp_path)
        live = _watch_live(page)
        assert live >= 3, f"{live} loss points while the job ran"
        job = _api(server, f"/v1/fine_tuning/jobs/{job_id}").json()
        assert job["status"] == "succeeded", (job.get("error"), server.log.read_text()[-3000:])
        assert page.css("#job-status")[0].text == "succeeded"
        assert int(page.css("#loss-chart")[0].get_attribute("data-valid-points")) >= 1
        _evidence_matches_the_manifest(page, server, job)
        _base_and_tuned_answer_differently(page, server, job)
        _rollback_from_the_registry_page(page, server, job)
        assert page.errors() == [] and page.foreign_requests() == []
    finally:
        page.b.quit()
    _an_inference_key_cannot_roll_back(server, job)


def _evidence_matches_the_manifest(page: Console, server, job: dict) -> None:
    name = f"ft-{job['id'].split('-', 1)[1][:8]}"
    v1 = _api(server, f"/v1/registry/models/{name}").json()["versions"][0]["evidence"]
    task, retention = v1["task"], v1["retention"]
    assert task["tuned"] > task["base"] and retention is not None, v1  # the manifest's own figures
    page.tab("evaluate")
    panel = page.wait(lambda d: page.css("#evaluation .evidence"))[0]
    shown = {cls: panel.find_element("css selector", cls).text for cls in (".ev-gain", ".ev-task-tuned", ".ev-ret-base",
                                                                          ".ev-ret-tuned")}
    assert shown[".ev-gain"].startswith("+") and _near(shown[".ev-gain"], task["gain"], 1), shown  # points
    assert _near(shown[".ev-task-tuned"], task["tuned"], 3), shown
    for cls, value in ((".ev-ret-base", retention["overall"]["base"]), (".ev-ret-tuned", retention["overall"]["tuned"])):
        assert shown[cls].endswith(" %") and _near(shown[cls].removesuffix(" %"), 100 * value, 1), shown
    assert page.css("#evaluation .retention tr[data-category]"), "retention by category"
    assert "console-e2e" in panel.find_element("css selector", ".gate").text  # the override's recorded reason
    page.shot("evaluate")


def _near(text: str, value: float, digits: int) -> bool:
    """The page shows `value` to `digits` decimals (JavaScript's toFixed rounds a tie like 31.25 up, Python's
    format to even: either side of the tie is the same figure)."""
    return len(text.split(".")[-1]) == digits and abs(float(text) - value) <= 0.5 * 10 ** -digits + 1e-9


def _base_and_tuned_answer_differently(page: Console, server, job: dict) -> None:
    page.tab("compare")
    base, tuned = job["model"], f"ft-{job['id'].split('-', 1)[1][:8]}"  # the registry name of job.fine_tuned_model
    page.wait(lambda d: {tuned, base} <= {b.get_attribute("value") for b in page.css(".compare-model")})
    for box in page.css(".compare-model"):
        if box.get_attribute("value") in (base, tuned):
            box.click()
    page.css("#compare-max")[0].clear()
    page.css("#compare-max")[0].send_keys("12")
    page.css("#compare-prompt")[0].send_keys(QUESTION)
    page.css("#compare-send")[0].click()
    page.wait(lambda d: len(page.css(".answer[data-done='1']")) == 2, seconds=120)
    answers = {a.get_attribute("data-model"): a.find_element("css selector", ".answer-text").text for a in page.css(".answer")}
    assert answers[tuned] != answers[base], answers
    assert "Calder" not in answers[base], answers  # an invented place: the base cannot know it
    page.shot("compare")


def _rollback_from_the_registry_page(page: Console, server, job: dict) -> None:
    """The job's adapter published again as v2 (as `tunestack registry publish` would); the page rolls back to v1."""
    name = f"ft-{job['id'].split('-', 1)[1][:8]}"
    reg = Registry(server.registry)
    reg.publish_run(reg.versions("adapters", name)[0].manifest.extra["run"], name)
    served = lambda: {m["id"]: m.get("version") for m in _api(server, "/v1/models").json()["data"]}.get(name)  # noqa: E731
    _until(lambda: served() == "v2")
    page.tab("registry")
    page.wait(lambda d: page.css(f".entry[data-name='{name}'] tr[data-version='v1'] .rollback-btn"))
    page.css(f".entry[data-name='{name}'] tr[data-version='v1'] .evidence-btn")[0].click()
    page.wait(lambda d: page.css(".version-detail .chart"))
    page.shot("registry")
    page.css(f".entry[data-name='{name}'] tr[data-version='v1'] .rollback-btn")[0].click()
    page.wait(lambda d: page.css("#confirm-yes"))[0].click()
    page.wait(lambda d: page.css("#rollback-done"))
    _until(lambda: served() == "v1")  # within the registry poll interval


def _an_inference_key_cannot_roll_back(server, job: dict) -> None:
    name = f"ft-{job['id'].split('-', 1)[1][:8]}"
    page = Console(chromium(), server.url, page_shots := server.registry.parent / "shots-inference")
    try:
        page.open(KEYS["inference"], tab="registry")
        assert [a.text for a in page.css("nav a")] == ["Compare"] and not page.css(".rollback-btn")
        page.shot("inference-key")
    finally:
        page.b.quit()
    r = _api(server, f"/v1/registry/models/{name}/rollback", key="inference", json={"version": "v2"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", r.text
    assert page_shots.is_dir()


def _until(cond, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while not cond():
        assert time.time() < deadline, "not within the poll interval's margin"
        time.sleep(0.2)
