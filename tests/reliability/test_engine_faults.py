"""The in-process engine's faults (issue 12): adapter reloads under steady traffic, tokenizers shared between
threads, incremental text on the real model, and CPU serving on a GPU machine. The scheduler's own failure
paths are unit-tested on a scripted model in tests/serve/test_scheduler.py."""

from __future__ import annotations

import copy
import random
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

from serve.engines.base import Finished, GenRequest, SamplingParams
from tests.reliability.test_registry_faults import ADMIN_KEY, admin_states, complete, make_run, start_stack
from tests.serve.test_scheduler import ScriptedEngine, outcome

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


# -- a re-published adapter under steady traffic -------------------------------------------------------
def _steady(url: str, stop: threading.Event, seen: list[int], seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):  # bounded in count as well as by the stop event
        if stop.is_set():
            return
        r = complete(url, "chef", "The menu", max_tokens=rng.randint(16, 48), ignore_eos=True)
        seen.append(r.status_code)


def _answer(url: str, model: str) -> str | None:
    r = complete(url, model, "Soup of the day is")
    return r.json()["choices"][0]["text"] if r.status_code == 200 else None


def test_republish_under_steady_traffic_reloads_and_admin_answers(tiny_model, tmp_path):
    """8 clients keep 4 batch slots busy with the adapter while a new version is published: the watcher
    swaps it within a bounded time, the admin API answers meanwhile, and the new version serves."""
    stack = start_stack(tiny_model, tmp_path, {"chef": 1, "other": 2}, poll_seconds=0.05, max_batch=4)
    stop, seen = threading.Event(), []
    clients = [threading.Thread(target=_steady, args=(stack.url, stop, seen, i), daemon=True) for i in range(8)]
    try:
        v1 = _answer(stack.url, "chef")
        for c in clients:
            c.start()
        while len(seen) < 8:  # traffic is flowing (bounded: each request ends within its timeout)
            time.sleep(0.05)
        stack.registry.publish_run(make_run(tiny_model, tmp_path / "runs" / "chef-v2", 3), "chef")
        deadline, served = time.monotonic() + 30, False
        while not served and time.monotonic() < deadline:
            assert "chef" in admin_states(stack.url)  # the admin API answers while the swap is pending
            r = httpx.post(f"{stack.url}/admin/adapters/other/load", headers=ADMIN, timeout=10)
            assert r.status_code == 200  # a load of another adapter does not queue behind the swap
            v2 = _answer(stack.url, "chef@v2")
            served = v2 is not None and _answer(stack.url, "chef") == v2
        assert served, "the re-published adapter was not serving within 30 s of steady traffic"
        assert v2 != v1, "precondition: the two versions answer differently"
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=60)
        stack.stop()
    assert seen and set(seen) == {200}, "requests during the swap must not fail"


# -- one tokenizer, many threads -----------------------------------------------------------------------
class OverlapProbe:
    """A real tokenizer that notes when two threads are inside it at once: the pattern that makes a fast
    tokenizer raise "Already borrowed". A deep copy is a separate object, watched on its own."""

    def __init__(self, inner, overlaps: list[str]):
        self.inner, self.overlaps = inner, overlaps
        self.pad_token_id = inner.pad_token_id
        self._inside = 0
        self._lock = threading.Lock()

    @contextmanager
    def _using(self):
        with self._lock:
            self._inside += 1
            if self._inside > 1:
                self.overlaps.append(threading.current_thread().name)
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1

    def __call__(self, *args, **kw):
        with self._using():
            return self.inner(*args, **kw)

    def apply_chat_template(self, *args, **kw):
        with self._using():
            return self.inner.apply_chat_template(*args, **kw)

    def decode(self, *args, **kw):
        with self._using():
            return self.inner.decode(*args, **kw)

    def __len__(self) -> int:
        return len(self.inner)

    def __deepcopy__(self, memo) -> "OverlapProbe":
        return OverlapProbe(copy.deepcopy(self.inner, memo), self.overlaps)


