"""Data validation, cleaning, splitting and tokenisation."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEMO_TRAIN, run_train_cli
from train.__main__ import main
from lm.data.config import DataConfig
from lm.data.formats import load_examples
from lm.data.prepare import clean, prepare
from lm.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


BAD_CASES = {
    "malformed_line": ([GOOD, GOOD, '{"messages": [', GOOD], "train.jsonl:3: -: invalid JSON"),
    "missing_content": ([GOOD, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}],
                        "train.jsonl:2: messages[1].content: missing field"),
    "bad_role": ([{"messages": [{"role": "robot", "content": "q"}]}], "train.jsonl:1: messages[0].role"),
    "no_assistant": ([{"messages": [{"role": "user", "content": "q"}]}], "train.jsonl:1: messages: no assistant"),
    "missing_output": ([{"instruction": "do", "input": ""}], "train.jsonl:1: output: missing field"),
    "non_string": ([{"prompt": "p", "completion": 3}], "train.jsonl:1: completion: expected a string"),
    "not_object": ([GOOD, "[1, 2]"], "train.jsonl:2: -: expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rows_exit_2_with_file_line_field(case, tmp_path, capsys):
    rows, expected = BAD_CASES[case]
    train = _write(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    rc = main([f"data.train={train}", "data.eval=null", f"output.dir={out}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert expected in err
    assert not out.exists(), "nothing may be written to the output run on bad input"


def test_empty_file(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"")
    assert main([f"data.train={train}", "data.eval=null", f"output.dir={tmp_path / 'run'}"]) == 2
    assert "train.jsonl:1: -: file is empty" in capsys.readouterr().err


def test_non_utf8(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    assert main([f"data.train={train}", "data.eval=null", f"output.dir={tmp_path / 'run'}"]) == 2
    assert "train.jsonl:2: -: not valid UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_label_in_eval_file(tmp_path, capsys):
    train = _write(tmp_path / "train.jsonl", [{"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"}])
    ev = _write(tmp_path / "eval.jsonl", [{"text": "ok", "label": "pos"}, {"text": "meh", "label": "neutral"}])
    assert main([f"data.train={train}", f"data.eval={ev}", f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "eval.jsonl:2: label: unknown label 'neutral'" in err


def test_unknown_label_against_configured_labels(tmp_path):
    train = _write(tmp_path / "t.csv", [])
    train.write_text("text,label\ngreat,pos\nawful,bad\n")
    with pytest.raises(DataError, match=r"t.csv:3: label: unknown label 'bad'"):
        prepare(DataConfig(train=str(train), eval=None, labels=["pos", "neg"]), seed=0)


def test_csv_column_count(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("text,label\nfine,pos\ntoo,many,cols\n")
    with pytest.raises(DataError, match=r"c.csv:3: -: 3 columns, header has 2"):
        list(load_examples(f))


def test_real_exit_code_and_single_line(tmp_path):
    train = _write(tmp_path / "train.jsonl", [GOOD, "{not json"])
    p = run_train_cli(f"data.train={train}", "data.eval=null", f"output.dir={tmp_path / 'run'}")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "train.jsonl:2: -: invalid JSON" in p.stderr


@pytest.mark.parametrize("rows,fmt", [
    ([GOOD], "chat"),
    ([{"instruction": "Add", "input": "1 and 2", "output": "3"}], "instruction"),
    ([{"prompt": "2+2=", "completion": "4"}], "prompt_completion"),
    ([{"text": "great", "label": "pos"}], "classification"),
])
def test_formats_detected_and_canonical(rows, fmt, tmp_path):
    ex, got = load_examples(_write(tmp_path / "d.jsonl", rows))
    assert got == fmt
    assert ex[0].messages[-1]["role"] == "assistant"
    if fmt == "instruction":
        assert ex[0].messages[0]["content"] == "Add\n\n1 and 2"


def test_classification_csv(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text('text,label\n"good, really",pos\nbad,neg\n')
    splits = prepare(DataConfig(train=str(f), eval=None, validation_fraction=0.0), seed=0)
    assert splits.format == "classification" and splits.labels == ["neg", "pos"]
    assert "one label: neg, pos" in splits.train[0].messages[0]["content"]
    assert splits.train[0].messages[1]["content"] == "good, really"


def test_cleaning_counts(tmp_path):
    rows = [GOOD, GOOD,  # exact duplicate
            {"messages": [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": " a "}]},
            {"messages": [{"role": "system", "content": "  "}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a2"}]},  # empty system turn dropped
            {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "   "}]}]  # no answer left
    ex, _ = load_examples(_write(tmp_path / "d.jsonl", rows))
    kept, rep = clean(ex)
    assert (rep.rows_read, rep.duplicates_dropped, rep.empty_turns_dropped, rep.empty_rows_dropped, rep.rows_kept) == (5, 1, 2, 1, 3)
    assert kept[1].messages[0]["content"] == "spaced"


def test_split_is_deterministic_by_seed():
    cfg = DataConfig(train=str(DEMO_TRAIN), eval=None, validation_fraction=0.1)
    a, b, c = prepare(cfg, seed=1), prepare(cfg, seed=1), prepare(cfg, seed=2)
    key = lambda s: [e.where for e in s.validation]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)
    assert len(a.validation) == 60 and len(a.train) == 540
    assert not set(key(a)) & {e.where for e in a.train}
