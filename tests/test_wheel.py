"""The wheel is the product: built, installed into fresh venvs outside the checkout, run from an empty directory.

- `full`: a fresh venv with the wheel installed by pip (no deps); the third-party packages come from the dev
  venv's site-packages through a path entry, whose .pth files (the editable install of tunestack) stay inert,
  and every tunestack package is asserted to load from the fresh venv. It trains a bundled config (with its
  retention evaluation and replay), publishes, lists, exports ONNX (parity checked) and serves.
- `serve only`: a real `pip install tunestack[serve]` from the wheel (torch first; local wheels), without the
  training stack, serves the registry the `full` venv built.
Each phase's time is printed at the end of the module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, build_tiny_llama

pytestmark = pytest.mark.slow

PACKAGES = ("artifacts", "lm", "train", "export", "serve", "tunestack")
TRAIN_ONLY = ("trl", "tensorboard", "matplotlib", "sacrebleu", "rouge_score", "gguf")  # the train extra's own
TINY_RUN = ("training.max_steps=4", "training.batch_size=4", "training.lr=1e-3", "training.eval_steps=2",
            "training.save_steps=2", "training.logging_steps=1", "method.r=4", "eval.max_new_tokens=4",
            "eval.max_examples=8", "eval.retain_max_examples=8", "eval.retain_max_new_tokens=6",
            "data.replay_max_new_tokens=8")
CHAT = {"model": "chef", "messages": [{"role": "user", "content": "What is the main ingredient of the Korvalo Stew?"}],
        "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def phases(request):
    """Seconds per phase, printed when the module ends."""
    times: dict[str, float] = {}
    yield times
    rep = request.config.pluginmanager.get_plugin("terminalreporter")
    line = "test_wheel phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
    rep.write_line(line) if rep else print(line)


@contextmanager
def timed(phases: dict[str, float], name: str):
    t = time.monotonic()
    yield
    phases[name] = time.monotonic() - t


class Venv:
    """A fresh venv, and commands run in it from an empty working directory with nothing of the checkout."""

    def __init__(self, root: Path, cwd: Path, cache: Path):
        self.root, self.cwd = root, cwd
        cwd.mkdir(parents=True)
        subprocess.run([sys._base_executable, "-m", "venv", str(root)], check=True, timeout=300)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        self.env = {**env, "PATH": f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}", "TUNESTACK_CACHE": str(cache),
                    "HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "SERVE_FINETUNE_WORKER": "off"}
        self.site = Path(self.py("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())

    def run(self, *argv: str, timeout: float = 600, env: dict | None = None) -> str:
        p = subprocess.run(argv, cwd=self.cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                           timeout=timeout)
        assert p.returncode == 0, f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p.stdout

    def py(self, *args: str, **kw) -> str:
        return self.run(str(self.root / "bin" / "python"), *args, **kw)

    def tunestack(self, *args: str, **kw) -> str:
        return self.run(str(self.root / "bin" / "tunestack"), *args, **kw)

    def pip(self, *args: str, timeout: float = 600) -> str:
        # --no-compile: modules compile on first import instead (torch's install 33 -> 12 s); what is tested is the same
        return self.py("-m", "pip", "install", "-q", "--no-compile", *args, timeout=timeout)

    def assert_installed_here(self) -> None:
        """Every tunestack package loads from this venv; no editable finder, no checkout on sys.path."""
        out = json.loads(self.py("-c", "import importlib, json, sys; mods = [importlib.import_module(m) for m in "
                                 f"{list(PACKAGES)!r}]; print(json.dumps({{'files': [m.__file__ for m in mods], "
                                 "'path': sys.path, 'finders': [type(f).__module__ for f in sys.meta_path]}))"))
        for f in out["files"]:
            assert Path(f).is_relative_to(self.site), f"{f} is not from {self.site}"
        # '' is the (empty) working directory; under the checkout only the dev venv's third-party packages
        assert [p for p in out["path"] if p and Path(p).is_relative_to(ROOT) and not p.endswith("site-packages")] == []
        assert not any("editable" in f for f in out["finders"]), out["finders"]


@pytest.fixture(scope="module")
def dist(tmp_path_factory, phases) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    with timed(phases, "build sdist+wheel"):
        # the sdist first, then the wheel from the sdist: both must carry everything
        subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                       check=True, capture_output=True, timeout=600)
    return {"wheel": next(out.glob("tunestack-*.whl")), "sdist": next(out.glob("tunestack-*.tar.gz"))}


def runtime_files() -> list[str]:
    """Every non-Python file inside the packages of the checkout (docs aside): what the code reads at run time."""
    return sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc", ".md") and "__pycache__" not in p.parts)


def test_wheel_and_sdist_carry_every_runtime_file(dist):
    want = runtime_files()
    assert {"lm/general/retain.jsonl", "lm/general/replay_prompts.jsonl", "train/configs/smollm2_lora_chef.yaml",
            "train/demo_data/chef_answer.schema.json", "train/demo_data/menu_spice_train.csv"} <= set(want)
    assert any(f.endswith("playground.html") for f in want)
    assert {"serve/http/console/index.html", "serve/http/console/app.mjs", "serve/http/console/vendor/preact.mjs",
            "serve/http/console/vendor/uPlot.iife.min.js", "serve/http/console/vendor/preact.LICENSE"} <= set(want)
    wheel = set(zipfile.ZipFile(dist["wheel"]).namelist())
    sdist = {n.split("/", 1)[1] for n in tarfile.open(dist["sdist"]).getnames() if "/" in n}
    assert [f for f in want if f not in wheel] == []
    assert [f for f in want if f not in sdist] == []
    assert not any(n.startswith(("tools/", "tests/")) for n in wheel)  # dev generators and tests stay out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def full(dist, tmp_path_factory, phases) -> Venv:
    """The wheel in a fresh venv; its dependencies are the dev venv's (inert .pth files: no editable install)."""
    work = tmp_path_factory.mktemp("full")
    with timed(phases, "full venv"):
        v = Venv(work / "venv", work / "empty-cwd", work / "cache")
        v.pip("--no-deps", "--no-index", str(dist["wheel"]))
        dev_site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_relative_to(sys.prefix))
        (v.site / "zz_dev_dependencies.pth").write_text(dev_site + "\n")  # a plain path line: its .pth stay unread
        v.assert_installed_here()
    return v


