"""Training under faults: kill -9 then --resume, a full disk or unwritable output, and hostile data files.

`pytest --full` runs the full-size variants (a longer run around the kill, more generated data files).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artifacts import RunDir
from tests.conftest import DEMO_TRAIN, FULL, ROOT, run_train_cli, tiny_overrides
from train import checkpoints
from train.__main__ import main


def _one_line_error(err: str, *needles: str) -> str:
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def _last_line_error(err: str, *needles: str) -> str:
    """Once training has started, stderr holds progress bars too (tqdm closes its bar after the error is
    printed): the error is the one line that starts with "error:", and there is no traceback."""
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    return _one_line_error(errors[0], *needles)


def _hidden(root: Path) -> list[Path]:
    """Temp/staging/trash leftovers of the atomic writers: all named with a leading dot."""
    return [p for p in root.rglob(".*")] if root.exists() else []


# -- kill -9 mid-run, then --resume -----------------------------------------------------------------
def _losses(rd: RunDir) -> tuple[dict[int, float], dict[int, float]]:
    rows = [json.loads(line) for line in rd.metrics_log.read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {sorted(steps)}"
    return ({r["step"]: r["loss"] for r in rows if "loss" in r},
            {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r})


def _kill_after_checkpoint(args: list[str], rd: RunDir, at_step: int) -> int:
    """Start a run, SIGKILL it once a complete checkpoint at or after `at_step` exists; the step it holds."""
    proc = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True)
    deadline, step = time.time() + 600, None
    try:
        while time.time() < deadline and proc.poll() is None and step is None:
            found = [(checkpoints.step_of(p), p) for p in rd.checkpoints.glob("checkpoint-*")]
            step = next((s for s, p in sorted(found, key=lambda t: t[0] or 0)
                         if s and s >= at_step and checkpoints.incomplete(p, s) is None), None)
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert step is not None, "no checkpoint appeared before the run ended or the deadline"
    return step


@pytest.mark.slow  # three tiny-Llama runs in subprocesses: ~2-3 min on 2 cores
def test_kill_then_resume_matches_an_uninterrupted_run(tiny_model, small_data, tmp_path, capsys):
    steps, every = (200, 20) if FULL else (30, 5)
    extra = {"training.max_steps": steps, "training.save_steps": every, "training.eval_steps": every,
             "training.batch_size": 2, "training.num_threads": 1, "eval.enabled": False}
    ref, out = RunDir(tmp_path / "uninterrupted"), RunDir(tmp_path / "killed")
    p = run_train_cli(*tiny_overrides(tiny_model, small_data, ref.root, **extra))
    assert p.returncode == 0, p.stderr[-2000:]

    args = tiny_overrides(tiny_model, small_data, out.root, **extra)
    killed_at = _kill_after_checkpoint(args, out, at_step=2 * every)
    assert killed_at < steps and not out.is_finished() and not out.adapter.exists()
    ck = out.checkpoints / f"checkpoint-{killed_at}"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (ck / name).is_file(), name  # the optimizer, scheduler and RNG state a resume restores
    assert not list(out.checkpoints.rglob("*.bin")), "a pickle in a checkpoint"

    # A save cut short by a later kill: weights written, trainer_state.json truncated mid-write.
    cut = out.checkpoints / f"checkpoint-{killed_at + every}"
    shutil.copytree(ck, cut, dirs_exist_ok=True)
    (cut / "trainer_state.json").write_text('{"global_step": ')
    with out.metrics_log.open("a") as f:
        f.write('{"step": 99999, "loss": 1.0}\n{"step": ')  # logged past the checkpoint, last line cut short

    # --resume refuses to continue a different run (here: another learning rate) and writes nothing.
    changed = tiny_overrides(tiny_model, small_data, out.root, **{**extra, "training.lr": 5e-3})
    assert main([*changed, "--resume"]) == 2
    _one_line_error(capsys.readouterr().err, "training.lr changed")
    assert cut.is_dir()

    p = run_train_cli(*args, "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"{cut} is incomplete (unreadable trainer_state.json" in p.stdout
    assert out.is_finished()

    train_ref, val_ref = _losses(ref)
    train_res, val_res = _losses(out)
    assert sorted(train_res) == sorted(train_ref)  # every step once: the killed run's extra lines trimmed
    after = [s for s in train_ref if s > killed_at]
    # Optimizer, scheduler, RNG and data order restored: the curve after the checkpoint is the same curve.
    for s in after:
        assert train_res[s] == pytest.approx(train_ref[s], rel=1e-3), (s, train_res[s], train_ref[s])
    final_ref, final_res = val_ref[steps], val_res[steps]
    delta = abs(final_res - final_ref) / final_ref
    print(f"resume: killed at step {killed_at}/{steps}; final validation loss {final_ref:.5f} uninterrupted, "
          f"{final_res:.5f} resumed (delta {100 * delta:.4f} %)")
    assert delta < 0.01
    again = run_train_cli(*args, "--resume")
    assert again.returncode == 2 and "already finished" in again.stderr


# -- unwritable output, full disk ---------------------------------------------------------------------
def test_output_dir_under_a_regular_file_is_refused_before_training(tiny_model, small_data, tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    out = blocker / "run"
    assert main(tiny_overrides(tiny_model, small_data, out)) == 2
    _one_line_error(capsys.readouterr().err, str(out), "is not a directory")
    assert blocker.read_text() == "x"


def test_unwritable_output_dir_is_refused_before_training(tiny_model, small_data, tmp_path, capsys, monkeypatch):
    """A folder the user may not write: refused in one line before any training. The suite runs as root
    here, where mode bits deny nothing, so the OS's answer for a non-root user is given for this folder."""
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (os.geteuid() != 0 or Path(p) != parent)
                        and real_access(p, mode, **kw))
    try:
        assert main(tiny_overrides(tiny_model, small_data, parent / "run")) == 2
        _one_line_error(capsys.readouterr().err, str(parent / "run"), "not writable")
        assert not (parent / "run").exists()
    finally:
        parent.chmod(0o700)


