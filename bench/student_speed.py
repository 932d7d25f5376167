"""Serving speed of a distilled student against its teacher, in one run, through the real Flask server.

The teacher (a LoRA run, merged once; or a full run's model/) and the student (a distill run's
model/) are each put into their own registry as the base and served by `python -m serve` in turn,
alternating rounds so drift on this noisy machine hits both alike. Each round streams the same
completions (64 new tokens, ignore_eos) at each concurrency level. Reports median tokens/s per
side and the student/teacher ratio.

  .venv/bin/python bench/student_speed.py --teacher runs/chef-lora --student runs/chef-distill [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from serve_throughput import free_port, load_test, start, stop, wait

from artifacts import Manifest, Registry, RunDir
from lm.merge import merge_run_adapter


def model_folder(run: Path, work: Path) -> Path:
    """A run's full weights: model/ if it has one, else its adapter merged into its base (once)."""
    rd = RunDir(run)
    if rd.model.is_dir():
        return rd.model
    out = work / f"{run.name}-merged"
    merge_run_adapter(run, Manifest.read(run).base_model["path"], out)
    return out


def registry_of(folder: Path, name: str, work: Path) -> Path:
    reg = work / f"registry-{name}"
    Registry(reg).register_base(folder, name)
    return reg


def serve_round(reg: Path, name: str, levels: list[int], work: Path) -> dict[int, float]:
    port = free_port()
    proc = start(["-m", "serve", "--registry", str(reg), "--port", str(port)],
                 {"SERVE_THREADS": "2", "SERVE_MAX_MODEL_LEN": "512"}, work / f"{name}.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait(f"{url}/ready", proc)
        load_test(url, [name], 2)  # warm-up
        return {c: load_test(url, [name], c)["tokens_per_s"] for c in levels}
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="student-speed-"))
    regs = {"teacher": registry_of(model_folder(a.teacher, work), "teacher", work),
            "student": registry_of(model_folder(a.student, work), "student", work)}
    layers = {k: json.loads((Registry(r).base()[1] / "config.json").read_text())["num_hidden_layers"]
              for k, r in regs.items()}
    runs: dict[str, list[dict[int, float]]] = {"teacher": [], "student": []}
    for _ in range(a.rounds):
        for side in ("teacher", "student"):
            runs[side].append(serve_round(regs[side], side, levels, work))
    result = {"layers": layers, "levels": {}}
    for c in levels:
        med = {side: statistics.median(r[c] for r in runs[side]) for side in runs}
        result["levels"][c] = {**{f"{s}_tokens_per_s": v for s, v in med.items()},
                               "student_over_teacher": med["student"] / med["teacher"]}
        print(f"concurrency {c}: teacher ({layers['teacher']} layers) {med['teacher']:.1f} tok/s, student "
              f"({layers['student']} layers) {med['student']:.1f} tok/s: {med['student'] / med['teacher']:.2f}x")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