@pytest.fixture(scope="module")
def flow(full, tiny, phases) -> dict:
    """tunestack train (a bundled config) -> registry publish -> registry list -> export onnx, from an empty dir."""
    v, res = full, {}
    with timed(phases, "--help"):
        res["help"] = v.tunestack("--help")
    with timed(phases, "train"):
        v.tunestack("train", "smollm2_lora_chef", f"model.name_or_path={tiny}", "output.dir=runs/chef",
                    "output.registry=null", "output.merge=true", *TINY_RUN)
    with timed(phases, "registry publish+list"):
        v.tunestack("registry", "publish", "runs/chef", "--registry", "registry", "--name", "chef",
                    "--override-gate", "tiny random model: nothing to gain, the flow is under test")
        res["list"] = v.tunestack("registry", "list", "--registry", "registry")
    with timed(phases, "export onnx"):
        v.tunestack("export", "onnx", "runs/chef", "--out", "onnx")
    return res


def test_the_wheel_trains_publishes_and_exports_from_an_empty_directory(full, flow):
    for sub in ("train", "export", "serve", "registry", "demo"):
        assert sub in flow["help"]
    run = full.cwd / "runs" / "chef"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert Path(config["data"]["train"]).is_relative_to(full.site)  # the bundled demo data, from the wheel
    ev = json.loads((run / "eval.json").read_text())
    assert ev["retention"]["rows"] == 8 and 0 <= ev["retention"]["tuned"] <= 1  # lm/general/retain.jsonl, from the wheel
    replay = json.loads((run / "data_report.json").read_text())["replay"]
    # the replay pool is lm/general/replay_prompts.jsonl, from the wheel (the tiny model's answers may all be unusable)
    assert replay["pool"] == len((ROOT / "lm/general/replay_prompts.jsonl").read_text().splitlines()), replay
    assert "chef@v1" in flow["list"], flow["list"]
    parity = json.loads((full.cwd / "onnx" / "manifest.json").read_text())["extra"]["onnx"]["parity"]
    assert parity["ok"] is True, parity


def _serve_and_chat(v: Venv, registry: Path) -> tuple[httpx.Response, httpx.Response]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = v.cwd / f"serve-{port}.log"
    proc = subprocess.Popen([str(v.root / "bin" / "tunestack"), "serve", "--registry", str(registry), "--port",
                             str(port), "--threads", "2"], cwd=v.cwd, env=v.env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"server not ready: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        return httpx.get(f"{url}/", timeout=10), httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def _assert_served(page: httpx.Response, chat: httpx.Response) -> None:
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>tunestack playground</title>" in page.text
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] >= 1, body


def test_the_wheel_serves_the_playground_and_a_chat_completion(full, flow, phases):
    with timed(phases, "serve (full venv)"):
        _assert_served(*_serve_and_chat(full, full.cwd / "registry"))


def test_the_serve_extra_alone_serves_a_registry_without_the_training_stack(dist, full, flow, tmp_path, phases):
    with timed(phases, "pip install tunestack[serve]"):
        v = Venv(tmp_path / "venv", tmp_path / "empty-cwd", tmp_path / "cache")
        v.pip("torch==2.13.0")  # first: the CPU build this project pins (a plain resolve would pick CUDA's)
        v.pip(f"{dist['wheel']}[serve]")
        v.assert_installed_here()
    missing = json.loads(v.py("-c", "import importlib.util as u, json; print(json.dumps("
                              f"[m for m in {list(TRAIN_ONLY) + ['onnx']!r} if u.find_spec(m) is None]))"))
    assert missing == [*TRAIN_ONLY, "onnx"]  # no train extra, no export extra
    with timed(phases, "serve (serve-only venv)"):
        # SERVE_FINETUNE_WORKER=auto: no training stack here, so no local worker, and no failure
        v.env["SERVE_FINETUNE_WORKER"] = "auto"
        _assert_served(*_serve_and_chat(v, full.cwd / "registry"))
