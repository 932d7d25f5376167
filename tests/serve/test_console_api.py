"""The console's HTTP API on real artifacts: a tiny run trained with base-vs-tuned evaluation and retention,
published twice into a real registry and recorded as a fine-tuning job whose publish the gate refused."""

from __future__ import annotations

import io
import json
import time

import pytest
import yaml

from artifacts import Registry, RunDir
from artifacts.finetune import Job, JobSpec, JobStore
from serve.finetune.api import owner_of
from serve.http.app import build_app
from serve.http.keys import digest
from serve.metrics import Metrics
from serve.settings import Settings
from tests.conftest import DEMO_HELDOUT, DEMO_TRAIN, tiny_overrides
from tests.serve.conftest import ADMIN_KEY, API_KEY, base_registry

TUNE_KEY, CHAT_KEY = "tune-only-key-0001", "chat-only-key-0002"
JID = "ftjob-" + "ab" * 12
GOOD_ROW = {"messages": [{"role": "user", "content": "Name a soup."}, {"role": "assistant", "content": "Minestrone."}]}


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """registry (base + `menu` v1, v2 from one evaluated run), a refused job owning that run, a keys file."""
    from train.config import load_config
    from train.recipe import run

    work = tmp_path_factory.mktemp("console-api")
    reg_dir = base_registry(tiny_model, work)
    (work / "train.jsonl").write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:24]) + "\n")
    (work / "eval.jsonl").write_text("\n".join(DEMO_HELDOUT.read_text().splitlines()[:3]) + "\n")
    jobs = JobStore(reg_dir)
    cfg = load_config(None, tiny_overrides(tiny_model, {"train": work / "train.jsonl", "eval": work / "eval.jsonl"},
                                           jobs.run_dir(JID), **{"training.lr": 5e-2, "publish.min_gain": 1000}))
    rd = run(cfg)
    reg = Registry(reg_dir)
    reg.publish_run(rd.root, "menu")
    reg.publish_run(rd.root, "menu")
    jobs.create(Job(JID, "tiny-llama", "file-x", int(time.time()), status="failed", owner=owner_of(API_KEY),
                    error={"code": "publish_gate_refused", "message": "refusing to publish", "param": None},
                    spec=JobSpec("lora", adapter_name="ft-abab", fine_tuned_model="ft:tiny-llama::abab")))
    keys = work / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "tuner", "sha256": digest(TUNE_KEY), "scopes": ["finetune"]},
                                             {"name": "chat", "sha256": digest(CHAT_KEY), "scopes": ["inference"]}]}))
    settings = Settings(registry=reg_dir, api_key=API_KEY, admin_key=ADMIN_KEY, keys_file=str(keys))
    return {"client": build_app(settings, None, Metrics()).test_client(), "registry": reg_dir, "run": rd}


def test_me_names_each_keys_scopes(world):
    c = world["client"]
    assert c.get("/v1/me", headers=auth(TUNE_KEY)).json == {"object": "key", "name": "tuner", "scopes": ["finetune"]}
    assert c.get("/v1/me", headers=auth(API_KEY)).json["scopes"] == ["finetune", "inference"]
    assert c.get("/v1/me", headers=auth(ADMIN_KEY)).json["scopes"] == ["admin", "finetune", "inference"]
    assert c.get("/v1/me").status_code == 401 and c.get("/v1/me", headers=auth("nope-nope-nope")).status_code == 401


def test_the_registry_lists_versions_and_each_ones_evidence_from_the_run(world):
    c, rd = world["client"], world["run"]
    r = c.get("/v1/registry/models", headers=auth(TUNE_KEY))
    assert r.status_code == 200
    entry = next(e for e in r.json["data"] if e["name"] == "menu")
    assert entry == c.get("/v1/registry/models/menu", headers=auth(TUNE_KEY)).json
    assert entry["kind"] == "adapter" and entry["serving_version"] == "v2"
    assert [(v["version"], v["serving"]) for v in entry["versions"]] == [("v1", False), ("v2", True)]
    ev, report = entry["versions"][1]["evidence"], json.loads(RunDir(rd.root).eval.read_text())
    head, ret = report["headline"], report["retention"]
    assert ev["task"] == {"metric": head["metric"], "base": head["base"], "tuned": head["tuned"],
                          "gain": head["gain_points"]}
    assert ev["retention"]["overall"]["base"] == ret["base"] and ev["kl"] == ret["kl"]
    assert set(ev["retention"]["by_category"]) == set(ret["by_category"]) and ret["by_category"]
    lost = [p for p in map(json.loads, rd.retention_predictions.read_text().splitlines())
            if p["base_correct"] and not p["tuned_correct"]]
    assert len(ev["retention"]["lost_examples"]) == min(20, len(lost))
    assert ev["gate"] == {"passed": False, "reasons": ev["gate"]["reasons"], "forced": False, "override_reason": None}
    assert ev["gate"]["reasons"]  # published without a gate: the verdict is measured, and min_gain 1000 refuses


