"""serve/openai/protocol.py without a model: every parse rule and the param its 400 names, and parse() agreeing with
the generated /openapi.json (a body the spec allows is accepted, one it forbids is a 400), so they cannot drift."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from serve.errors import APIError
from serve.http.openapi import openapi_spec
from serve.openai.protocol import ChatCompletionRequest, CompletionRequest

SPEC = openapi_spec()
M = "base"


def validator(name: str) -> Draft202012Validator:
    """A JSON Schema validator for one component of the served spec (refs resolve inside the spec)."""
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]})


REQUEST_SCHEMA = {cls: validator(cls.__name__) for cls in (CompletionRequest, ChatCompletionRequest)}


def endpoint(body) -> type:
    """The request model a body is for: chat when it carries messages."""
    return ChatCompletionRequest if isinstance(body, dict) and "messages" in body else CompletionRequest


def outcome(body, cls: type | None = None) -> str | None:
    """parse()'s verdict: "ok", or the param its 400 names; and the spec must agree on accept/reject."""
    cls = cls or endpoint(body)
    try:
        cls.parse(body)
        verdict = "ok"
    except APIError as e:
        assert e.status == 400 and e.body()["error"]["type"] == "invalid_request_error"
        assert "\n" not in e.message and e.message, e.message
        verdict = e.param
    assert REQUEST_SCHEMA[cls].is_valid(body) == (verdict == "ok"), (body, verdict)
    return verdict


# -- every rule ---------------------------------------------------------------------------------------------

def test_completion_defaults():
    r = CompletionRequest.parse({"model": M, "prompt": "x"})
    p = r.params
    assert (r.model, r.prompt, r.n, r.stream, r.include_usage, r.max_tokens_given) == (M, "x", 1, False, False, False)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed, p.ignore_eos) == (16, 1.0, 1.0, [], None, False)


def test_chat_defaults_and_messages():
    c = ChatCompletionRequest.parse({"model": M, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "", "name": "ignored"}, {"role": "assistant", "content": []}]})
    assert c.params.max_tokens == 512 and not c.max_tokens_given
    assert c.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": ""},
                          {"role": "assistant", "content": ""}]


def test_null_means_the_default_and_unknown_fields_are_ignored():
    body = {k: None for k in ("max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
                              "stream", "stream_options", "ignore_eos")}
    r = CompletionRequest.parse({"model": M, "prompt": "x", **body, "user": "u", "logit_bias": {"1": 2}, "echo": 3})
    assert (r.prompt, r.n, r.stream, r.include_usage, r.max_tokens_given) == ("x", 1, False, False, False)
    assert (r.params.max_tokens, r.params.temperature, r.params.top_p, r.params.stop) == (16, 1.0, 1.0, [])


@pytest.mark.parametrize("extra,expect", [
    ({"max_tokens": 5}, {"max_tokens": 5, "given": True}),
    ({"max_tokens": 5, "max_completion_tokens": 7}, {"max_tokens": 7, "given": True}),
    ({"max_tokens": 5, "max_completion_tokens": None}, {"max_tokens": 5, "given": True}),
    ({"max_tokens": 4.0}, {"max_tokens": 4}),  # 4.0 is an integer in JSON Schema, so here too
    ({"max_tokens": 1 << 20}, {"max_tokens": 1 << 20}),
    ({"top_p": 0}, {"top_p": 1e-9}),  # "only the most likely token"
    ({"top_p": 1, "temperature": 2}, {"top_p": 1, "temperature": 2}),
    ({"temperature": 0}, {"temperature": 0, "greedy": True}),
    ({"stop": "\n"}, {"stop": ["\n"]}),
    ({"stop": ["a", "", "b", "c"]}, {"stop": ["a", "b", "c"]}),  # empty strings dropped
    ({"stop": ""}, {"stop": []}),
    ({"seed": -3, "ignore_eos": True}, {"seed": -3, "ignore_eos": True}),
    ({"n": 8, "stream": True, "stream_options": {"include_usage": True}}, {"n": 8, "stream": True, "usage": True}),
    ({"stream_options": {"include_usage": None, "other": 1}}, {"usage": False}),
])
def test_accepted_values(extra, expect):
    assert outcome({"model": M, "prompt": "x", **extra}) == "ok"
    r = CompletionRequest.parse({"model": M, "prompt": "x", **extra})
    got = {"max_tokens": r.params.max_tokens, "given": r.max_tokens_given, "top_p": r.params.top_p,
           "temperature": r.params.temperature, "greedy": r.params.greedy, "stop": r.params.stop,
           "seed": r.params.seed, "ignore_eos": r.params.ignore_eos, "n": r.n, "stream": r.stream,
           "usage": r.include_usage}
    assert {k: got[k] for k in expect} == expect
    assert type(r.params.max_tokens) is int and type(r.n) is int


