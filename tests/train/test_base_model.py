"""Resolving the embedded base model: processes sharing the cache convert it once."""

from __future__ import annotations

import threading

import train.base_model as bm


def test_concurrent_first_uses_convert_the_embedded_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESTACK_CACHE", str(tmp_path))
    calls, started = [], threading.Event()

    def fake_convert(src: str, gguf_file: str, target) -> None:  # the real one takes a minute
        calls.append(target)
        started.set()
        threading.Event().wait(0.5)  # the other caller arrives while this one converts
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(bm, "_convert", fake_convert)
    results: list = []
    first = threading.Thread(target=lambda: results.append(bm._convert_embedded("smollm2-135m-instruct")))
    first.start()
    started.wait(10)
    second = threading.Thread(target=lambda: results.append(bm._convert_embedded("smollm2-135m-instruct")))
    second.start()
    first.join(10), second.join(10)
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / "config.json").is_file() and results[0].parent.parent == tmp_path
