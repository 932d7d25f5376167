"""ONNX fp32 -> int8 (onnxruntime dynamic quantisation), gated by a quality report.

Weights of every MatMul become int8 (per output channel); activations are quantised on the fly.
The report scores fp32 and int8 with the training stage's own evaluation code on the run's data:
perplexity on the validation split (assistant tokens) and the task metric (keyword accuracy /
accuracy) from greedy answers on the eval split. If perplexity rises by more than
`max_ppl_increase` (relative) or the task metric drops by more than `max_metric_drop` points, the
command fails and writes nothing.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from artifacts import Manifest, atomic_dir
from artifacts.checksums import file_checksums
from export.errors import ExportError
from export.ort_model import ONNX_FILE, OrtCausalLM


@dataclass(frozen=True)
class QualityLimits:
    max_ppl_increase: float = 0.05  # the bar: int8 perplexity within +5% of fp32
    max_metric_drop: float = 5.0  # points of the headline task metric (4 rows of the 80-row demo eval set)


def quantize_file(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"],  # Gather (embeddings) stays fp32: no speed-up, some loss
                     extra_options={"MatMulConstBOnly": True})


def _eval_data(onnx_dir: Path, data: Path | None, tok):
    """(validation features, eval examples, labels, max_new_tokens, batch) from the run's config or --data."""
    from train.config import load_config
    from train.data.prepare import prepare
    from train.data.tokenize import tokenize
    from train.errors import UserError

    man = Manifest.read(onnx_dir)
    run = man.extra.get("run")
    overrides = []
    cfg_path = Path(run) / "config.yaml" if run else None
    if data is not None:
        overrides = [f"data.train={data}", "data.validation=null", f"data.eval={data}", "data.validation_fraction=0.5"]
    elif cfg_path is None or not cfg_path.is_file():
        raise ExportError(f"{onnx_dir}: not exported from a training run, so there is no validation set; "
                          "pass --data FILE (chat JSONL) for the quality report")
    try:
        cfg = load_config(cfg_path if cfg_path and cfg_path.is_file() else None, overrides)
        splits = prepare(cfg.data, cfg.training.seed)
    except UserError as e:
        raise ExportError(f"quality data: {e} (pass --data FILE to use another file)") from None
    val, _ = tokenize(tok, splits.validation, cfg.data.max_length)
    examples = splits.eval[: cfg.eval.max_examples or None]
    return val, examples, splits.labels, cfg.eval.max_new_tokens, cfg.eval.batch_size


def quality(model_dir: Path, data_dir: Path, data: Path | None, threads: int = 0) -> dict:
    """Perplexity and task metrics of one ONNX model on the run's data."""
    from train import evaluate
    from train.modeling import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    val, examples, labels, max_new, batch = _eval_data(data_dir, data, tok)
    model = OrtCausalLM(model_dir, threads=threads)
    res, _ = evaluate.score(model, tok, val, examples, labels, max_new, batch)
    res["headline_metric"] = evaluate.headline_metric(res)
    return res


def compare(fp32: dict, int8: dict, limits: QualityLimits) -> dict:
    head = fp32["headline_metric"]
    ppl_increase = int8["val_perplexity"] / fp32["val_perplexity"] - 1
    drop = 100 * (fp32[head] - int8[head])
    reasons = []
    if ppl_increase > limits.max_ppl_increase:
        reasons.append(f"perplexity +{100 * ppl_increase:.1f}% > +{100 * limits.max_ppl_increase:.1f}%")
    if drop > limits.max_metric_drop:
        reasons.append(f"{head} -{drop:.1f} points > -{limits.max_metric_drop:.1f}")
    return {"fp32": fp32, "int8": int8, "perplexity_increase": ppl_increase, "metric": head,
            "metric_drop_points": drop, "limits": limits.__dict__, "ok": not reasons, "reasons": reasons}


def quantize(onnx_dir: Path, out: Path, *, limits: QualityLimits = QualityLimits(), data: Path | None = None,
             replace: bool = False, threads: int = 0) -> dict:
    if out.exists() and not replace:
        raise ExportError(f"{out}: exists; pass --force to replace it")
    src = Manifest.read(onnx_dir)
    if src.method != "onnx":
        raise ExportError(f"{onnx_dir}/manifest.json: method {src.method!r}; quantize takes an fp32 ONNX export")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".int8-") as work:
        work = Path(work)
        t0 = time.time()
        quantize_file(onnx_dir / ONNX_FILE, work / ONNX_FILE)
        seconds = time.time() - t0
        for f in onnx_dir.iterdir():
            if f.is_file() and f.name not in (ONNX_FILE, "manifest.json") and not f.name.startswith(ONNX_FILE):
                shutil.copy2(f, work / f.name)
        man = Manifest(kind="model", name=out.name, method="onnx-int8", base_model=src.base_model,
                       peft_config=src.peft_config, metrics=src.metrics,
                       extra={**src.extra, "source": str(onnx_dir.resolve()),
                              "quantization": {"type": "dynamic", "weights": "int8 per-channel", "ops": ["MatMul"],
                                               "seconds": round(seconds, 1)}})
        man.extra["onnx"] = {**src.extra["onnx"], "parity": None}  # parity was against the fp32 weights
        man.write(work)
        report = compare(quality(onnx_dir, onnx_dir, data, threads), quality(work, onnx_dir, data, threads), limits)
        man.extra["quantization"]["quality"] = report
        if not report["ok"]:
            raise ExportError(f"{onnx_dir}: int8 quality below the limits ({'; '.join(report['reasons'])}); nothing written")
        with atomic_dir(out, replace=replace) as tmp:
            for f in work.iterdir():
                if f.name != "manifest.json":
                    shutil.move(str(f), tmp / f.name)
            man.files = file_checksums(tmp)
            man.write(tmp)
    return {"path": str(out), "quality": report}
