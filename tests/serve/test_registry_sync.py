"""The registry drives serving: hot publish/unpublish, checks before loading, admin API, metrics."""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from artifacts import Registry
from tests.serve.conftest import ADMIN_KEY, API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _models(server) -> set[str]:
    return {m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]}


def _wait(cond, timeout=2.0) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return time.time() - t0
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


def _complete(server, model: str, n_tokens: int = 6) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": model, "prompt": "The menu", "max_tokens": n_tokens, "temperature": 0})


def test_hot_publish_and_unpublish_while_requests_run(server, registry, adapter_runs):
    reg = Registry(registry)
    with cf.ThreadPoolExecutor(4) as ex:
        busy = [ex.submit(_complete, server, m, 24) for m in ("chef-a", "chef-b", "tiny-llama", "chef-a")]
        reg.publish_run(adapter_runs["chef-c"], "chef-c")
        took = _wait(lambda: "chef-c" in _models(server), timeout=2.0)
        assert _complete(server, "chef-c").status_code == 200
        reg.unpublish("adapters", "chef-c")
        _wait(lambda: "chef-c" not in _models(server), timeout=2.0)
        assert _complete(server, "chef-c").status_code == 404
        assert all(f.result().status_code == 200 for f in busy), "running requests must not be disturbed"
    print(f"\npublish -> servable in {took:.2f}s")


def test_refused_adapter_has_a_reason_and_others_serve(server):
    states = httpx.get(f"{server.url}/admin/adapters", headers=ADMIN).json()["adapters"]
    assert states["big-rank"]["state"] == "refused"
    assert "rank 32 exceeds this server's max LoRA rank 16" in states["big-rank"]["reason"]
    assert states["chef-a"]["state"] == "loaded"
    assert "adapter big-rank refused" in server.log.read_text()


def test_corrupt_adapter_is_refused(server, registry, adapter_runs, tmp_path):
    reg = Registry(registry)
    reg.publish_run(adapter_runs["chef-c"], "chef-corrupt")
    _wait(lambda: "chef-corrupt" in _models(server))
    # Corrupt a published copy in place (a disk error): re-publish detection reloads and refuses it.
    path = registry / "adapters" / "chef-corrupt" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10:] = b"\x00" * 10
    path.unlink()  # break the hard link first: never write through into the run
    path.write_bytes(bytes(data))
    r = httpx.post(f"{server.url}/admin/adapters/chef-corrupt/load", headers=ADMIN)
    assert r.status_code == 422 and "sha256 does not match" in r.json()["reason"]
    assert "chef-corrupt" not in _models(server)
    reg.unpublish("adapters", "chef-corrupt")


def test_admin_unload_and_load(server):
    r = httpx.post(f"{server.url}/admin/adapters/chef-b/unload", headers=ADMIN)
    assert r.status_code == 200 and "chef-b" not in _models(server)
    time.sleep(1.0)  # the registry poll must not bring it back behind the admin's back
    assert "chef-b" not in _models(server)
    r = httpx.post(f"{server.url}/admin/adapters/chef-b/load", headers=ADMIN)
    assert r.status_code == 200 and r.json()["state"] == "loaded" and "chef-b" in _models(server)


@pytest.mark.parametrize("name", ["..%2F..%2Fetc", "%2Fetc%2Fpasswd", "a..b", "not-in-registry"])
def test_admin_never_takes_paths(server, name):
    r = httpx.post(f"{server.url}/admin/adapters/{name}/load", headers=ADMIN)
    assert r.status_code in (400, 404), r.text
    assert "error" in r.json()


def test_admin_needs_its_key(server):
    r = httpx.get(f"{server.url}/admin/adapters", headers=AUTH)  # the API key lacks the admin scope
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert httpx.get(f"{server.url}/admin/adapters").status_code == 401


def test_disconnect_mid_stream_frees_the_slot(server):
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, timeout=30,
                      json={"model": "chef-a", "prompt": "The", "max_tokens": 200, "stream": True}) as r:
        it = r.iter_lines()
        next(it), next(it)
    # Nothing else runs now: the abandoned sequence must leave the batch long before 200 tokens.
    def running() -> float:
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
        return fams["tunestack_requests_running"].samples[0].value
    _wait(lambda: running() == 0, timeout=5)


