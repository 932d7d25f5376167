"""TensorRT engine from the exported ONNX decoder (TensorRT Python API), recorded in a manifest.

Two optimisation profiles cover the decoder's two shapes of call:

    prefill: input_ids (B, S), no past (past length 0)      B in [1, max_batch], S in [1, max_seq]
    decode:  input_ids (B, 1), past (B, H, P, D)             P in [1, max_seq - 1]

The attention mask always spans past + new tokens. Everything except the build itself (argument
checks, profile shapes, the manifest) runs without TensorRT and is unit-tested; where TensorRT or a
GPU is missing the command says so and writes nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from artifacts import Manifest, atomic_dir
from artifacts.checksums import file_checksums
from export.errors import ExportError
from export.output import copy_side_files

PRECISIONS = ("fp16", "bf16", "fp32")


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing on this machine (exit code 3, not a bad input)."""


@dataclass(frozen=True)
class BuildArgs:
    max_batch: int = 8  # concurrent sequences per engine call; engine memory grows with it
    max_seq: int = 2048  # prompt + generated tokens; capped by the model's max_position_embeddings
    opt_batch: int = 4  # the shape TensorRT tunes kernels for; a typical concurrent load
    opt_seq: int = 256  # typical prompt length for prefill tuning
    precision: str = "fp16"  # fp16 halves memory and uses tensor cores; bf16 where range matters
    workspace_gib: float = 4.0  # builder scratch memory

    def check(self, max_positions: int | None = None) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        for name in ("max_batch", "max_seq", "opt_batch", "opt_seq"):
            if getattr(self, name) < 1:
                raise ExportError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_seq < 2:
            raise ExportError("--max-seq must be >= 2 (one prompt token and one generated token)")
        if self.opt_batch > self.max_batch:
            raise ExportError(f"--opt-batch {self.opt_batch} exceeds --max-batch {self.max_batch}")
        if self.opt_seq > self.max_seq:
            raise ExportError(f"--opt-seq {self.opt_seq} exceeds --max-seq {self.max_seq}")
        if max_positions and self.max_seq > max_positions:
            raise ExportError(f"--max-seq {self.max_seq} exceeds the model's max_position_embeddings {max_positions}")
        if self.workspace_gib <= 0:
            raise ExportError("--workspace-gib must be > 0")


def profiles(args: BuildArgs, io: dict) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    """{profile: {input: (min, opt, max)}} for the decoder's inputs (io: as recorded by the ONNX export)."""
    b, s = (1, args.opt_batch, args.max_batch), (1, args.opt_seq, args.max_seq)
    heads, dim = io["num_key_value_heads"], io["head_dim"]

    def shapes(seq: tuple[int, int, int], past: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        out = {"input_ids": tuple((b[i], seq[i]) for i in range(3)),
               "position_ids": tuple((b[i], seq[i]) for i in range(3)),
               "attention_mask": tuple((b[i], past[i] + seq[i]) for i in range(3))}
        for name in io["past_inputs"]:
            out[name] = tuple((b[i], heads, past[i], dim) for i in range(3))
        return out

    decode_past = (1, min(args.opt_seq, args.max_seq - 1), args.max_seq - 1)
    return {"prefill": shapes(s, (0, 0, 0)), "decode": shapes((1, 1, 1), decode_past)}


def _require_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed here (pip install tensorrt on a machine with an NVIDIA "
                                  "GPU and CUDA); the ONNX export serves with onnxruntime meanwhile") from None
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:
        raise TensorRTUnavailable("no CUDA GPU is visible here; TensorRT engines are built on the GPU they run on")
    return trt


def build_engine(onnx_dir: Path, out: Path, args: BuildArgs, *, replace: bool = False) -> dict:
    """Build and write `out/model.plan` + manifest; raises TensorRTUnavailable before writing anything."""
    man = Manifest.read(onnx_dir)
    io = man.extra.get("onnx", {}).get("io")
    if not io:
        raise ExportError(f"{onnx_dir}/manifest.json: no ONNX io description (was it written by tunestack export onnx?)")
    max_pos = json.loads((onnx_dir / "config.json").read_text()).get("max_position_embeddings")
    args.check(max_pos)
    if out.exists() and not replace:
        raise ExportError(f"{out}: exists; pass --overwrite to replace it")
    shapes = profiles(args, io)
    trt = _require_tensorrt()
    t0 = time.time()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_dir / "model.onnx")):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_dir / 'model.onnx'}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(args.workspace_gib * (1 << 30)))
    if args.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif args.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    for shape in shapes.values():
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shape.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{onnx_dir / 'model.onnx'}: TensorRT build failed (see the log above)")
    with atomic_dir(out, replace=replace) as tmp:
        (tmp / "model.plan").write_bytes(bytes(plan))
        copy_side_files(onnx_dir, tmp)
        m = Manifest(kind="model", name=out.name, method="tensorrt", base_model=man.base_model,
                     peft_config=man.peft_config, metrics=man.metrics,
                     extra={"tensorrt": {"version": trt.__version__, "precision": args.precision,
                                         "profiles": {k: {n: [list(s) for s in v] for n, v in p.items()}
                                                      for k, p in shapes.items()},
                                         "build_seconds": round(time.time() - t0, 1),
                                         "gpu": _gpu_name()},
                            "source": str(onnx_dir.resolve())})
        m.files = file_checksums(tmp)
        m.write(tmp)
    return {"path": str(out), "profiles": shapes}


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)
