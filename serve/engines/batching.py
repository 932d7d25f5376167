"""Continuous batching shared by the engines: a scheduler over a model-specific forward pass.

    waiting queue ──admit──> prefill (left-padded batch, adapter per row)
                                 │ merge KV cache (left-pad to common length)
                                 v
    running batch ──decode step (1 token per row, adapter per row)──> events per request
                                 │ drop finished/cancelled rows (index KV cache)

All model work happens on one thread; HTTP threads only enqueue requests and read events.
A subclass supplies `_forward` (PyTorch + LoRA, or ONNX Runtime) and its KV cache, which only
needs `.layers[i].keys` / `.values` tensors of shape (batch, kv_heads, time, head_dim).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from serve.engines.base import Engine, EngineStats, Failed, Finished, GenRequest, TextDelta
from lm.chat import encode_generation_prompt, encode_text
from lm.padding import left_pad

log = logging.getLogger("serve.engine")
BASE = "__base__"  # peft's name for "no adapter" in adapter_names


@dataclass
class _Row:
    req: GenRequest
    generated: list[int] = field(default_factory=list)
    length: int = 0  # real (unpadded) tokens in the cache for this row
    emitted: int = 0  # characters of text already sent
    gen: torch.Generator | None = None


@dataclass
class _Command:
    """A call to run on the engine thread between steps; its (ok, result or exception) comes back on `done`."""

    fn: Callable[..., Any]
    args: tuple
    adapter: str | None = None  # an adapter the call swaps: it waits until no running row uses that adapter
    done: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=1))


class BatchingEngine(Engine):
    """Subclasses set up their model, then call `_start(tokenizer, ...)`, and implement `_forward`."""

    # The adapters whose weights this engine holds, name -> path. AdapterSync decides what is served;
    # this is the engine's own record, checked in _admit because an unload may land between the
    # serving layer's check and admission (the request then fails instead of running on missing weights).
    adapters: dict[str, str]

    def _start(self, tokenizer, model_name: str, max_batch: int, max_model_len: int, eos_ids: set[int]) -> None:
        """tokenizer: as lm.loading.load_tokenizer returns it (the chat template training used, a pad token)."""
        self.tok = tokenizer
        self.model_name = model_name
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.eos_ids = {i for i in eos_ids if i is not None}
        self._waiting: queue.Queue[GenRequest] = queue.Queue()
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, T) 1 = real token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{type(self).__name__}-loop", daemon=True)
        self._thread.start()

    @abstractmethod
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, adapters: list[str]):
        """(last-position logits (B, vocab) float32, new cache). cache=None: a prefill with no past."""

    # -- thread-safe API -------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        self._waiting.put(req)

    def tokenize(self, text: str) -> list[int]:
        return encode_text(self.tok, text)

    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        return encode_generation_prompt(self.tok, messages)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._rows), waiting=self._waiting.qsize())

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _call(self, fn, *args, adapter: str | None = None):
        """Run fn on the engine thread (between steps) and return its result.

        adapter: fn swaps that adapter's weights, so it waits until no running row uses it."""
        cmd = _Command(fn, args, adapter)
        self._commands.put(cmd)
        ok, value = cmd.done.get()
        if not ok:
            raise value
        return value

    # -- engine thread -----------------------------------------------------------
    def _run_commands(self) -> None:
        pending = []
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd.adapter is not None and any(r.req.adapter == cmd.adapter for r in self._rows):
                pending.append(cmd)  # never swap an adapter out from under a running row
                continue
            try:
                cmd.done.put((True, cmd.fn(*cmd.args)))
            except Exception as e:  # reported to the caller (admin API / registry watcher), the loop goes on
                cmd.done.put((False, e))
        for cmd in pending:
            self._commands.put(cmd)

    def _loop(self) -> None:
        while not self._stop.is_set():
            admitted: list[GenRequest] = []
            try:
                self._run_commands()
                admitted = self._admit()
                self._step(admitted)
            except Exception as e:  # a bug must not kill the server silently: fail the batch, keep serving
                log.exception("engine step failed")
                # Admitted requests may not be rows yet (prefill raised): fail them too, or they would hang.
                self._fail([r.req for r in self._rows] + admitted, f"engine error: {e}")
                self._rows, self._cache, self._mask = [], None, None

    def _step(self, admitted: list[GenRequest]) -> None:
        """Prefill what was admitted, then one decode step for every running row (or wait for work)."""
        if admitted:
            self._prefill(admitted)
        if self._rows:
            self._decode()
        elif not admitted:
            try:
                self._waiting.put(self._waiting.get(timeout=0.02))
            except queue.Empty:
                pass

    def _admit(self) -> list[GenRequest]:
        out: list[GenRequest] = []
        while len(self._rows) + len(out) < self.max_batch:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                break
            if req.cancelled.is_set():
                continue
            if not req.prompt_ids:  # nothing to condition on: the model must never see an empty row
                self._fail([req], "prompt must not be empty")
            elif req.adapter is not None and req.adapter not in self.adapters:
                self._fail([req], f"adapter {req.adapter!r} is not loaded")
            else:
                out.append(req)
        return out

    def _prefill(self, reqs: list[GenRequest]) -> None:
        ids, mask, pos = left_pad([r.prompt_ids for r in reqs], self.tok.pad_token_id)
        logits, cache = self._forward(ids, mask, pos, None, [r.adapter or BASE for r in reqs])
        rows = []
        for r in reqs:
            row = _Row(r, length=len(r.prompt_ids))
            if r.params.seed is not None:
                row.gen = torch.Generator().manual_seed(r.params.seed)
            rows.append(row)
        self._merge(rows, cache, mask)
        self._emit(rows, logits)

    def _merge(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        if self._cache is None:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        ta, tn = self._mask.shape[1], mask.shape[1]
        t = max(ta, tn)
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_lpad(old.keys, t), _lpad(new.keys, t)], dim=0)
            old.values = torch.cat([_lpad(old.values, t), _lpad(new.values, t)], dim=0)
        self._mask = torch.cat([_lpad(self._mask, t, dim=1), _lpad(mask, t, dim=1)], dim=0)
        self._rows += rows

    def _decode(self) -> None:
        ids = torch.tensor([[r.generated[-1]] for r in self._rows], dtype=torch.long)
        mask = torch.cat([self._mask, torch.ones((len(self._rows), 1), dtype=torch.long)], dim=1)
        pos = torch.tensor([[r.length] for r in self._rows], dtype=torch.long)
        logits, self._cache = self._forward(ids, mask, pos, self._cache, [r.req.adapter or BASE for r in self._rows])
        self._mask = mask
        for r in self._rows:
            r.length += 1
        self._emit(self._rows, logits)

    def _sample(self, row: _Row, logits: torch.Tensor, greedy_tok: int) -> int:
        p = row.req.params
        if p.greedy:
            return greedy_tok
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < p.top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=row.gen))

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each row's next token, send the text it settles; finished and cancelled rows leave."""
        finished = set()
        now = time.perf_counter()
        greedy = logits.argmax(-1).tolist()  # one batched argmax; sampled rows are drawn per row below
        for i, row in enumerate(rows):
            if row.req.cancelled.is_set() or self._advance(row, self._sample(row, logits[i], greedy[i]), now):
                finished.add(id(row))
        if finished:
            self._drop(finished)

    def _advance(self, row: _Row, tok: int, now: float) -> bool:
        """Add one sampled token to the row and send the text it settles; True when the row is done."""
        req = row.req
        if req.first_token_at is None:
            req.first_token_at = now
        reason = None
        if tok in self.eos_ids and not req.params.ignore_eos:
            reason = "stop"
        else:
            row.generated.append(tok)
        text = self.tok.decode(row.generated, skip_special_tokens=True)
        cut = _find_stop(text, req.params.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        if reason is None and (len(row.generated) >= req.params.max_tokens or row.length + 1 >= self.max_model_len):
            reason = "length"
        # Hold back a possible stop-string prefix and incomplete UTF-8 until they resolve.
        safe = len(text) if reason else _safe_len(text, req.params.stop)
        if safe > row.emitted:
            req.events.put(TextDelta(req.index, text[row.emitted:safe]))
            row.emitted = safe
        if reason:
            _end(req, Finished(req.index, reason, len(row.generated)))
        return reason is not None

    def _fail(self, reqs: list[GenRequest], message: str) -> None:
        for req in reqs:
            _end(req, Failed(req.index, message))

    def _drop(self, finished: set[int]) -> None:
        keep = [i for i, r in enumerate(self._rows) if id(r) not in finished]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        idx = torch.tensor(keep)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask[idx]
        first = int((self._mask.sum(0) > 0).nonzero()[0])  # leading columns that are padding in every row
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]


def _end(req: GenRequest, event: Finished | Failed) -> None:
    """Put a request's last event, once: a request failed after it finished must not end twice."""
    if not req.ended:
        req.ended = True
        req.events.put(event)


def _lpad(x: torch.Tensor, t: int, dim: int = 2) -> torch.Tensor:
    """Left-pad along `dim` with zeros to length t (KV: (B, H, T, D) dim 2; mask: (B, T) dim 1)."""
    missing = t - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _safe_len(text: str, stops: list[str]) -> int:
    n = len(text)
    if text.endswith("\ufffd"):
        n -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                hold = max(hold, k)
                break
    return n - hold


def as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
