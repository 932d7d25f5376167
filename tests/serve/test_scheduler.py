"""The continuous-batching scheduler (batching.py) on a scripted model: no weights, each test well under a second.

The fake model reads each row's whole history (prompt + generated tokens) back from its KV cache,
whose keys hold the token ids, and answers the next token of that prompt's script. A row merged,
dropped or trimmed wrongly therefore reads a wrong history and gives wrong text.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from serve.http.app import build_app, set_serving
from serve.openai.backend import EventStream, JSONReply
from serve.engines.base import EngineEvent, Failed, Finished, GenRequest, SamplingParams, TextDelta
from serve.engines.batching import BatchingEngine
from serve.errors import APIError
from serve.metrics import Metrics
from serve.flask_backend.serving import OpenAIServing
from serve.settings import Settings

EOS = 0
TIMEOUT = 5.0  # a request still waiting after this is hanging


class ByteTokenizer:
    """Byte-level like GPT-2/Llama BPE: a token is a byte string; decoding joins them, bad UTF-8 becomes U+FFFD."""

    chat_template = "scripted"
    eos_token = pad_token = "<eos>"
    eos_token_id = pad_token_id = EOS

    def __init__(self) -> None:
        self.pieces: list[bytes] = [b""] + [bytes([b]) for b in range(256)]  # id 0 = EOS, then one id per byte

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def piece(self, piece: str | bytes) -> int:
        """The id of a multi-byte token (added on first use)."""
        raw = piece.encode() if isinstance(piece, str) else piece
        if raw not in self.pieces:
            self.pieces.append(raw)
        return self.pieces.index(raw)

    def pieces_ids(self, *pieces: str | bytes) -> list[int]:
        return [self.piece(p) for p in pieces]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids if i != EOS).decode("utf-8", "replace")

    def __len__(self) -> int:
        return len(self.pieces)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.encode(text)}

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=True, return_dict=True) -> dict:
        return {"input_ids": self.encode("".join(m["content"] for m in messages))}


class ScriptedEngine(BatchingEngine):
    """The real scheduler over a fake forward: `replies` maps a prompt (token ids) to the tokens that follow it."""

    def __init__(self, tok: ByteTokenizer, replies: dict[tuple[int, ...], list[int]], max_batch: int = 4,
                 max_model_len: int = 64, on_step: Callable[[ScriptedEngine, str], None] | None = None,
                 poison: int | None = None, nan: int | None = None):
        self.adapters = {}
        self.replies = replies
        self.on_step = on_step
        self.poison = poison  # a token whose prefill raises
        self.nan = nan  # a token that makes its row's logits NaN (sampling them raises)
        self.steps: list[tuple[str, int]] = []  # (prefill | decode, rows) of each forward
        self._start(tok, "scripted", max_batch, max_model_len, {EOS})

    def load_adapter(self, name: str, path: str) -> None:
        raise ValueError("the scripted engine runs the base model only")  # as OrtEngine: no adapters

    def unload_adapter(self, name: str) -> None:
        return None  # nothing is ever loaded

    def _forward(self, ids, mask, pos, cache, adapters):
        kind = "prefill" if cache is None else "decode"
        self.steps.append((kind, ids.shape[0]))
        if self.on_step:
            self.on_step(self, kind)
        if kind == "prefill" and self.poison is not None and bool((ids == self.poison).any()):
            raise RuntimeError("prefill exploded")
        new = ids.to(torch.float32)[:, None, :, None]  # (B, heads=1, T, dim=1): the keys are the token ids
        if cache is None:
            cache = SimpleNamespace(layers=[SimpleNamespace(keys=new, values=-new) for _ in range(2)])
        else:
            for layer in cache.layers:
                layer.keys, layer.values = torch.cat([layer.keys, new], 2), torch.cat([layer.values, -new], 2)
        logits = torch.full((ids.shape[0], len(self.tok)), -1e9)
        for b in range(ids.shape[0]):
            history = cache.layers[1].keys[b, 0, :, 0][mask[b].bool()].long().tolist()
            logits[b, self._next(history)] = 0.0
            if self.nan in history:
                logits[b] = float("nan")
        return logits, cache

    def _next(self, history: list[int]) -> int:
        for prompt, reply in self.replies.items():
            if tuple(history[:len(prompt)]) == prompt:
                k = len(history) - len(prompt)
                return reply[k] if k < len(reply) else EOS
        raise AssertionError(f"no script continues {history}: the cache holds a wrong history")


@pytest.fixture
def engines():
    """make(tok, replies, ...) -> a running ScriptedEngine, shut down after the test."""
    made: list[ScriptedEngine] = []

    def make(*args, cls=None, **kw) -> ScriptedEngine:
        made.append((cls or ScriptedEngine)(*args, **kw))
        return made[-1]

    yield make
    for e in made:
        e.shutdown()


def request(prompt_ids: list[int], max_tokens: int = 32, **params) -> GenRequest:
    return GenRequest(list(prompt_ids), None, SamplingParams(max_tokens=max_tokens, temperature=0, **params))


def outcome(req: GenRequest) -> tuple[list[str], EngineEvent]:
    """(the texts of the request's TextDeltas, its last event); fails if it hangs."""
    deltas = []
    while True:
        ev = req.events.get(timeout=TIMEOUT)
        if not isinstance(ev, TextDelta):
            return deltas, ev
        deltas.append(ev.text)


def assert_no_more_events(req: GenRequest) -> None:
    with pytest.raises(queue.Empty):
        req.events.get(timeout=0.1)


# -- text: stop strings and UTF-8 ----------------------------------------------------------------
def test_stop_string_split_across_tokens_is_never_emitted(engines):
    tok = ByteTokenizer()
    stop_p, miss_p = tuple(tok.encode("stop?")), tuple(tok.encode("miss?"))
    engine = engines(tok, {stop_p: tok.pieces_ids("Hello ", "EN", "D more", "x"),
                           miss_p: tok.pieces_ids("Hello ", "EN", "VOY")})
    hit, miss = request(stop_p, stop=["END"]), request(miss_p, stop=["END"])
    engine.submit(hit)
    engine.submit(miss)
    assert outcome(hit) == (["Hello "], Finished(0, "stop", 3))  # "EN" was held back, then cut with the stop
    assert outcome(miss) == (["Hello ", "ENVOY"], Finished(0, "stop", 3))  # held back "EN", released with "VOY"


def test_multibyte_character_across_tokens_is_emitted_whole(engines):
    tok = ByteTokenizer()
    prompt = tuple(tok.encode("soup?"))
    soup = "\N{POT OF FOOD}".encode()  # 4 bytes, split over three tokens
    engine = engines(tok, {prompt: tok.pieces_ids("a", soup[:2], soup[2:3], soup[3:], " ok")})
    req = request(prompt)
    engine.submit(req)
    deltas, last = outcome(req)
    assert deltas == ["a", "\N{POT OF FOOD}", " ok"] and last == Finished(0, "stop", 5)
    assert not any("\ufffd" in d for d in deltas)


def test_length_limit_ends_with_length(engines):
    tok = ByteTokenizer()
    prompt = tuple(tok.encode("count"))
    engine = engines(tok, {prompt: tok.encode("12345")})
    req = request(prompt, max_tokens=3)
    engine.submit(req)
    assert outcome(req) == (["1", "2", "3"], Finished(0, "length", 3))


# -- rows joining and leaving the running batch ----------------------------------------------------
def test_rows_join_a_running_batch_and_leave_it(engines):
    tok = ByteTokenizer()
    a, b, c = (tuple(tok.encode(p)) for p in ("A", "Bbbbbbbb", "Cc"))  # different lengths: left padding differs
    joining, late = request(b), request(c)

    def admit_while_decoding(engine: ScriptedEngine, kind: str) -> None:
        if len(engine.steps) == 1:
            engine.submit(joining)  # admitted after a's first decode step
        if len(engine.steps) == 4:
            engine.submit(late)

    engine = engines(tok, {a: tok.encode("alpha-one-two"), b: tok.encode("be"), c: tok.encode("charlie")},
                     on_step=admit_while_decoding)
    first = request(a)
    engine.submit(first)
    assert "".join(outcome(joining)[0]) == "be"  # leaves early: the others' cache rows are re-indexed and trimmed
    assert "".join(outcome(late)[0]) == "charlie"
    texts, last = outcome(first)
    assert "".join(texts) == "alpha-one-two" and last == Finished(0, "stop", 13)
    assert engine.steps[:7] == [("prefill", 1), ("decode", 1), ("prefill", 1), ("decode", 2), ("prefill", 1),
                                ("decode", 3), ("decode", 2)]  # b joins a, c joins both, b leaves
    assert engine.stats().running == 0


def test_cancelled_row_is_dropped_and_frees_its_slot(engines):
    tok = ByteTokenizer()
    long_p, next_p = tuple(tok.encode("long")), tuple(tok.encode("next"))
    doomed = request(long_p, max_tokens=50)

    def cancel(engine: ScriptedEngine, kind: str) -> None:
        if len(engine.steps) == 3:
            doomed.cancelled.set()  # the client left

    engine = engines(tok, {long_p: tok.encode("x" * 50), next_p: tok.encode("ok")}, max_batch=1, on_step=cancel)
    waiting = request(next_p)
    engine.submit(doomed)
    engine.submit(waiting)  # the one slot is taken: it runs once the cancelled row has left
    assert outcome(waiting) == (["o", "k"], Finished(0, "stop", 2))
    assert len(engine.steps) < 10, "the cancelled row must leave at once, not run to 50 tokens"
    while not doomed.events.empty():
        assert isinstance(doomed.events.get(), TextDelta)  # dropped silently: nobody is listening
    assert engine.stats().running == 0


# -- failures ------------------------------------------------------------------------------------
def test_failing_prefill_fails_only_the_poisoned_request(engines):
    tok = ByteTokenizer()
    run_p, bad_p, ok_p = (tuple(tok.encode(p)) for p in ("run", "bad!", "fine"))
    poison = tok.encode("!")[0]
    bad, joining = request(bad_p), request(ok_p)

    def admit_bad(engine: ScriptedEngine, kind: str) -> None:
        if len(engine.steps) == 2:
            engine.submit(bad)  # admitted together with `joining`: one prefill, which raises
            engine.submit(joining)

    engine = engines(tok, {run_p: tok.encode("r" * 20), bad_p: tok.encode("b"), ok_p: tok.encode("fine")},
                     on_step=admit_bad, poison=poison)
    running = request(run_p)
    engine.submit(running)
    assert outcome(bad) == ([], Failed(0, "engine error: prefill exploded"))
    assert_no_more_events(bad)
    # The neighbour is prefilled again on its own, and the running row's cache was never touched.
    assert "".join(outcome(joining)[0]) == "fine"
    texts, last = outcome(running)
    assert "".join(texts) == "r" * 20 and last == Finished(0, "stop", 20)
    after = request(ok_p)  # the engine keeps serving
    engine.submit(after)
    assert "".join(outcome(after)[0]) == "fine"


def test_a_row_that_cannot_be_sampled_fails_alone(engines):
    tok = ByteTokenizer()
    nan_p, ok_p = tuple(tok.encode("nan#")), tuple(tok.encode("ok"))
    engine = engines(tok, {nan_p: tok.encode("x"), ok_p: tok.encode("y" * 6)}, nan=tok.encode("#")[0])
    doomed = GenRequest(list(nan_p), None, SamplingParams(max_tokens=8, temperature=1.0, seed=1))
    fine = request(ok_p)
    engine.submit(fine)
    engine.submit(doomed)
    _, last = outcome(doomed)
    assert isinstance(last, Failed) and last.message.startswith("engine error: ")
    assert outcome(fine)[0] == ["y"] * 6 and engine.stats().running == 0


def test_shutdown_fails_running_waiting_and_later_requests(engines):
    tok = ByteTokenizer()
    slow_p = tuple(tok.encode("slow"))
    started = []

    def stall(engine: ScriptedEngine, kind: str) -> None:
        started.append(kind)
        if len(engine.steps) == 3:
            engine._stop.set()  # shutdown lands mid-generation

    engine = engines(tok, {slow_p: tok.encode("z" * 40)}, max_batch=1, on_step=stall)
    running, waiting = request(slow_p), request(slow_p)
    engine.submit(running)
    engine.submit(waiting)  # no free slot: still queued when the engine stops
    for req in (running, waiting):
        assert outcome(req)[1] == Failed(0, "engine stopped")
    late = request(slow_p)
    engine.submit(late)
    assert outcome(late) == ([], Failed(0, "engine stopped"))
    with pytest.raises(RuntimeError, match="engine stopped"):
        engine._call(lambda: None)  # a command (adapter load) after the end is refused, not left waiting


class _Killed(BaseException):
    """Not an Exception: the loop's step handler does not catch it, the thread ends."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_loop_killed_by_a_base_exception_still_ends_every_request(engines):
    tok = ByteTokenizer()
    prompt = tuple(tok.encode("boom"))

    def die(engine: ScriptedEngine, kind: str) -> None:
        if kind == "decode":
            raise _Killed

    engine = engines(tok, {prompt: tok.encode("abc")}, on_step=die)
    reqs = [request(prompt) for _ in range(3)]
    for r in reqs:
        engine.submit(r)
    for r in reqs:
        assert outcome(r)[1] == Failed(0, "engine stopped")


def test_empty_prompt_never_reaches_the_model(engines):
    tok = ByteTokenizer()
    prompt = tuple(tok.encode("hi"))
    engine = engines(tok, {prompt: tok.encode("yo")})
    empty = request([])
    engine.submit(empty)
    assert outcome(empty) == ([], Failed(0, "prompt must not be empty"))
    assert engine.steps == []
    ok = request(prompt)
    engine.submit(ok)
    assert "".join(outcome(ok)[0]) == "yo"


# -- the serving layer and the app over the scripted engine ----------------------------------------
@pytest.fixture
def serving(engines):
    tok = ByteTokenizer()
    engine = engines(tok, {tuple(tok.encode("The menu")): tok.encode(" is short"),
                           tuple(tok.encode("Hi")): tok.encode("Hello!")})
    return OpenAIServing(engine, None, Metrics())


def _sample(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


def test_empty_completion_prompt_is_a_400(serving):
    with pytest.raises(APIError) as e:
        serving.completions(json.dumps({"model": "scripted", "prompt": ""}).encode())
    assert e.value.status == 400 and e.value.param == "prompt" and e.value.message == "prompt must not be empty"
    m = serving.metrics
    assert _sample(m, "tunestack_requests_total", model="scripted", adapter="", status="400") == 1
    assert _sample(m, "tunestack_requests_in_flight") == 0


def test_unknown_model_is_a_404_labelled_unknown(serving):
    with pytest.raises(APIError) as e:
        serving.completions(b'{"model": "nope", "prompt": "Hi"}')
    assert e.value.status == 404 and e.value.code == "model_not_found"
    assert _sample(serving.metrics, "tunestack_requests_total", model="_unknown", adapter="", status="404") == 1
    assert not serving.is_served("nope") and serving.is_served("scripted")


def test_completion_body(serving):
    reply = serving.completions(b'{"model": "scripted", "prompt": "The menu", "temperature": 0, "n": 2}')
    assert isinstance(reply, JSONReply) and reply.status == 200
    body = reply.body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "scripted"
    assert body["choices"] == [{"index": i, "text": " is short", "logprobs": None, "finish_reason": "stop"}
                               for i in range(2)]
    assert body["usage"] == {"prompt_tokens": 16, "completion_tokens": 18, "total_tokens": 34}
    assert _sample(serving.metrics, "tunestack_generation_tokens_total", model="scripted", adapter="") == 18


def test_chat_stream_chunks(serving):
    reply = serving.chat_completions(json.dumps({"model": "scripted", "messages": [{"role": "user", "content": "Hi"}],
                                                 "temperature": 0, "stream": True,
                                                 "stream_options": {"include_usage": True}}).encode())
    assert isinstance(reply, EventStream)
    chunks = list(reply.events)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    assert text == "Hello!" and chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                              "finish_reason": "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stream_closed_early_is_a_499_and_cancels(serving):
    reply = serving.completions(b'{"model": "scripted", "prompt": "The menu", "temperature": 0, "stream": true}')
    events = reply.events
    assert next(events)["choices"][0]["text"] == " "
    events.close()  # the client went away
    m = serving.metrics
    assert _sample(m, "tunestack_requests_total", model="scripted", adapter="", status="499") == 1
    assert _sample(m, "tunestack_requests_in_flight") == 0


def test_app_frames_the_stream_and_reads_stats(serving):
    app = build_app(Settings(), None, serving.metrics)
    set_serving(app, serving, None)
    c = app.test_client()
    r = c.post("/v1/completions", json={"model": "scripted", "prompt": "The menu", "temperature": 0, "stream": True})
    lines = [line for line in r.data.decode().split("\n\n") if line]
    assert r.mimetype == "text/event-stream" and lines[-1] == "data: [DONE]"
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == " is short"
    assert c.get("/ready").json == {"status": "ready", "adapters": []}
    assert b"tunestack_requests_running 0.0" in c.get("/metrics").data
    assert c.get("/v1/models").json["data"][0]["id"] == "scripted"


# -- incremental text and adapter swaps ------------------------------------------------------------
class CountingTokenizer:
    """A real tokenizer that records how many ids each decode call gets."""

    def __init__(self, inner):
        self.inner = inner
        self.decoded: list[int] = []
        self.pad_token_id = inner.pad_token_id

    def __call__(self, *args, **kw):
        return self.inner(*args, **kw)

    def __len__(self) -> int:
        return len(self.inner)

    def decode(self, ids, **kw) -> str:
        self.decoded.append(len(ids))
        return self.inner.decode(ids, **kw)


def test_incremental_text_equals_whole_decode_and_decoding_is_bounded(engines, tiny_model):
    import random

    from lm.loading import load_tokenizer
    from serve.engines.detokenize import MAX_PENDING

    hf = load_tokenizer(str(tiny_model))  # byte-level BPE: characters beyond ASCII span several tokens
    rng = random.Random(0)
    outs = [hf(t, add_special_tokens=False)["input_ids"] for t in
            ("Soupe à l'oignon, crème brûlée \N{POT OF FOOD} 日本語のメニュー", "ñandú \N{SHALLOW PAN OF FOOD}\N{SHALLOW PAN OF FOOD} Grüße")]
    outs += [[rng.randrange(1, len(hf)) for _ in range(150)] for _ in range(4)]  # stray bytes and special tokens
    prompts = [tuple(hf(f"prompt {i} :", add_special_tokens=False)["input_ids"]) for i in range(len(outs))]
    tok = CountingTokenizer(hf)
    engine = engines(tok, dict(zip(prompts, outs)), max_batch=8, max_model_len=512)
    assert not engine._whole_text
    tok.decoded.clear()
    reqs = [request(p, max_tokens=400) for p in prompts]
    for r in reqs:
        engine.submit(r)
    for r, out in zip(reqs, outs):
        texts, last = outcome(r)
        assert "".join(texts) == hf.decode(out, skip_special_tokens=True)
        assert last == Finished(0, "stop", len(out))
    steps = sum(len(out) + 1 for out in outs)
    assert max(tok.decoded) <= MAX_PENDING + 1, "a step decoded a row's whole output"
    assert sum(tok.decoded) <= 2 * (MAX_PENDING + 1) * steps


class SwappingEngine(ScriptedEngine):
    """The scripted engine with one adapter whose weights a command swaps (what a re-publish does)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.adapters = {"a": "v1"}
        self.swapped_at: int | None = None

    def load_adapter(self, name: str, path: str) -> None:
        self._call(self._swap, name, path, adapter=name)

    def _swap(self, name: str, path: str) -> None:
        self.adapters[name] = path
        self.swapped_at = len(self.steps)


def test_adapter_swap_under_steady_traffic_completes_within_one_generation(engines):
    tok = ByteTokenizer()
    prompt = tuple(tok.encode("q"))
    reply = tok.encode("0123456789")
    sent: list[GenRequest] = []
    swap: list[threading.Thread] = []

    def traffic(engine: SwappingEngine, kind: str) -> None:
        n = len(engine.steps)
        if n < 300:  # a new request on the adapter every step: a running row always uses it
            sent.append(GenRequest(list(prompt), "a", SamplingParams(max_tokens=32, temperature=0)))
            engine.submit(sent[-1])
        if n == 20:
            t = threading.Thread(target=engine.load_adapter, args=("a", "v2"))
            t.start()
            swap.append(t)  # published once started: the test thread may join it at once

    engine = engines(tok, {prompt: reply}, max_batch=16, on_step=traffic, cls=SwappingEngine)
    engine.submit(GenRequest(list(prompt), "a", SamplingParams(max_tokens=32, temperature=0)))
    deadline = time.monotonic() + TIMEOUT
    while not swap and time.monotonic() < deadline:
        time.sleep(0.01)
    swap[0].join(timeout=TIMEOUT)
    assert engine.swapped_at is not None and engine.swapped_at < 20 + 3 * len(reply), engine.swapped_at
    for req in sent:  # held back during the swap, then served: none fails
        assert outcome(req) == ([c for c in "0123456789"], Finished(0, "stop", 10))
    assert engine.adapters["a"] == "v2"
