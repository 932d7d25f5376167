"""Shared fixtures: a tiny random Llama built at test time (fast tests) and the real SmolLM2 demo run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.background import BackgroundJob, Step
from tests.timeline import Timeline

ROOT = Path(__file__).resolve().parents[1]
DEMO_TRAIN = ROOT / "train" / "demo_data" / "chef_train.jsonl"
DEMO_HELDOUT = ROOT / "train" / "demo_data" / "chef_heldout.jsonl"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
FULL = False  # --full: integration and reliability runs at full size (CI runs them sized for 2 cores); set in pytest_configure


@dataclass(frozen=True)
class DemoSize:
    """The README demo as the tests run it, and the bars its quality must clear at that size.

    --full: the demo as shipped (3 epochs) against the README's bars. CI: 2 epochs, a third
    less training (~4 of its ~16 minutes), against bars below what that size measured."""

    overrides: tuple[str, ...]  # on top of train/configs/smollm2_lora_chef.yaml
    min_gain_points: float  # held-out keyword accuracy over the base's (0 %), in points
    min_tuned: float  # the tuned model's held-out keyword accuracy
    min_int8: float  # the same after int8 quantisation (export)


def demo_size(full: bool) -> DemoSize:
    return DemoSize((), 60, 0.875, 0.6) if full else DemoSize(("training.epochs=2",), 50, 0.5, 0.45)


DEMO = demo_size(FULL)


def pytest_addoption(parser):
    group = parser.getgroup("tunestack", "tunestack's test sizes")
    group.addoption("--full", action="store_true", default=False,
                    help="run the integration and reliability tests at full size (the demo as shipped, 64 clients "
                         "for 60 s, >= 1,000 fuzz cases per backend); default: the CI sizes")
    group.addoption("--reuse-demo", metavar="DIR", default=None,
                    help="reuse the demo run in DIR (run/ and registry/ of an earlier session) instead of training it; "
                         "for iterating on the serve tests, never in CI")


WORKER_NICE = 5  # xdist workers yield to the background demo run, the suite's longest chain


def pytest_configure(config):
    """FULL and DEMO are read by test modules at import (`from tests.conftest import FULL`), after this runs.

    Under pytest-xdist every process of the run (the workers, their servers and trainings, the background
    demo) computes with one thread: two-thread processes side by side on 2 cores wait on each other's
    descheduled threads at every op (the demo's step measured 2.4x slower than its fair share)."""
    global FULL, DEMO
    FULL = config.getoption("full")
    DEMO = demo_size(FULL)
    if not hasattr(config, "workerinput"):  # the controller, which hears every worker's reports
        config.pluginmanager.register(Timeline(lambda: demo_job(config).dir), "tunestack-timeline")
    if config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None) \
            and not hasattr(config, "workerinput"):
        os.environ["OMP_NUM_THREADS"] = "1"  # before the workers start: they, and all they spawn, inherit it


def build_tiny_llama(out: Path) -> Path:
    """A ~0.2M-parameter Llama with a BPE tokenizer trained on the demo data, saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [json.dumps(json.loads(line)) for line in DEMO_TRAIN.read_text().splitlines()]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def small_data(tmp_path) -> dict[str, Path]:
    """64 training rows and 8 eval rows from the demo data."""
    rows = DEMO_TRAIN.read_text().splitlines()
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows[:64]) + "\n")
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(DEMO_HELDOUT.read_text().splitlines()[:8]) + "\n")
    return {"train": train, "eval": ev}


def refused(main, capsys, argv: list[str], *needles: str) -> str:
    """A CLI's `main(argv)` exits 2 with exactly one stderr line containing every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def tiny_overrides(model: Path, data: dict[str, Path], out: Path, **extra) -> list[str]:
    base = {"model.name_or_path": str(model), "data.train": str(data["train"]), "data.eval": str(data["eval"]),
            "output.dir": str(out), "training.max_steps": 4, "training.batch_size": 4, "training.lr": 1e-3,
            "training.eval_steps": 2, "training.save_steps": 2, "training.logging_steps": 1,
            "eval.max_new_tokens": 4, "eval.retain_max_examples": 8, "eval.retain_max_new_tokens": 6,
            "output.registry": None, "method.r": 4}
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def run_train_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- the demo run: started in the background when collection finds a user (tests/background.py) ---------
DEMO_WAIT_S = 1700  # under pytest-timeout's 1,800 s: the run takes ~15 min on 2 cores beside the other tests


def shared_tmp(config) -> Path:
    """The run's temp folder, the same for pytest-xdist's controller and all its workers."""
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


