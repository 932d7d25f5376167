"""The ONNX Runtime engine behind the same OpenAI API and metrics, through the official SDK."""

from __future__ import annotations

import openai
import pytest
import torch

from artifacts import Registry
from tests.serve.conftest import API_KEY, Server, free_port
from lm.loading import load_model, load_tokenizer

NAME = "chef-int8"


@pytest.fixture(scope="module")
def ort_server(exported, tmp_path_factory):
    reg = tmp_path_factory.mktemp("ort-reg") / "registry"
    Registry(reg).publish_model(exported["onnx"], "chef-onnx")
    Registry(reg).publish_model(exported["int8"], NAME)
    server = Server(reg, {"SERVE_API_KEY": API_KEY, "SERVE_ENGINE": "onnx", "SERVE_MODEL": "chef-onnx",
                          "SERVE_THREADS": "1"}, free_port())
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.stop()


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_lists_the_exported_model(ort_server):
    assert [m.id for m in _client(ort_server).models.list().data] == ["chef-onnx"]


def test_greedy_completion_equals_the_merged_pytorch_model(ort_server, exported):
    prompt = "The house stew"
    got = _client(ort_server).completions.create(model="chef-onnx", prompt=prompt, max_tokens=12, temperature=0)
    tok = load_tokenizer(str(exported["model"]))
    model = load_model(str(exported["model"])).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    want = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert got.choices[0].text == want
    assert got.usage.completion_tokens == len(out[0]) - ids["input_ids"].shape[1]


def test_streaming_chat_and_concurrent_batches(ort_server):
    import concurrent.futures as cf

    client = _client(ort_server)
    chunks = list(client.chat.completions.create(model="chef-onnx", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    single = client.chat.completions.create(model="chef-onnx", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, temperature=0).choices[0].message.content
    assert text == single
    with cf.ThreadPoolExecutor(8) as pool:  # batched together: every answer equals the one-at-a-time answer
        outs = list(pool.map(lambda _: client.chat.completions.create(
            model="chef-onnx", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
            temperature=0).choices[0].message.content, range(8)))
    assert outs == [single] * 8


def test_errors_and_metrics(ort_server):
    import httpx

    client = _client(ort_server)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=NAME, prompt="x", max_tokens=2)  # published, but not the served model
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="chef-onnx", prompt="word " * 600, max_tokens=10)  # beyond 512 positions
    metrics = httpx.get(f"{ort_server.url}/metrics").text
    assert 'tunestack_requests_total{adapter="",model="chef-onnx",status="200"}' in metrics
