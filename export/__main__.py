"""tunestack export (alias: python -m export) {merge,onnx,quantize,tensorrt,all} ...

    merge RUN                 adapter + base -> RUN/model (verified logits)
    onnx SRC                  run / model folder -> ONNX decoder with KV cache (verified with onnxruntime)
    quantize ONNX_DIR         fp32 ONNX -> int8, gated by a quality report on the run's data
    tensorrt ONNX_DIR         TensorRT engine (needs tensorrt and an NVIDIA GPU)
    all RUN                   merge (if needed) + onnx + quantize (+ publish with --registry)

Publishing one exported folder is `tunestack registry publish DIR --name NAME`.

Bad input exits 2 with one line naming the file and the reason, and writes nothing; a missing
TensorRT/GPU exits 3.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Iterator

from artifacts import GatePolicy, GateRefused, Manifest, ManifestError, Registry, RegistryError
from artifacts.registry import KEEP_VERSIONS


EXTRA = "export"  # the optional dependencies (pyproject) every export command needs


def build_parser(prog: str = "python -m export") -> argparse.ArgumentParser:
    from lm.cli import stage_parser

    return stage_parser(prog, configure)


def configure(ap: argparse.ArgumentParser) -> None:
    """The export command's arguments, on `python -m export`'s parser or on `tunestack export`."""
    from lm.cli import HelpFormatter

    ap.description, ap.formatter_class = __doc__, HelpFormatter
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    m = add("merge", "merge a run's adapter into its base (verified logits)")
    m.add_argument("run", type=Path)
    m.add_argument("--out", type=Path, help="unset: RUN/model")
    m.add_argument("--base", help="base model folder; unset: the one in the run's manifest (sha256 checked)")
    o = add("onnx", "ONNX decoder with KV cache, parity-checked with onnxruntime")
    o.add_argument("src", type=Path, help="a run (with model/), a merged/full model folder, or a base model folder")
    o.add_argument("--out", type=Path, help="unset: RUN/onnx, or SRC-onnx beside a model folder")
    q = add("quantize", "int8 quantisation with a quality report vs fp32")
    q.add_argument("onnx_dir", type=Path)
    q.add_argument("--out", type=Path, help="unset: ONNX_DIR-int8 beside it")
    q.add_argument("--data", type=Path, help="chat JSONL for the report when the export has no run")
    t = add("tensorrt", "TensorRT engine from the ONNX export (needs tensorrt and an NVIDIA GPU)")
    t.add_argument("onnx_dir", type=Path)
    t.add_argument("--out", type=Path, help="unset: ONNX_DIR-tensorrt beside it")
    t.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"), help="engine precision")
    for name, default in (("max-batch", 8), ("max-seq", 2048), ("opt-batch", 4), ("opt-seq", 256)):
        t.add_argument(f"--{name}", type=int, default=default, help="the engine's optimisation profile")
    t.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT's builder workspace")
    a = add("all", "merge + onnx + quantize a run (and publish both exports with --registry)")
    a.add_argument("run", type=Path)
    a.add_argument("--registry", type=Path, help="publish <name>-onnx and <name>-int8 into it; unset: no publish")
    a.add_argument("--name", help="registry name prefix; unset: the run folder's name")
    for sp in (q, a):
        sp.add_argument("--max-ppl-increase", type=float, default=0.05, help="relative perplexity rise allowed (0.05 = +5%%)")
        sp.add_argument("--max-metric-drop", type=float, default=5.0, help="task-metric points allowed to drop")
        sp.add_argument("--method", default="block", choices=("block", "dynamic"), help="block: int8 blocks of 32 "
                        "(MatMulNBits); dynamic: quantize_dynamic with per-tensor activations")
        sp.add_argument("--outlier-ratio", type=float, default=50.0,
                        help="keep fp32 the MatMuls whose input absmax exceeds this x the median (massive activations)")
    for sp in (m, o, q, t, a):
        sp.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    a.add_argument("--override-gate", metavar="REASON", help="publish even if the gate refuses; REASON is recorded "
                   "in the manifest")
    a.add_argument("--min-gain", type=float, default=GatePolicy.min_gain,
                   help="task gain (points over the base, from the run's evaluation) the publish gate requires")
    a.add_argument("--max-retention-drop", type=float, default=GatePolicy.max_retention_drop,
                   help="retention drop (points on the general set) the publish gate allows")
    a.add_argument("--keep", type=int, default=KEEP_VERSIONS, help="versions kept per name; never the one served")
    for sp in (o, q, a):
        sp.add_argument("--threads", type=int, default=0, help="onnxruntime threads; 0 = all cores")


def _merge(run: Path, out: Path | None, base: str | None, overwrite: bool) -> dict:
    from lm.merge import merge_run_adapter
    from export.source import check_base, read_verified

    if not run.exists():
        raise _err(f"{run}: no such run")
    man = read_verified(run)
    if not (run / "adapter").is_dir():
        raise _err(f"{run}: has no adapter/ to merge (method {man.method})")
    if man.method == "prompt_tuning":
        raise _err(f"{run}: prompt tuning adds virtual tokens to every input and cannot be merged into the "
                   "weights; export a lora, dora, ia3 or full run")
    base_path = check_base(man, base)
    out = out or run / "model"
    if out.exists() and not overwrite:
        raise _err(f"{out}: exists; pass --overwrite to replace it")
    return merge_run_adapter(run, str(base_path), out, replace=overwrite)


def _err(msg: str):
    from export.errors import ExportError

    return ExportError(msg)


def _onnx_default(src: Path) -> Path:
    return src / "onnx" if (src / "manifest.json").is_file() and (src / "config.yaml").is_file() else \
        src.parent / f"{src.name}-onnx"


def run(args: argparse.Namespace) -> None:
    from export.onnx_export import export_onnx
    from export.quantize import QualityLimits, quantize
    from export.source import resolve_source

    if args.cmd == "merge":
        res = _merge(args.run, args.out, args.base, args.overwrite)
        print(f"merged into {res['path']} (max |logit diff| {res['max_abs_logit_diff']:.2e})")
    elif args.cmd == "onnx":
        res = export_onnx(resolve_source(args.src), args.out or _onnx_default(args.src), replace=args.overwrite,
                          threads=args.threads)
        _print_onnx(res)
    elif args.cmd == "quantize":
        out = args.out or args.onnx_dir.parent / f"{args.onnx_dir.name}-int8"
        res = quantize(args.onnx_dir, out, limits=QualityLimits(args.max_ppl_increase, args.max_metric_drop),
                       data=args.data, replace=args.overwrite, threads=args.threads, outlier_ratio=args.outlier_ratio, method=args.method)
        _print_quality(res)
    elif args.cmd == "tensorrt":
        from export.tensorrt import BuildArgs, build_engine

        b = BuildArgs(args.max_batch, args.max_seq, args.opt_batch, args.opt_seq, args.precision, args.workspace_gib)
        res = build_engine(args.onnx_dir, args.out or args.onnx_dir.parent / f"{args.onnx_dir.name}-tensorrt", b,
                           replace=args.overwrite)
        print(f"TensorRT engine: {res['path']}")
    elif args.cmd == "publish":
        _publish(Registry(args.registry), args.folder, args.name, args, args.overwrite)
    elif args.cmd == "all":
        run_dir = args.run
        if not (run_dir / "model").is_dir():
            res = _merge(run_dir, None, None, args.overwrite)
            print(f"merged into {res['path']} (max |logit diff| {res['max_abs_logit_diff']:.2e})")
        onnx_dir = run_dir / "onnx"
        _print_onnx(export_onnx(resolve_source(run_dir), onnx_dir, replace=args.overwrite, threads=args.threads))
        int8_dir = run_dir / "onnx-int8"
        _print_quality(quantize(onnx_dir, int8_dir, limits=QualityLimits(args.max_ppl_increase, args.max_metric_drop),
                                replace=args.overwrite, threads=args.threads, outlier_ratio=args.outlier_ratio, method=args.method))
        if args.registry:
            reg, name = Registry(args.registry), args.name or run_dir.name
            for folder, suffix in ((onnx_dir, "onnx"), (int8_dir, "int8")):
                _publish(reg, folder, f"{name}-{suffix}", args)


def _publish(reg: Registry, folder: Path, name: str, args: argparse.Namespace) -> None:
    """A new version of models/<name>, through the same gate as a run's publish (the run's metrics)."""
    path = reg.publish_model(folder, name, gate=GatePolicy(args.min_gain, args.max_retention_drop),
                             override_gate=args.override_gate, keep=args.keep)
    gate = Manifest.read(path).extra["gate"]
    verdict = f"gate REFUSED, overridden: {gate['override_reason']}" if gate["forced"] else "gate passed"
    print(f"published {path} ({verdict}); {name!r} serves {path.name}")


def _print_onnx(res: dict) -> None:
    p = res["parity"]
    ties = f", {p['near_tie_mismatches']} near-ties" if p["near_tie_mismatches"] else ""
    print(f"ONNX: {res['path']} (export {res['export_seconds']} s; parity: max |logit diff| "
          f"{max(p['max_abs_logit_diff'], p['decode_max_abs_logit_diff']):.2e} <= {p['logit_tolerance']:.0e} "
          f"over the prompts and {p['greedy_steps']} greedy decode steps{ties})")


def _print_quality(res: dict) -> None:
    q = res["quality"]
    head = q["metric"]
    kept = f"{len(res['kept_fp32'])} outlier MatMuls kept fp32; " if res["kept_fp32"] else ""
    print(f"int8: {res['path']} ({kept}perplexity {q['fp32']['val_perplexity']:.3f} -> {q['int8']['val_perplexity']:.3f}, "
          f"{100 * q['perplexity_increase']:+.1f}%; {head} {100 * q['fp32'][head]:.1f} -> {100 * q['int8'][head]:.1f} "
          f"on {q['fp32']['eval_rows']} rows)")


# Loggers whose chatter (unused torchvision ops, axis renames, per-node notes) hides the one-line results.
NOISY_LOGGERS = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch._dynamo", "torch.export",
                 "torch.fx", "onnxscript", "onnx_ir", "onnxruntime", "absl")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' chatter for one export call, then restore every level and filter it touched.

    Scoped, not process-wide: export is also called in-process (tests, notebooks, the training stack),
    and a root logger left at ERROR would hide everyone's warnings afterwards."""
    import logging
    import warnings

    import torch.onnx  # noqa: F401  (its loggers are configured on import: silence them after)
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed export command: 0, 2 for bad input (one line) or a missing export extra, 3 without TensorRT."""
    from lm.cli import require_extras

    require_extras("export", EXTRA)
    from export.errors import ExportError
    from export.tensorrt import TensorRTUnavailable
    from lm.errors import UserError

    try:
        with _quiet():
            run(args)
    except (ExportError, UserError, ManifestError, RegistryError, GateRefused, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TensorRTUnavailable as e:
        print(f"tensorrt: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