def _prompt(rng: random.Random) -> str:
    words = ["soup", "crème brûlée", "日本語", "\N{POT OF FOOD}", "menu", "chef's", "ñandú", "\n"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(200, 1500)))


def test_http_threads_never_share_the_tokenizer_while_the_engine_decodes(tiny_model):
    from lm.chat import encode_generation_prompt, encode_text
    from lm.loading import load_tokenizer

    hf = load_tokenizer(str(tiny_model))
    overlaps: list[str] = []
    rng = random.Random(0)
    long_reply = [rng.randrange(3, len(hf)) for _ in range(400)]
    prompt = tuple(hf("go", add_special_tokens=False)["input_ids"])
    engine = ScriptedEngine(OverlapProbe(hf, overlaps), {prompt: long_reply}, max_batch=8, max_model_len=1024)
    texts = [_prompt(random.Random(i)) for i in range(32)]
    want = {i: (encode_text(hf, t), encode_generation_prompt(hf, [{"role": "user", "content": t}]))
            for i, t in enumerate(texts)}
    errors, got = [], {}

    def http_thread(i: int) -> None:
        try:
            for _ in range(6):
                got[i] = (engine.tokenize(texts[i]), engine.tokenize_chat([{"role": "user", "content": texts[i]}]))
        except Exception as e:  # "Already borrowed" would land here
            errors.append(f"{type(e).__name__}: {e}")

    try:
        decoding = [GenRequest(list(prompt), None, SamplingParams(max_tokens=400, temperature=0)) for _ in range(4)]
        for r in decoding:
            engine.submit(r)  # the engine thread decodes text all along
        threads = [threading.Thread(target=http_thread, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for r in decoding:
            assert "".join(outcome(r)[0]) == hf.decode(long_reply, skip_special_tokens=True)
    finally:
        engine.shutdown()
    assert not errors, errors[:3]
    assert got == want
    assert not overlaps, f"{len(overlaps)} calls entered a tokenizer another thread was using"


# -- incremental text on the real engine ------------------------------------------------------------------
def test_streamed_text_equals_decoding_the_generated_ids(tiny_model):
    """The tiny random model emits stray byte tokens: characters split, never completed, or special."""
    from serve.engines.torch_engine import TorchEngine

    class Recording(TorchEngine):
        outputs: dict[int, list[int]] = {}

        def _advance(self, row, tok, now):
            done = super()._advance(row, tok, now)
            if done:
                self.outputs[id(row.req)] = list(row.generated)
            return done

    engine = Recording(str(tiny_model), "tiny", max_batch=8, max_model_len=256)
    try:
        prompts = ["Crème brûlée \N{POT OF FOOD}", "日本語のメニュー", "The menu", "ñandú"]
        reqs = [GenRequest(engine.tokenize(p), None, SamplingParams(max_tokens=80, temperature=t, seed=i))
                for i, p in enumerate(prompts) for t in (0.0, 1.0)]
        for r in reqs:
            engine.submit(r)
        for r in reqs:
            texts, _ = outcome(r)
            assert "".join(texts) == engine.tok.decode(engine.outputs[id(r)], skip_special_tokens=True)
    finally:
        engine.shutdown()


# -- the torch engine on a GPU machine ---------------------------------------------------------------------
def test_torch_engine_refuses_a_gpu_machine_and_names_vllm(tiny_model, monkeypatch):
    from serve.engines.torch_engine import GPUHostRefused, TorchEngine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(GPUHostRefused, match="SERVE_BACKEND=vllm"):
        TorchEngine(str(tiny_model), "tiny")
    engine = TorchEngine(str(tiny_model), "tiny", cpu_on_gpu_host=True)  # asked for: serves on the CPU
    try:
        req = GenRequest(engine.tokenize("The menu"), None, SamplingParams(max_tokens=3, temperature=0))
        engine.submit(req)
        assert isinstance(outcome(req)[1], Finished)
    finally:
        engine.shutdown()