@pytest.mark.parametrize("prompt", ["one", ["one"], " "])
def test_prompt_is_a_string_or_a_list_of_one(prompt):
    assert outcome({"model": M, "prompt": prompt}) == "ok"
    text = CompletionRequest.parse({"model": M, "prompt": prompt}).prompt
    assert text == (prompt if isinstance(prompt, str) else prompt[0])


def c(**fields) -> dict:
    """A valid completion body, with fields over it."""
    return {"model": M, "prompt": "x", **fields}


def chat(*messages, **fields) -> dict:
    """A chat body with these messages."""
    return {"model": M, "messages": list(messages), **fields}


U = {"role": "user", "content": "hi"}
BAD = [  # (body, the param its 400 must name)
    (["not", "an", "object"], None), ("text", None), (None, None), (3, None),
    ({"prompt": "x"}, "model"), (c(model=""), "model"), (c(model=1), "model"), (c(model=None), "model"),
    (c(max_tokens="ten"), "max_tokens"), (c(max_tokens=0), "max_tokens"), (c(max_tokens=(1 << 20) + 1), "max_tokens"),
    (c(max_tokens=True), "max_tokens"), (c(max_tokens=1.5), "max_tokens"),
    (c(max_completion_tokens=0), "max_completion_tokens"), (c(max_completion_tokens=3, max_tokens="x"), "max_tokens"),
    (c(temperature=9), "temperature"), (c(temperature=-0.1), "temperature"), (c(temperature=True), "temperature"),
    (c(temperature="1"), "temperature"), (c(temperature=math.inf), "temperature"),
    (c(top_p=1.01), "top_p"), (c(top_p=False), "top_p"),
    (c(n=0), "n"), (c(n=9), "n"), (c(n=True), "n"), (c(n=2.5), "n"), (c(n="2"), "n"),
    (c(stop=[1, 2]), "stop"), (c(stop=["a"] * 5), "stop"), (c(stop=3), "stop"), (c(stop={"a": "b"}), "stop"),
    (c(seed="1"), "seed"), (c(seed=True), "seed"), (c(seed=1.5), "seed"), (c(seed=1 << 63), "seed"),
    (c(stream="yes"), "stream"), (c(stream=1), "stream"), (c(ignore_eos=1), "ignore_eos"),
    (c(stream_options="x"), "stream_options"), (c(stream_options=[]), "stream_options"),
    (c(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (c(prompt=42), "prompt"), (c(prompt=[]), "prompt"), (c(prompt=["a", "b"]), "prompt"), (c(prompt=[1]), "prompt"),
    (c(prompt=None), "prompt"), ({"model": M}, "prompt"), (c(prompt=""), "prompt"), (c(prompt=[""]), "prompt"),
    ({"model": M, "messages": "hi"}, "messages"), (chat(), "messages"), ({"model": M, "messages": None}, "messages"),
    (chat(None), "messages[0].role"), (chat("hi"), "messages[0].role"),
    (chat({"role": "bot", "content": "x"}), "messages[0].role"), (chat(U, {"content": "x"}), "messages[1].role"),
    (chat({"role": "tool", "content": "x"}), "messages[0].role"), (chat({"role": "user"}), "messages[0].content"),
    (chat({"role": "user", "content": None}), "messages[0].content"),
    (chat({"role": "user", "content": 5}), "messages[0].content"),
    (chat(U, {"role": "user", "content": ["x"]}), "messages[1].content"),
    (chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}), "messages[0].content"),
    (chat({"role": "user", "content": [{"type": "text", "text": 1}]}), "messages[0].content"),
    (chat(U, n=0), "n"), (chat(U, model=""), "model"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[json.dumps(b)[:48] for b, _ in BAD])
def test_rejected_values_are_400_naming_the_param(body, param):
    assert outcome(body) == param


def test_nan_is_refused():
    """json.loads reads NaN; no sampler wants it (JSON Schema cannot say so, and strict JSON has no NaN)."""
    with pytest.raises(APIError) as e:
        CompletionRequest.parse({"model": M, "prompt": "x", "temperature": math.nan})
    assert e.value.param == "temperature"


def test_the_error_message_says_the_rule_and_the_value():
    with pytest.raises(APIError) as e:
        CompletionRequest.parse({"model": M, "prompt": "x", "temperature": 9})
    assert "'temperature'" in e.value.message and "from 0 to 2" in e.value.message and "9" in e.value.message
    with pytest.raises(APIError) as e:
        CompletionRequest.parse({"prompt": "x"})
    assert "'model' is required" in e.value.message
    with pytest.raises(APIError) as e:  # an empty prompt: the engine's own words, so both paths read alike
        CompletionRequest.parse({"model": M, "prompt": ""})
    assert e.value.message == "prompt must not be empty" and e.value.param == "prompt"
    with pytest.raises(APIError) as e:
        CompletionRequest.parse({"model": M, "prompt": ["x" * 10_000, "y"]})
    assert e.value.param == "prompt" and len(e.value.message) < 200  # the value is cut short


# -- spec and parse() agree: every edge, then generated bodies ---------------------------------------------

SCALAR = st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False) | st.text(max_size=3)