def test_metrics_by_adapter_and_promtool(server):
    _complete(server, "chef-a")
    text = httpx.get(f"{server.url}/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    reqs = [s for s in fams["tunestack_requests"].samples
            if s.name == "tunestack_requests_total" and s.labels["adapter"] == "chef-a" and s.labels["status"] == "200"]
    assert reqs and reqs[0].value >= 1
    for name in ("tunestack_time_to_first_token_seconds", "tunestack_time_per_output_token_seconds",
                 "tunestack_request_duration_seconds", "tunestack_prompt_tokens", "tunestack_generation_tokens",
                 "tunestack_requests_in_flight", "tunestack_requests_queued", "tunestack_adapters_loaded",
                 "tunestack_adapter_load_duration_seconds", "tunestack_adapter_load_failures"):
        assert name in fams, name
    assert any(s.labels.get("adapter") == "big-rank" for s in fams["tunestack_adapter_load_failures"].samples)
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: .ci/run installs Debian's prometheus package"
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def _text(server, model: str) -> str:
    r = _complete(server, model, 12)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _amplified(run, out):
    """A copy of a run whose LoRA B weights are -40x: the adapter's change reversed and amplified, an adapter that
    answers differently (40x alone kept a tiny run that answers newlines answering newlines)."""
    from safetensors.torch import load_file, save_file

    from artifacts import Manifest

    shutil.copytree(run, out)
    f = out / "adapter" / "adapter_model.safetensors"
    save_file({k: v * -40 if "lora_B" in k else v for k, v in load_file(str(f)).items()}, str(f))
    m = Manifest.read(out)
    m.record_files(out, ["adapter/adapter_model.safetensors"])
    m.write(out)
    return out


def test_versions_rollback_and_pinned_names_while_serving(server, registry, adapter_runs, tmp_path):
    """v1 and v2 of one name: the name serves the latest, name@vN stays pinned, rollback reaches the server."""
    from tunestack.cli import main as tunestack_main

    reg = Registry(registry)
    reg.publish_run(adapter_runs["chef-c"], "chef-ver")
    _wait(lambda: {"chef-ver", "chef-ver@v1"} <= _models(server))
    v1_text = _text(server, "chef-ver")
    reg.publish_run(_amplified(adapter_runs["chef-c"], tmp_path / "loud"), "chef-ver")  # other weights as v2
    _wait(lambda: "chef-ver@v2" in _models(server))
    v2_text = _text(server, "chef-ver@v2")
    assert v1_text != v2_text, "precondition: the two versions answer differently"
    _wait(lambda: _text(server, "chef-ver") == v2_text, timeout=3.0)
    assert _text(server, "chef-ver@v1") == v1_text and _text(server, "chef-ver@v2") == v2_text
    cards = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]}
    assert cards["chef-ver"]["version"] == "v2" and cards["chef-ver@v1"]["version"] == "v1"
    states = httpx.get(f"{server.url}/admin/adapters", headers=ADMIN).json()["adapters"]
    assert states["chef-ver"]["evidence"]["version"] == "v2" and states["chef-ver@v1"]["state"] == "loaded"

    with cf.ThreadPoolExecutor(2) as ex:  # rollback while requests run: none fails, pinned ones keep their version
        pinned = [ex.submit(_text, server, "chef-ver@v2") for _ in range(4)]
        assert tunestack_main(["registry", "rollback", "chef-ver@v1", "--registry", str(registry)]) == 0
        took = _wait(lambda: _text(server, "chef-ver") == v1_text, timeout=3.0)
        assert all(f.result() == v2_text for f in pinned)
    assert _text(server, "chef-ver@v2") == v2_text
    print(f"\nrollback -> served in {took:.2f}s")
    assert tunestack_main(["registry", "rollback", "chef-ver@v7", "--registry", str(registry)]) == 2
    reg.unpublish("adapters", "chef-ver")
    _wait(lambda: not {"chef-ver", "chef-ver@v1", "chef-ver@v2"} & _models(server))