def test_unwritable_registry_is_refused_before_training(tiny_model, small_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = tmp_path / "run"
    assert main(tiny_overrides(tiny_model, small_data, out, **{"output.registry": blocker / "reg"})) == 2
    _one_line_error(capsys.readouterr().err, "output.registry", "is not a directory")
    assert not out.exists()


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_while_saving_the_adapter(tiny_model, small_data, tmp_path, capsys, monkeypatch):
    out, reg = RunDir(tmp_path / "run"), tmp_path / "registry"
    real_move = shutil.move

    def full(src, dst, *a, **kw):
        if str(dst).startswith(str(out.root)):
            raise _enospc(dst)
        return real_move(src, dst, *a, **kw)

    monkeypatch.setattr(shutil, "move", full)
    argv = tiny_overrides(tiny_model, small_data, out.root, **{"training.max_steps": 1, "training.save_steps": 10,
                                                               "eval.enabled": False, "output.registry": reg})
    assert main(argv) == 2
    _last_line_error(capsys.readouterr().err, str(out.root / ".tmp-adapter"), "No space left on device")
    assert not out.adapter.exists() and not out.is_finished()
    assert _hidden(out.root) == [], _hidden(out.root)  # no staging copy, no temp dir
    assert not reg.exists()


def test_full_disk_while_writing_a_checkpoint(tiny_model, small_data, tmp_path, capsys, monkeypatch):
    import torch

    out = RunDir(tmp_path / "run")
    real_save = torch.save

    def full(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):  # torch.save's own error text on ENOSPC
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    argv = tiny_overrides(tiny_model, small_data, out.root, **{"training.max_steps": 2, "training.save_steps": 1,
                                                               "eval.enabled": False})
    assert main(argv) == 2
    _last_line_error(capsys.readouterr().err, str(out.root), "is the disk full?")
    assert not out.adapter.exists() and not out.is_finished()
    cut = out.checkpoints / "checkpoint-1"
    assert checkpoints.incomplete(cut, 1) == "no optimizer.pt"  # weights written, the rest cut short
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 2  # HF would resume from it with a fresh optimizer: refused instead
    _one_line_error(capsys.readouterr().err, "no complete checkpoint to resume from", "checkpoint-1: no optimizer.pt")


def test_full_disk_while_publishing(tiny_model, small_data, tmp_path, capsys, monkeypatch):
    import artifacts.registry

    out, reg = RunDir(tmp_path / "run"), tmp_path / "registry"
    monkeypatch.setattr(artifacts.registry, "_link_or_copy", lambda src, dst: (_ for _ in ()).throw(_enospc(dst)))
    argv = tiny_overrides(tiny_model, small_data, out.root, **{
        "training.max_steps": 1, "training.save_steps": 10, "eval.enabled": False, "output.registry": reg,
        "publish.override_gate": "full-disk test"})
    assert main(argv) == 2
    err = _last_line_error(capsys.readouterr().err, str(reg), "No space left on device", "nothing was published")
    assert str(out.root) in err and out.is_finished()  # the run itself is complete and says where it is
    published = [p for kind in ("adapters", "models", "base") for p in (reg / kind).glob("*")]
    assert published == [] and _hidden(reg) == [], (published, _hidden(reg))


# -- hostile data files: exit 2 with file:line, never a traceback --------------------------------------
GOOD_JSONL = [line for line in DEMO_TRAIN.read_text().splitlines()[:20]]
GOOD_CSV = ["the soup was lovely,positive", "cold fries,negative", '"long, with a comma",positive']
FINAL_BAD = {"jsonl": '{"messages": []}', "csv": "a,b,c"}  # guaranteed bad last line: every file is malformed

_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                            max_leaves=8)
_keys = st.sampled_from(["messages", "role", "content", "prompt", "completion", "instruction", "output", "text",
                         "label", "chosen", "rejected", "input"]) | st.text(max_size=6)


