"""tunestack demo: what `make demo` runs, in one command.

Fine-tunes the bundled `smollm2_lora_chef` config (LoRA on the embedded SmolLM2-135M, the invented menu
plus replay), scores base vs tuned, publishes `chef` through the gate into the registry; then merges,
exports ONNX (parity-checked) and int8 (quality-gated) and publishes those as `chef-onnx` and `chef-int8`.
Reruns replace the previous demo's run and exports (output.overwrite=true, --overwrite).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lm.cli import HelpFormatter

CONFIG = "smollm2_lora_chef"  # the bundled config the README's figures come from
RUN_DIR = "runs/chef-lora"  # that config's output.dir
NAME = "chef"  # the registry name the README and the docs serve


def configure(ap: argparse.ArgumentParser) -> None:
    ap.description, ap.formatter_class = __doc__, HelpFormatter
    ap.add_argument("--registry", type=Path, default=Path("registry"), help="publish the adapter and exports here")


def commands(args: argparse.Namespace) -> list[list[str]]:
    """The two tunestack commands the demo is, as argv lists."""
    return [["train", CONFIG, "output.overwrite=true", f"output.registry={args.registry}"],
            ["export", "all", RUN_DIR, "--registry", str(args.registry), "--name", NAME, "--overwrite"]]
