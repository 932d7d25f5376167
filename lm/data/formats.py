"""Read user data files and validate every row into one canonical chat form.

Formats (auto-detected from the first row's fields):
  chat               {"messages": [{"role": "system|user|assistant", "content": "..."}]}
  instruction        {"instruction": "...", "input": "..." (optional), "output": "..."}   alpaca-style
  prompt_completion  {"prompt": "...", "completion": "..."}
  classification     {"text": "...", "label": "..."}  (JSONL or CSV), trained generatively
  preference         {"prompt": "..." or [messages], "chosen": "..." or [assistant message],
                      "rejected": same as chosen}   DPO/ORPO pairs; SFT methods learn prompt -> chosen

Any problem raises DataError("file:line: field: reason") before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lm.errors import DataError

ROLES = ("system", "user", "assistant")
FORMATS = ("chat", "instruction", "prompt_completion", "classification", "preference")


@dataclass
class Example:
    messages: list[dict[str, str]]  # canonical chat form; the last assistant turn is the reference answer
    where: str  # file:line, for error messages and reports
    label: str | None = None  # classification only
    rejected: str | None = None  # preference only: the dispreferred answer (messages end with the chosen one)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i}: -: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            yield i, text.removeprefix("\ufeff") if i == 1 else text  # a BOM (Excel's CSV export) is no field


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row dict) for a .jsonl/.json-lines or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}:0: -: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}:1: -: file is empty")
    any_row = False
    if path.suffix.lower() == ".csv":
        lines = list(_lines(path))
        # strict: an unclosed quote would otherwise swallow every later row into one field, silently
        reader = csv.reader(io.StringIO("".join(t for _, t in lines)), strict=True)
        try:
            header = next(reader)
        except (StopIteration, csv.Error) as e:
            raise DataError(f"{path}:1: -: unreadable CSV header ({e})") from None
        header = [h.strip() for h in header]
        for values in _csv_records(reader, path):
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise DataError(f"{path}:{line}: -: {len(values)} columns, header has {len(header)}")
            any_row = True
            yield line, dict(zip(header, values))
    else:
        for i, text in _lines(path):
            if not text.strip():
                continue
            row = _json_row(text, f"{path}:{i}")
            any_row = True
            yield i, row
    if not any_row:
        raise DataError(f"{path}:1: -: file has no rows")


def _csv_records(reader, path: Path) -> Iterator[list[str]]:
    """The reader's records; one it cannot parse (an unclosed quote, a field over csv's size limit) is a
    DataError naming the line the record starts on."""
    while True:
        start = reader.line_num + 1
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            hint = ": an unclosed quote?" if "end of data" in str(e) else ""
            raise DataError(f"{path}:{start}: -: unreadable CSV row ({e}{hint})") from None


def _json_row(text: str, where: str) -> dict[str, Any]:
    """One JSONL line as an object. json raises more than JSONDecodeError on hostile input: a number over
    Python's 4300-digit limit is a ValueError, deep nesting a RecursionError; both are bad rows, not bugs."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: -: invalid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:
        raise DataError(f"{where}: -: invalid JSON ({str(e).split(':')[0]})") from None
    except RecursionError:
        raise DataError(f"{where}: -: invalid JSON (nested too deeply)") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: -: expected a JSON object, got {type(row).__name__}")
    try:  # "\ud800" escapes decode to lone surrogates, which no tokenizer can encode
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: -: a string holds an unpaired surrogate ({e.object[e.start:e.end]!r}): "
                        "not valid Unicode") from None
    return row


def detect_format(row: dict[str, Any], where: str) -> str:
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "messages" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "instruction"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row or "label" in row:
        return "classification"
    raise DataError(f"{where}: -: cannot tell the format from fields {sorted(row)}; "
                    f"expected messages, instruction/output, prompt/completion, text/label or prompt/chosen/rejected")


def _str_field(row: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise DataError(f"{where}: {key}: missing field")
        return ""
    v = row[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: {key}: expected a string, got {type(v).__name__}")
    return v


def to_example(row: dict[str, Any], fmt: str, where: str, text_field: str = "text",
               label_field: str = "label") -> Example:
    if fmt == "preference":
        return _preference(row, where)
    if fmt == "chat":
        out = _messages(row.get("messages"), "messages", where)
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: messages: no assistant turn to learn from")
        return Example(out, where)
    if fmt == "instruction":
        instr = _str_field(row, "instruction", where)
        inp = _str_field(row, "input", where, required=False)
        output = _str_field(row, "output", where)
        user = f"{instr}\n\n{inp}" if inp.strip() else instr
        return Example([{"role": "user", "content": user}, {"role": "assistant", "content": output}], where)
    if fmt == "prompt_completion":
        return Example([{"role": "user", "content": _str_field(row, "prompt", where)},
                        {"role": "assistant", "content": _str_field(row, "completion", where)}], where)
    if fmt == "classification":
        text = _str_field(row, text_field, where)
        label = row.get(label_field)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{where}: {label_field}: missing field")
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise DataError(f"{where}: {label_field}: expected a string or integer label")
        label = str(label).strip()
        return Example([{"role": "user", "content": text}, {"role": "assistant", "content": label}], where, label)
    raise DataError(f"{where}: -: unknown format {fmt!r}")


def _messages(msgs: Any, key: str, where: str) -> list[dict[str, str]]:
    if msgs is None:
        raise DataError(f"{where}: {key}: missing field")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {key}: expected a non-empty list")
    out = []
    for j, m in enumerate(msgs):
        f = f"{key}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: {f}: expected an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: {f}.role: {role!r} is not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _content(m, where, f)})
    return out


def _answer(row: dict[str, Any], key: str, where: str) -> str:
    """A preference answer: a string, or a list holding one assistant message (TRL's conversational form)."""
    v = row.get(key)
    if v is None:
        raise DataError(f"{where}: {key}: missing field")
    if isinstance(v, str):
        return v
    msgs = _messages(v, key, where)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise DataError(f"{where}: {key}: expected a string or one assistant message")
    return msgs[0]["content"]


def _preference(row: dict[str, Any], where: str) -> Example:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif prompt is None:
        raise DataError(f"{where}: prompt: missing field")
    else:
        msgs = _messages(prompt, "prompt", where)
        if msgs[-1]["role"] == "assistant":
            raise DataError(f"{where}: prompt: must end with a user turn, not an assistant turn")
    chosen, rejected = _answer(row, "chosen", where), _answer(row, "rejected", where)
    if chosen.strip() == rejected.strip():
        raise DataError(f"{where}: rejected: identical to chosen; a pair must differ")
    return Example(msgs + [{"role": "assistant", "content": chosen}], where, rejected=rejected)


def _content(m: dict[str, Any], where: str, f: str) -> str:
    if "content" not in m or m["content"] is None:
        raise DataError(f"{where}: {f}.content: missing field")
    if not isinstance(m["content"], str):
        raise DataError(f"{where}: {f}.content: expected a string, got {type(m['content']).__name__}")
    return m["content"]


def load_examples(path: str | Path, fmt: str = "auto", text_field: str = "text",
                  label_field: str = "label") -> tuple[list[Example], str]:
    """Every row of a file as an Example, plus the format used. Raises DataError on the first bad row."""
    examples: list[Example] = []
    for line, row in read_rows(path):
        where = f"{path}:{line}"
        if fmt == "auto":
            fmt = "classification" if (text_field in row and label_field in row) else detect_format(row, where)
        examples.append(to_example(row, fmt, where, text_field, label_field))
    return examples, fmt