def test_rollback_points_the_name_back_and_only_an_admin_key_may(world):
    c, reg = world["client"], Registry(world["registry"])
    for key, status in ((API_KEY, 403), (TUNE_KEY, 403), (CHAT_KEY, 403), (None, 401)):
        r = c.post("/v1/registry/models/menu/rollback", json={"version": "v1"}, headers=auth(key))
        assert r.status_code == status and r.json["error"]["code"] in ("insufficient_scope", "invalid_api_key")
    assert reg.serving_version("adapters", "menu") == 2
    r = c.post("/v1/registry/models/menu/rollback", json={"version": "v1"}, headers=auth(ADMIN_KEY))
    assert r.status_code == 200 and r.json["serving_version"] == "v1"
    assert reg.serving_version("adapters", "menu") == 1
    for body, status, param in (({"version": "v9"}, 404, "version"), ({"version": "1"}, 400, "version"),
                                ({"version": "v1", "x": 1}, 400, "x"), ([], 400, None)):
        r = c.post("/v1/registry/models/menu/rollback", json=body, headers=auth(ADMIN_KEY))
        assert (r.status_code, r.json["error"]["param"]) == (status, param), r.json
    assert c.post("/v1/registry/models/nope/rollback", json={"version": "v1"},
                  headers=auth(ADMIN_KEY)).status_code == 404
    assert c.get("/v1/registry/models/..", headers=auth(ADMIN_KEY)).status_code in (400, 404)
    assert c.post("/v1/registry/models/menu/rollback", json={"version": "v2"}, headers=auth(ADMIN_KEY)).status_code == 200


def test_the_metrics_series_is_the_runs_log(world):
    c, rd = world["client"], world["run"]
    job = c.get(f"/v1/fine_tuning/jobs/{JID}/metrics", headers=auth(API_KEY)).json["data"]
    version = c.get("/v1/registry/models/menu/versions/v1/metrics", headers=auth(TUNE_KEY)).json["data"]
    assert job == version and len(job) >= 4  # 4 steps, logged each
    logged = [json.loads(x) for x in rd.metrics_log.read_text().splitlines()]
    assert [p["train_loss"] for p in job if p["train_loss"] is not None] == [x["loss"] for x in logged if "loss" in x]
    assert any(p["valid_loss"] is not None for p in job) and [p["step"] for p in job] == sorted({p["step"] for p in job})
    assert c.get("/v1/registry/models/menu/versions/v7/metrics", headers=auth(TUNE_KEY)).status_code == 404