def containers(kids: st.SearchStrategy) -> st.SearchStrategy:
    """JSON arrays and objects of these values."""
    return st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3)


JSON = st.recursive(SCALAR, containers, max_leaves=6)


def int_edges(lo: int, hi: int) -> list:
    """The bounds, one past them, and integer look-alikes."""
    return [lo, hi, lo - 1, hi + 1, float(hi), lo + 0.5, True, str(lo), 1e300]


NUM_EDGES = [0, 0.0, -0.0, -0.01, 1, 1.01, 2, 2.01, math.inf, False, "1"]
TEXT_PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=3)}), max_size=2)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                 "content": st.text(max_size=3) | TEXT_PARTS}, optional={"name": JSON})
VALID = {  # plausible valid values of every optional field
    "max_tokens": st.integers(1, 1 << 20), "max_completion_tokens": st.integers(1, 1 << 20),
    "temperature": st.floats(0, 2) | st.integers(0, 2), "top_p": st.floats(0, 1), "n": st.integers(1, 8),
    "seed": st.integers(-(1 << 63), (1 << 63) - 1),
    "stop": st.text(max_size=2) | st.lists(st.text(max_size=2), max_size=4),
    "stream": st.booleans(), "ignore_eos": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}), "user": JSON}
EDGES = {  # values at and just past each rule's edge
    "model": ["", None, 1, ["m"]], "prompt": ["", " ", [], ["a", "b"], [1], [""], ["a"], 1, None, {"text": "x"}],
    "max_tokens": int_edges(1, 1 << 20), "max_completion_tokens": int_edges(1, 1 << 20),
    "temperature": NUM_EDGES, "top_p": NUM_EDGES, "n": int_edges(1, 8), "seed": int_edges(-(1 << 63), (1 << 63) - 1),
    "stop": ["", [""], ["a"] * 4, ["a"] * 5, [1], 2, None], "stream": [None, 1, "true"], "ignore_eos": [None, 0],
    "stream_options": [None, [], {}, {"include_usage": 1}, {"include_usage": None}, {"x": 1}],
    "messages": [[], "hi", ["hi"], [None], [{"role": "tool", "content": "x"}], [{"role": "User", "content": "x"}],
                 [{"content": "x"}], [{"role": "user"}], [{"role": "user", "content": None}],
                 [{"role": "user", "content": ["x"]}], [{"role": "user", "content": [{"type": "image_url"}]}],
                 [{"role": "user", "content": [{"type": "text", "text": 1}]}],
                 [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": []}]]}


@pytest.mark.parametrize("cls,key", [(CompletionRequest, "prompt"), (ChatCompletionRequest, "messages")])
def test_every_edge_is_judged_alike_by_spec_and_parse(cls, key):
    base = {"model": M, "prompt": "x"} if key == "prompt" else chat(U)
    cases = [{**base, f: v} for f in ("model", key, *VALID) if f in EDGES for v in EDGES[f]]
    cases += [chat(U, *v) for v in EDGES["messages"] if isinstance(v, list) and key == "messages"]  # messages[1]
    verdicts = [outcome(body, cls) for body in cases]  # outcome() asserts the agreement
    assert "ok" in verdicts and len(set(verdicts)) > 5


def bodies(key: str, value: st.SearchStrategy) -> st.SearchStrategy:
    """Valid bodies, at most one field moved to an edge of its rule or to any JSON: each verdict has one cause."""
    base = st.fixed_dictionaries({"model": st.just(M), key: value}, optional=VALID)
    fields = ["model", key, *VALID]
    edges = [st.tuples(st.just(f), st.sampled_from(EDGES[f])) for f in [key, *fields] if f in EDGES]  # key: twice
    moves = [st.tuples(st.sampled_from(fields), JSON), *edges]
    return st.tuples(base, st.none() | st.one_of(moves)).map(moved)


def moved(pair: tuple) -> dict:
    """The body, with one field set when a (field, value) was drawn."""
    body, move = pair
    return body if move is None else {**body, move[0]: move[1]}


AGREE = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@AGREE
@given(bodies("prompt", st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), min_size=1,
                                                                   max_size=1)))
def test_completion_bodies_accepted_exactly_when_the_spec_allows(body):
    outcome(body, CompletionRequest)


@AGREE
@given(bodies("messages", st.lists(MESSAGE, min_size=1, max_size=3)))
def test_chat_bodies_accepted_exactly_when_the_spec_allows(body):
    outcome(body, ChatCompletionRequest)