def demo_job(config) -> BackgroundJob:
    return BackgroundJob(shared_tmp(config), "demo")


def start_demo(config, export: bool) -> None:
    """The README demo (train/configs/smollm2_lora_chef.yaml, sized by DEMO), then `export all` as `make demo` runs it."""
    d = demo_job(config).dir
    steps = [Step("train", (sys.executable, "-m", "train", "smollm2_lora_chef", f"output.dir={d / 'run'}",
                            f"output.registry={d / 'registry'}", *DEMO.overrides))]
    if export:
        steps.append(Step("export", (sys.executable, "-m", "export", "all", str(d / "run"), "--registry",
                                     str(d / "registry"), "--name", "chef", "--overwrite")))
    demo_job(config).start(steps, ROOT, {**os.environ, "PYTHONPATH": str(ROOT)})


def _run_order(item) -> int:
    """Docker first (it waits on the engine and the disk), then the other slow tests, the fast ones, and last
    the demo's users (its export's last), which by then find the background run done. Stable: modules stay in file order."""
    if item.get_closest_marker("docker"):
        return 0
    if "demo_run" in item.fixturenames:
        return 4 if "demo_export" in item.fixturenames else 3  # the export is the job's second step
    return 1 if item.get_closest_marker("slow") else 2


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only tests that will run start the demo
def pytest_collection_modifyitems(config, items):
    # xdist hands out whole files (--dist loadfile) in the order of their first item: a file sorts by its latest item
    by_file: dict[str, int] = {}
    for it in items:
        by_file[it.nodeid.split("::")[0]] = max(by_file.get(it.nodeid.split("::")[0], 0), _run_order(it))
    items.sort(key=lambda it: by_file[it.nodeid.split("::")[0]])
    wanted = not (config.option.collectonly or config.getoption("reuse_demo"))
    if wanted and any("demo_run" in it.fixturenames for it in items):
        start_demo(config, export=any("demo_export" in it.fixturenames for it in items))
    if hasattr(config, "workerinput"):
        os.nice(WORKER_NICE)  # after the start: the demo keeps the default priority


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and hasattr(config, "_tmp_path_factory"):
        demo_job(config).stop()  # the session ended (or was interrupted) before the demo did


@pytest.fixture(scope="session")
def demo_run(pytestconfig):
    """The README demo run, once per test run on the real SmolLM2 (all xdist workers share it).

    --reuse-demo=DIR (a directory holding run/ and registry/ from an earlier session) skips the
    10-minute run while iterating on serve tests; CI never passes it.
    """
    reuse = pytestconfig.getoption("reuse_demo")
    if reuse and (Path(reuse) / "run" / "manifest.json").is_file():
        return {"run": Path(reuse) / "run", "registry": Path(reuse) / "registry", "stdout": "points (reused)"}
    job = demo_job(pytestconfig)
    if not job.started:  # a session whose collection did not start it
        start_demo(pytestconfig, export=False)
    log = job.wait("train", DEMO_WAIT_S)
    return {"run": job.dir / "run", "registry": job.dir / "registry", "stdout": log}


def wait_demo_export(config) -> bool:
    """True once the background job's `export all` of the demo run succeeded; False if the job has no export step."""
    job = demo_job(config)
    if "export" not in job.steps():
        return False
    job.wait("export", DEMO_WAIT_S)
    return True


# -- export: one tiny LoRA run, merged and exported to ONNX and int8 once per session ---------------
@pytest.fixture(scope="session")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    from train.config import load_config
    from train.recipe import run

    work = tmp_path_factory.mktemp("export-run")
    (work / "train.jsonl").write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:48]) + "\n")
    (work / "eval.jsonl").write_text("\n".join(DEMO_HELDOUT.read_text().splitlines()[:6]) + "\n")
    cfg = load_config(None, tiny_overrides(tiny_model, {"train": work / "train.jsonl", "eval": work / "eval.jsonl"},
                                           work / "run", **{"training.lr": 5e-2, "eval.compare_base": False,
                                              # the transformers forward and peft's dropout draws: this 4-step run
                                              # happens to answer with words, which test_replay needs (the fused
                                              # step, one dropout mask for q/k/v, trains one that answers nothing)
                                              "training.fast_path": "off"}))
    return run(cfg).root


@pytest.fixture(scope="session")
def exported(tiny_run) -> dict[str, Path]:
    """merge + onnx + quantize through the CLI, as a user runs it."""
    from export.__main__ import main

    assert main(["all", str(tiny_run)]) == 0
    return {"run": tiny_run, "model": tiny_run / "model", "onnx": tiny_run / "onnx", "int8": tiny_run / "onnx-int8"}