def test_a_refused_jobs_evaluation_and_its_publish_with_a_recorded_override(world):
    c, reg = world["client"], Registry(world["registry"])
    ev = c.get(f"/v1/fine_tuning/jobs/{JID}/evaluation", headers=auth(API_KEY))
    assert ev.status_code == 200 and ev.json["gate"]["passed"] is False and "task gain below min_gain" in ev.json["gate"]["reasons"]
    assert c.get(f"/v1/fine_tuning/jobs/{JID}/evaluation", headers=auth(TUNE_KEY)).status_code == 404  # not its job
    url = f"/v1/fine_tuning/jobs/{JID}/publish"
    assert c.post(url, json={"override_reason": "demo"}, headers=auth(API_KEY)).status_code == 403
    r = c.post(url, json={}, headers=auth(ADMIN_KEY))
    assert r.status_code == 400 and r.json["error"]["code"] == "gate_refused" and "min_gain" in r.json["error"]["message"]
    assert c.post(url, json={"override_reason": "  "}, headers=auth(ADMIN_KEY)).status_code == 400
    r = c.post(url, json={"override_reason": "the demo needs it"}, headers=auth(ADMIN_KEY))
    assert r.status_code == 200 and r.json["status"] == "succeeded" and r.json["fine_tuned_model"] == "ft:tiny-llama::abab"
    gate = reg.manifest("adapters", "ft-abab").extra["gate"]
    assert gate["forced"] and gate["override_reason"] == "the demo needs it"
    after = c.get(f"/v1/fine_tuning/jobs/{JID}/evaluation", headers=auth(API_KEY)).json["gate"]
    assert after == {"passed": False, "reasons": gate["reasons"], "forced": True, "override_reason": "the demo needs it"}
    assert c.post(url, json={"override_reason": "again"}, headers=auth(ADMIN_KEY)).json["error"]["code"] == "not_publishable"
    events = c.get(f"/v1/fine_tuning/jobs/{JID}/events", headers=auth(API_KEY)).json["data"]
    assert "gate overridden: the demo needs it" in events[0]["message"]


def _upload(c, key: str, data: bytes, name: str = "rows.jsonl"):
    return c.post("/v1/files", headers=auth(key), content_type="multipart/form-data",
                  data={"purpose": "fine-tune", "file": (io.BytesIO(data), name)})


def test_preview_cuts_rows_into_the_spans_the_trainer_encodes(world):
    c = world["client"]
    rows = [GOOD_ROW, {"prompt": "Soup?", "completion": "Yes."}]
    f = _upload(c, TUNE_KEY, b"".join(json.dumps(r).encode() + b"\n" for r in rows[:1]) * 3)
    assert f.status_code == 200, f.json
    r = c.get(f"/v1/files/{f.json['id']}/preview?limit=2", headers=auth(TUNE_KEY))
    assert r.status_code == 200 and [x["line"] for x in r.json["data"]] == [1, 2]
    segs = r.json["data"][0]["segments"]
    assert r.json["data"][0]["messages"] == GOOD_ROW["messages"]
    learnt = "".join(s["text"] for s in segs if s["loss"])
    assert "Minestrone." in learnt and "Name a soup." not in learnt
    assert all(s["role"] == "assistant" for s in segs if s["loss"])
    assert any(s["role"] == "user" and "Name a soup." in s["text"] and not s["loss"] for s in segs)
    assert c.get(f"/v1/files/{f.json['id']}/preview?limit=0", headers=auth(TUNE_KEY)).status_code == 400
    assert c.get(f"/v1/files/{f.json['id']}/preview", headers=auth(API_KEY)).status_code == 404  # another key's file
    assert c.get(f"/v1/files/{f.json['id']}/preview", headers=auth(ADMIN_KEY)).status_code == 200  # admin reads all


def test_a_malformed_upload_names_file_line_and_field_and_stores_nothing(world):
    c = world["client"]
    before = c.get("/v1/files", headers=auth(ADMIN_KEY)).json["data"]
    r = _upload(c, TUNE_KEY, json.dumps(GOOD_ROW).encode() + b'\n{"messages": [{"role": "user"}]}\n', "bad.jsonl")
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_file_format"
    assert "bad.jsonl:2: messages[0]" in r.json["error"]["message"]
    assert c.get("/v1/files", headers=auth(ADMIN_KEY)).json["data"] == before


def test_methods_carry_the_trainers_defaults_and_reasons(world):
    from train.config import load_config

    data = world["client"].get("/v1/fine_tuning/methods", headers=auth(TUNE_KEY)).json["data"]
    by_type = {m["type"]: m for m in data}
    assert set(by_type) == {"supervised", "dpo", "reinforcement"} and "beta" in by_type["dpo"]["hyperparameters"]
    cfg = load_config(None, ["method.name=lora"])
    hp = by_type["supervised"]["hyperparameters"]
    assert hp["batch_size"]["default"] == cfg.training.batch_size and hp["batch_size"]["reason"]
    assert hp["learning_rate_multiplier"]["config_default"] == cfg.training.lr
    assert world["client"].get("/v1/fine_tuning/methods", headers=auth(CHAT_KEY)).status_code == 403
