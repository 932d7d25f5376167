"""GET /v1/files/{id}/preview: an uploaded file's first rows as chat turns, cut into the spans the trainer
encodes, each marked with whether its tokens carry loss (lm.chat.loss_segments: the trainer's own encoding).

The tokenizer is the served base model's, from the registry: the one a job on this server trains with. A
classification run's system prompt (data.system_prompt, set in the train config) is not shown.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

from artifacts import Registry
from artifacts.finetune import FileRecord
from lm.chat import ensure_chat_template, loss_segments
from lm.data.formats import detect_format, read_rows, to_example
from lm.errors import DataError
from serve.errors import APIError


class Previewer:
    def __init__(self, registry: Path):
        self.registry = Registry(registry)
        self._tokenizer: tuple[Path, Any] | None = None
        self._lock = threading.Lock()

    def tokenizer(self):
        """The registry base model's tokenizer, loaded once (and again if the base changes)."""
        base = self.registry.base()
        if base is None:
            raise APIError(503, "the registry has no base model yet", code="not_ready")
        with self._lock:
            if self._tokenizer is None or self._tokenizer[0] != base[1]:
                from transformers import AutoTokenizer  # only the preview needs it in the serving process

                tok = AutoTokenizer.from_pretrained(str(base[1]))
                ensure_chat_template(tok)
                self._tokenizer = (base[1], tok)
            return self._tokenizer[1]

    def rows(self, rec: FileRecord, content: Path, limit: int) -> list[dict[str, Any]]:
        """The first `limit` rows: line, messages and segments, read as the trainer reads the file."""
        tok = self.tokenizer()
        suffix = Path(rec.filename).suffix.lower() or ".jsonl"
        with tempfile.TemporaryDirectory(prefix="preview-") as d:
            path = Path(d) / f"{rec.id}{suffix}"  # read_rows picks CSV or JSONL by the name, as at upload
            path.symlink_to(content)
            return self._read(path, tok, rec.filename, limit)

    @staticmethod
    def _read(path: Path, tok, filename: str, limit: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        fmt = None
        try:
            for line, row in read_rows(path):
                where = f"{filename}:{line}"
                fmt = fmt or ("classification" if "text" in row and "label" in row else detect_format(row, where))
                ex = to_example(row, fmt, where)
                segs = loss_segments(tok, ex.messages)
                out.append({"line": line, "messages": ex.messages,
                            "segments": [{"role": r, "text": t, "loss": loss} for r, t, loss in segs]})
                if len(out) >= limit:
                    break
        except DataError as e:  # an upload was validated: only a file stored by an older server gets here
            raise APIError(400, f"Invalid file format: {str(e).replace(str(path), filename, 1)}", "file",
                           "invalid_file_format") from None
        return out


def routes(app, api, registry: Path, respond) -> None:
    """GET /v1/files/{fid}/preview?limit=N (1-100, default 20): the caller's file, as api.py scopes it."""
    from serve.finetune.api import _limit

    previewer = Previewer(registry)

    def preview(fid: str):
        rec = api._found(lambda: api.files.get(fid, api.reader()))
        limit = _limit()
        return respond({"object": "list", "data": previewer.rows(rec, api.files.content(fid), limit)})

    app.add_url_rule("/v1/files/<fid>/preview", "files_preview", preview, methods=["GET"])
