"""ONNX fp32 -> int8 with onnxruntime.quantization, gated by a quality report.

Two methods, both with weights stored int8 and activations quantised at run time:

  block (default)  MatMulNBits, 8 bits: int8 weights in blocks of 32 along the input dimension,
                   activations quantised per block of 32 at run time (accuracy_level 4, int8 dot
                   products). Per-block scales absorb activation outliers. The tied lm_head gets
                   its own int8 copy. SmolLM2 demo: perplexity +0.0 %, keyword accuracy unchanged.
  dynamic          quantize_dynamic: uint8 per-channel weights, one uint8 scale per activation
                   tensor. A few layers see "massive activations" (SmolLM2: three down_proj inputs
                   at 400-600x the median absolute maximum) that one scale cannot represent, so
                   those MatMuls stay fp32: found on calibration rows from the run's data (input
                   absmax above `outlier_ratio` x the median over all Linear layers), listed in the
                   manifest. Without that, SmolLM2 lost 8.8 points.

The report scores fp32 and int8 with the evaluation training uses (lm/evaluation.py) on the run's data:
perplexity on the validation split (assistant tokens) and the task metric (keyword accuracy /
accuracy) from greedy answers on the eval split. If perplexity rises by more than
`max_ppl_increase` (relative) or the task metric drops by more than `max_metric_drop` points, the
command fails and writes nothing.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from artifacts import Manifest
from export.errors import ExportError
from export.output import commit, copy_side_files
from export.onnx_export import TWO_GB
from lm import evaluation
from lm.data.config import DataConfig, EvalConfig, RunData
from lm.data.prepare import prepare
from lm.errors import UserError
from lm.features import tokenize
from lm.loading import load_model, load_tokenizer
from lm.onnx_runtime import ONNX_FILE, OrtCausalLM


@dataclass(frozen=True)
class QualityLimits:
    max_ppl_increase: float = 0.05  # the bar: int8 perplexity within +5% of fp32
    max_metric_drop: float = 5.0  # points of the headline task metric (4 rows of the 80-row demo eval set)


OUTLIER_RATIO = 50.0  # SmolLM2's massive activations are 90-600x the median; ordinary layers stay below 20x


METHODS = ("block", "dynamic")
DESCRIPTION = {"block": {"weights": "int8, symmetric, blocks of 32 (MatMulNBits)",
                         "activations": "int8 per block of 32 at run time (accuracy_level 4)"},
               "dynamic": {"weights": "uint8 per output channel", "activations": "uint8 per tensor at run time"}}


def quantize_file(src: Path, dst: Path, exclude: list[str] = (), method: str = "block") -> None:
    """block: int8 weights in blocks of 32 (MatMulNBits), activations quantised per block at run time
    (accuracy_level 4: int8 dot products); the tied lm_head gets its own int8 copy.
    dynamic: quantize_dynamic, uint8 per-channel weights and one uint8 scale per activation tensor."""
    if method == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"],  # Gather (embeddings) stays fp32: no speed-up, some loss
                         nodes_to_exclude=list(exclude), extra_options={"MatMulConstBOnly": True})
        return
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node

    model = _untie_transposed_weights(onnx.load(str(src)))
    cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=8)
    q = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=4,
                             nodes_to_exclude=list(exclude), algo_config=cfg)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=q.model.model.ByteSize() > TWO_GB)


def _untie_transposed_weights(model):
    """MatMul(x, Transpose(W)) with W an initializer (a tied lm_head) -> MatMul(x, W^T stored), so it quantises."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in list(model.graph.node):
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if node.op_type == "Transpose" and node.input[0] in inits and perm == [1, 0]:
            w = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name=node.output[0]))
            model.graph.node.remove(node)
    return model


