"""CUDA graphs of the stack (train/fast/graphs.py): the bucketing and padding they rely on, checked on CPU in fp32.

The capture and replay themselves need a GPU (bench/train_profile.py checks them there against the eager step);
here: the padded stack gives the real rows the same outputs and the adapters the same gradients, and a CPU run
asked for graphs says so once and trains eagerly; `training.cuda_graphs` decides whether the step asks.
"""

from __future__ import annotations

import pytest
import torch

from lm.errors import ConfigError
from tests.train.fast.models import rows, tiny
from train.config import help_text, load_config
from train.fast.collate import PaddingFreeCollator
from train.fast.decoder import FusedStep
from train.fast.graphs import Bucket, Inputs, StackGraphs, bucket_for, padded_stack
from train.fast.install import graphs_wanted
from train.fast.plan import model_parts


def test_buckets_pad_tokens_to_the_step_and_leave_room_for_the_padding_document():
    assert bucket_for(8200, 8, 1990) == Bucket(9216, 16, 2048)
    assert bucket_for(9216, 8, 1990) == Bucket(9216, 16, 2048)  # already a multiple: no padding document needed
    assert bucket_for(8200, 16, 300) == Bucket(9216, 32, 1024)  # 17 documents; the padding (1,016) bounds the length
    assert bucket_for(30, 3, 12, step=16) == Bucket(32, 16, 512)
    for tokens in range(1, 5000, 97):
        b = bucket_for(tokens, 5, 40, step=1024)
        assert 0 <= b.tokens - tokens < 1024 and b.max_seqlen >= max(40, b.tokens - tokens)


def test_static_inputs_zero_the_rows_past_a_shorter_step():
    b = Bucket(16, 16, 512)
    long = Inputs(torch.randn(14, 8), torch.randn(14, 1, 4), torch.randn(14, 1, 4), torch.tensor([0, 6, 14], dtype=torch.int32))
    short = Inputs(torch.randn(5, 8), torch.randn(5, 1, 4), torch.randn(5, 1, 4), torch.tensor([0, 5], dtype=torch.int32))
    s = Inputs.empty(b, long)
    s.fill_from(long)
    s.fill_from(short)
    assert torch.equal(s.h[:5], short.h) and not s.h[5:].any() and not s.cos[5:].any() and not s.sin[5:].any()
    assert s.cu.tolist() == [0, 5] + [16] * 15  # the padding document [5, 16), then empty slots


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases reach the padding rows too
def test_padded_stack_gives_the_same_outputs_and_adapter_gradients(arch):
    model = tiny(arch, {"target_modules": "all-linear"})
    step = FusedStep(model, model_parts(model, 256), torch.float32, compile=False)
    b = PaddingFreeCollator()(rows())
    h, cos, sin = step._inputs(b["input_ids"], b["position_ids"])
    params = [p for p in model.parameters() if p.requires_grad]

    def fn(h, cos, sin, cu, n):
        return step._stack(h, cos, sin, cu, n, True)

    ref = fn(h, cos, sin, b["cu_seqlens"], b["max_seqlen"])
    bucket = bucket_for(h.shape[0], b["cu_seqlens"].shape[0] - 1, b["max_seqlen"], step=16)
    assert bucket.tokens > h.shape[0]  # the case has a padding document
    got = padded_stack(fn, Inputs(h, cos, sin, b["cu_seqlens"]), bucket)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    g_out = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, params, g_out)
    g_got = torch.autograd.grad(got, params, g_out)
    for a, e in zip(g_got, g_ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_graphs_asked_for_on_a_cpu_say_why_once_and_train_eagerly(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = tiny("llama", {"target_modules": "all-linear"})
    step = FusedStep(model, model_parts(model, 256), torch.float32, compile=False, graphs=True)
    ref = FusedStep(model, model_parts(model, 256), torch.float32, compile=False)
    b = PaddingFreeCollator()(rows())
    assert step.graphs is None
    assert step(**b).loss.item() == pytest.approx(ref(**b).loss.item(), rel=1e-6)
    notes = [line for line in capsys.readouterr().out.splitlines() if "CUDA graphs" in line]
    assert notes == ["note: CUDA graphs of the fused step off (no CUDA device); the step runs eagerly"]


def test_graphs_leave_cpu_tensors_and_full_fine_tuning_to_the_eager_step():
    model = tiny("llama", {"target_modules": "all-linear"})
    params = [p for p in model.parameters() if p.requires_grad]
    g = StackGraphs(lambda *a: pytest.fail("a CPU step must not be captured"), params)
    x = torch.zeros(4, 8)
    assert g.run(x, x[:, None, :2], x[:, None, :2], torch.tensor([0, 4], dtype=torch.int32), 4) is None
    full = tiny("llama")
    step = FusedStep(full, model_parts(full, 256), torch.float32, compile=False, graphs=True)
    assert step.graphs is None


@pytest.mark.parametrize("setting, on_cuda, checkpointing, wanted", [
    ("auto", True, False, True),
    ("off", True, False, False),  # the A/B arm and escape hatch
    ("auto", False, False, False),  # nothing to capture without CUDA
    ("auto", True, True, False),  # gradient checkpointing recomputes layers outside the captured stack
])
def test_training_cuda_graphs_decides_the_capture(setting, on_cuda, checkpointing, wanted):
    cfg = load_config(None, [f"training.cuda_graphs={setting}", f"training.gradient_checkpointing={checkpointing}"])
    assert graphs_wanted(cfg.training, on_cuda) is wanted


def test_training_cuda_graphs_is_a_validated_config_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  cuda_graphs: off\n")  # YAML 1.1 reads a bare off as false
    assert load_config(p).training.cuda_graphs == "off"
    with pytest.raises(ConfigError, match=r"^config: training.cuda_graphs: 'on'; choose auto, off$"):
        load_config(None, ["training.cuda_graphs=on"])
    assert "training.cuda_graphs = 'auto'" in help_text()