def _mutated_row(draw) -> str:
    """A real row with one field broken: a wrong type, a bad role, a dropped key, or cut mid-JSON."""
    row = json.loads(draw(st.sampled_from(GOOD_JSONL)))
    how = draw(st.sampled_from(["type", "role", "drop", "cut", "surrogate", "empty"]))
    msgs = row["messages"]
    i = draw(st.integers(0, len(msgs) - 1))
    if how == "type":
        msgs[i]["content"] = draw(_json_values.filter(lambda v: not isinstance(v, str)))
    elif how == "role":
        msgs[i]["role"] = draw(st.text(max_size=10).filter(lambda r: r not in ("system", "user", "assistant")))
    elif how == "drop":
        del msgs[i][draw(st.sampled_from(["role", "content"]))]
    elif how == "surrogate":
        return json.dumps(row).replace('"content": "', '"content": "\\udc80', 1)
    elif how == "empty":
        row["messages"] = draw(st.sampled_from([[], {}, "", None]))
    text = json.dumps(row)
    return text[: draw(st.integers(1, len(text) - 1))] if how == "cut" else text


@st.composite
def _bad_jsonl_line(draw) -> bytes:
    kind = draw(st.sampled_from(["text", "bytes", "scalar", "object", "mutated", "bigint", "deep"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=40))
    if kind == "scalar":
        return json.dumps(draw(_json_values.filter(lambda v: not isinstance(v, dict)))).encode()
    if kind == "object":
        return json.dumps(draw(st.dictionaries(_keys, _json_values, max_size=4))).encode()
    if kind == "mutated":
        return _mutated_row(draw).encode("utf-8", "surrogatepass")
    if kind == "bigint":
        return b'{"label": ' + b"7" * draw(st.integers(4301, 6000)) + b"}"
    if kind == "deep":
        n = draw(st.integers(2000, 20000))
        return b"[" * n + b"]" * n
    return draw(st.text(min_size=1, max_size=40)).encode("utf-8", "surrogatepass")


@st.composite
def _bad_csv_line(draw) -> bytes:
    kind = draw(st.sampled_from(["text", "bytes", "fields", "quote", "huge", "nolabel"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=40))
    if kind == "fields":  # a well-quoted record with the wrong number of columns
        buf = io.StringIO()
        import csv

        csv.writer(buf).writerow(draw(st.lists(st.text(max_size=8), min_size=0, max_size=5).filter(lambda v: len(v) != 2)))
        return buf.getvalue().rstrip("\r\n").encode("utf-8", "surrogatepass")
    if kind == "quote":
        return (draw(st.text(max_size=6).map(lambda t: t.replace('"', ""))) + ',"' +
                draw(st.text(max_size=6))).encode("utf-8", "surrogatepass")
    if kind == "huge":
        return b"x" * draw(st.integers(131073, 140000)) + b",positive"
    if kind == "nolabel":
        return draw(st.text(min_size=1, max_size=8).map(lambda t: re.sub(r'[",\r\n]', "", t) or "t")).encode() + b","
    return draw(st.text(min_size=1, max_size=40)).encode("utf-8", "surrogatepass")


@st.composite
def _data_file(draw, fmt: str) -> tuple[bytes, int, int]:
    """(file bytes, the first line the malformed row can be on, the number of lines)."""
    good = [g.encode() for g in (GOOD_JSONL if fmt == "jsonl" else GOOD_CSV)]
    head = [b"text,label"] if fmt == "csv" else []
    before = draw(st.lists(st.sampled_from(good), max_size=4))
    bad = draw(_bad_jsonl_line() if fmt == "jsonl" else _bad_csv_line())
    after = draw(st.lists(st.sampled_from(good), max_size=3))
    lines = head + before + [bad] + after + [FINAL_BAD[fmt].encode()]
    first_bad = len(head) + len(before) + 1 if (before or fmt == "csv") else 1
    blob = b"\n".join(lines) + b"\n"
    return blob, first_bad, blob.count(b"\n")


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _check_refused(fuzz_dir: Path, fmt: str, case: tuple[bytes, int, int]) -> None:
    blob, first_bad, n_lines = case
    path = fuzz_dir / f"train.{fmt}"
    path.write_bytes(blob)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # capsys is per test, not per generated example
        code = main([f"data.train={path}", "data.eval=null", "model.name_or_path=/no/model/needed",
                     f"output.dir={fuzz_dir / 'never-written'}"])
    line = _one_line_error(err.getvalue())
    assert code == 2, line
    m = re.match(rf"error: {re.escape(str(path))}:(\d+): \S+: .+$", line)
    assert m, line  # file:line: field: reason
    assert first_bad <= int(m.group(1)) <= n_lines, (line, first_bad, n_lines)
    assert not (fuzz_dir / "never-written").exists()


FUZZ = settings(max_examples=2000 if FULL else 200, deadline=None, derandomize=not FULL,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(case=_data_file("jsonl"))
def test_malformed_jsonl_rows_exit_2_with_file_line(fuzz_dir, case):
    _check_refused(fuzz_dir, "jsonl", case)


@FUZZ
@given(case=_data_file("csv"))
def test_malformed_csv_rows_exit_2_with_file_line(fuzz_dir, case):
    _check_refused(fuzz_dir, "csv", case)


@pytest.mark.parametrize("text", [
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"label": '
    + b"9" * 5000 + b"}\n",
    b"[" * 50000 + b"]" * 50000 + b"\n",
], ids=["bigint", "deep-nesting"])
def test_found_by_fuzzing_json_that_crashed_the_parser(text, fuzz_dir, capsys):
    path = fuzz_dir / "found.jsonl"
    path.write_bytes(text)
    assert main([f"data.train={path}", "model.name_or_path=/no/model", f"output.dir={fuzz_dir / 'never'}"]) == 2
    _one_line_error(capsys.readouterr().err, f"{path}:", "invalid JSON")


@pytest.mark.slow  # a cold `python -m train` start: ~30 s on a loaded 2-core machine
def test_a_real_subprocess_exits_2_with_one_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nfine,positive\n" + b"x" * 140000 + b",positive\n")
    p = run_train_cli(f"data.train={path}", "model.name_or_path=/no/model", f"output.dir={tmp_path / 'out'}",
                      timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    _one_line_error(p.stderr, f"{path}:3: -: unreadable CSV row (field larger than field limit")
    assert not (tmp_path / "out").exists()