@torch.no_grad()
def activation_outliers(model_dir: Path, features: list[dict], ratio: float = OUTLIER_RATIO,
                        rows: int = 16) -> tuple[list[str], list[tuple[str, int, int]]]:
    """(Linear layers whose input absmax exceeds ratio x the median, every Linear in call order with its shape)."""
    model = load_model(str(model_dir)).eval()
    amax: dict[str, float] = {}
    order: list[tuple[str, int, int]] = []

    def hook(name):
        def fn(mod, inputs, out):
            if name not in amax:
                order.append((name, mod.in_features, mod.out_features))
            amax[name] = max(amax.get(name, 0.0), float(inputs[0].abs().max()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for f in features[:rows]:
        model(input_ids=torch.tensor([f["input_ids"]]))
    for h in handles:
        h.remove()
    if not amax:
        return [], order
    median = statistics.median(amax.values())
    return sorted(n for n, v in amax.items() if v > ratio * median), order


def onnx_nodes_for(onnx_path: Path, order: list[tuple[str, int, int]], names: list[str]) -> list[str]:
    """ONNX MatMul node names of the given Linear modules, matched by call order and verified by weight shape."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    init = {i.name: tuple(i.dims) for i in g.initializer}
    const = [(n.name, init[n.input[1]]) for n in g.node if n.op_type == "MatMul" and n.input[1] in init]
    linears = [(n, (i, o)) for n, i, o in order if n != "lm_head"]
    if [s for _, s in const[:len(linears)]] != [s for _, s in linears]:
        raise ExportError(f"{onnx_path}: cannot match the graph's MatMuls to the model's Linear layers "
                          "(unexpected graph); refusing to guess which layers to keep in fp32")
    return [const[i][0] for i, (n, _) in enumerate(linears) if n in names]


def _run_data(onnx_dir: Path, data: Path | None) -> RunData:
    """The run's own data and eval settings (its config.yaml); --data FILE replaces the data, split half
    validation, half eval."""
    run = Manifest.read(onnx_dir).extra.get("run")
    cfg_path = Path(run) / "config.yaml" if run else None
    has_cfg = cfg_path is not None and cfg_path.is_file()
    if data is None and not has_cfg:
        raise ExportError(f"{onnx_dir}: not exported from a training run, so there is no validation set; "
                          "pass --data FILE (chat JSONL) for the quality report")
    rd = RunData.from_config_yaml(cfg_path) if has_cfg else RunData(DataConfig(), EvalConfig(), seed=0)
    if data is not None:
        rd.data = dataclasses.replace(rd.data, train=str(data), validation=None, eval=str(data), validation_fraction=0.5)
    return rd


def _eval_data(onnx_dir: Path, data: Path | None, tok):
    """(validation features, eval examples, labels, max_new_tokens, batch) from the run's config or --data."""
    try:
        rd = _run_data(onnx_dir, data)
        splits = prepare(rd.data, rd.seed)
    except UserError as e:
        raise ExportError(f"quality data: {e} (pass --data FILE to use another file)") from None
    val, _ = tokenize(tok, splits.validation, rd.data.max_length)
    examples = splits.eval[: rd.eval.max_examples or None]
    return val, examples, splits.labels, rd.eval.max_new_tokens, rd.eval.batch_size


def quality(model_dir: Path, tok, dataset: tuple, threads: int = 0) -> dict:
    """Perplexity and task metrics of one ONNX model on the run's data (as returned by _eval_data)."""
    val, examples, labels, max_new, batch = dataset
    model = OrtCausalLM(model_dir, threads=threads)
    res, _ = evaluation.score(model, tok, val, examples, labels, max_new, batch)
    res["headline_metric"] = evaluation.headline_metric(res)
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
             replace: bool = False, threads: int = 0, outlier_ratio: float = OUTLIER_RATIO,
             method: str = "block") -> dict:
    if method not in METHODS:
        raise ExportError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if out.exists() and not replace:
        raise ExportError(f"{out}: exists; pass --overwrite to replace it")
    src = Manifest.read(onnx_dir)
    if src.method != "onnx":
        raise ExportError(f"{onnx_dir}/manifest.json: method {src.method!r}; quantize takes an fp32 ONNX export")
    tok = load_tokenizer(str(onnx_dir))
    dataset = _eval_data(onnx_dir, data, tok)
    source_model = Path(src.extra.get("source", ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".int8-") as work:
        work = Path(work)
        t0 = time.time()
        kept, exclude = [], []
        if method == "dynamic" and (source_model / "config.json").is_file():  # blocks of 32 absorb outliers
            kept, order = activation_outliers(source_model, dataset[0] or [], outlier_ratio)
            exclude = onnx_nodes_for(onnx_dir / ONNX_FILE, order, kept)
        quantize_file(onnx_dir / ONNX_FILE, work / ONNX_FILE, exclude, method)
        seconds = time.time() - t0
        copy_side_files(onnx_dir, work)
        man = Manifest(kind="model", name=out.name, method="onnx-int8", base_model=src.base_model,
                       peft_config=src.peft_config, metrics=src.metrics,
                       extra={**src.extra, "source": str(onnx_dir.resolve()),
                              "quantization": {"method": method, **DESCRIPTION[method], "ops": ["MatMul"],
                                               "kept_fp32": kept, "outlier_ratio": outlier_ratio,
                                               "seconds": round(seconds, 1)}})
        man.extra["onnx"] = {**src.extra["onnx"], "parity": None}  # parity was against the fp32 weights
        man.write(work)
        report = compare(quality(onnx_dir, tok, dataset, threads), quality(work, tok, dataset, threads), limits)
        man.extra["quantization"]["quality"] = report
        if not report["ok"]:
            raise ExportError(f"{onnx_dir}: int8 quality below the limits ({'; '.join(report['reasons'])}); nothing written")
        commit(work, out, man, replace=replace)
    return {"path": str(out), "quality": report, "kept_fp32": kept}
