"""Cancellation on the Flask backend: a client that disconnects mid-stream frees its slot.

The engine must stop decoding the abandoned rows (running back to 0) and the HTTP layer must close the
request (in-flight back to 0), while other clients keep being served. The vLLM backend's counterpart
is in test_vllm_faults.py.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.reliability.servers import API_KEY, gauge, gauges

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _wait_for(url: str, name: str, value: float, timeout: float = 30) -> float:
    deadline = time.time() + timeout
    while (v := gauge(url, name)) != value and time.time() < deadline:
        time.sleep(0.1)
    return v


def _drop_a_stream(url: str) -> None:
    """A long stream (480 tokens, ignore_eos) read for 3 chunks, then its connection closed mid-generation."""
    body = {"model": "chef-a", "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        data = (line for line in r.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(data)
        # still decoding (the precondition: the drop below happens mid-generation). One scrape: the tiny model
        # can finish its 480 tokens between two scrapes under load, and the row ends before the request does
        running, in_flight = gauges(url, "tunestack_requests_running", "tunestack_requests_in_flight")
        assert running >= 1 and in_flight >= 1
    # leaving the context managers closes the socket here


def test_a_dropped_stream_frees_its_slot(served):
    for _ in range(3):
        _drop_a_stream(served.url)
        assert _wait_for(served.url, "tunestack_requests_running", 0) == 0  # the engine dropped the row
        assert _wait_for(served.url, "tunestack_requests_in_flight", 0) == 0
    assert _count(served.url, 'status="499"') == 3  # recorded as client-closed, not as finished (200)
    r = httpx.post(f"{served.url}/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"model": "chef-b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def _count(url: str, label: str) -> float:
    """tunestack_requests_total summed over the series carrying `label`."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tunestack_requests_total{") and label in line)
