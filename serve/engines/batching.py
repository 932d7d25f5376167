"""Continuous batching shared by the engines: a scheduler over a model-specific forward pass.

    waiting queue ──admit──> prefill (left-padded batch, adapter per row)
                                 │ merge KV cache (left-pad to common length)
                                 v
    running batch ──decode step (1 token per row, adapter per row)──> events per request
                                 │ drop finished/cancelled rows (index KV cache)

All model work happens on one thread; HTTP threads only enqueue requests, tokenize (each with a
tokenizer of its own, tokenizer_pool.py) and read events. Every submitted request ends with exactly
one Finished or Failed event, whatever raises where: a request that never hears back hangs its client.
A subclass supplies `_forward` (PyTorch + LoRA, or ONNX Runtime) and its KV cache, which only
needs `.layers[i].keys` / `.values` tensors of shape (batch, kv_heads, time, head_dim).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from serve.engines.adapter_cache import Refusal, gone
from serve.engines.base import Engine, EngineStats, Failed, Finished, GenRequest, TextDelta
from serve.engines.detokenize import Detokenizer, cleans_up_spaces
from serve.engines.stops import emit_safe_len, find_stop
from serve.engines.tokenizer_pool import TokenizerPool
from lm.chat import encode_generation_prompt, encode_text
from lm.padding import left_pad

log = logging.getLogger("serve.engine")
BASE = "__base__"  # peft's name for "no adapter" in adapter_names


STOPPED = "engine stopped"  # the message of requests and commands the engine will never run


@dataclass
class _Row:
    req: GenRequest
    detok: Detokenizer
    generated: list[int] = field(default_factory=list)
    length: int = 0  # real (unpadded) tokens in the cache for this row
    unsent: str = ""  # settled text not sent yet: a possible start of a stop string
    gen: torch.Generator | None = None


@dataclass
class _Command:
    """A call to run on the engine thread between steps; its (ok, result or exception) comes back on `done`."""

    fn: Callable[..., Any]
    args: tuple
    adapter: str | None = None  # an adapter the call swaps: it waits until no running row uses that adapter,
    # and meanwhile no new row for it is admitted, so the wait ends within one generation's length
    done: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=1))


class BatchingEngine(Engine):
    """Subclasses set up their model, then call `_start(tokenizer, ...)`, and implement `_forward`."""

    # The adapters whose weights this engine holds, name -> path. AdapterSync decides what is served;
    # this is the engine's own record, checked in _admit because an unload may land between the
    # serving layer's check and admission (the request then fails instead of running on missing weights).
    adapters: dict[str, str]

    def _start(self, tokenizer, model_name: str, max_batch: int, max_model_len: int, eos_ids: set[int]) -> None:
        """tokenizer: as lm.loading.load_tokenizer returns it (the chat template training used, a pad token)."""
        self.tok = tokenizer  # the engine thread's own: HTTP threads borrow copies from self._tokenizers
        self._tokenizers = TokenizerPool(tokenizer)
        self._whole_text = cleans_up_spaces(tokenizer)  # such a tokenizer cannot be decoded by windows
        self.model_name = model_name
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.eos_ids = {i for i in eos_ids if i is not None}
        self._waiting: queue.Queue[GenRequest] = queue.Queue()  # submitted by HTTP threads
        self._backlog: collections.deque[GenRequest] = collections.deque()  # taken from _waiting, not yet admitted
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._pending: list[_Command] = []  # commands waiting for their adapter's rows to finish
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, T) 1 = real token
        self._stop = threading.Event()
        self._closed = threading.Event()  # set once the loop has failed everything left: nothing runs after
        self._thread = threading.Thread(target=self._loop, name=f"{type(self).__name__}-loop", daemon=True)
        self._thread.start()

    @abstractmethod
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, adapters: list[str]):
        """(last-position logits (B, vocab) float32, new cache). cache=None: a prefill with no past."""

    # -- thread-safe API -------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        self._waiting.put(req)
        if self._closed.is_set():  # the loop is gone: fail it here (and anything else that slipped in)
            self._fail(_drain(self._waiting), STOPPED)

    def tokenize(self, text: str) -> list[int]:
        with self._tokenizers.lend() as tok:
            return encode_text(tok, text)

    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        with self._tokenizers.lend() as tok:
            return encode_generation_prompt(tok, messages)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self._rows), waiting=self._waiting.qsize() + len(self._backlog))

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _call(self, fn, *args, adapter: str | None = None):
        """Run fn on the engine thread (between steps) and return its result.

        adapter: fn swaps that adapter's weights, so it waits until no running row uses it."""
        cmd = _Command(fn, args, adapter)
        self._commands.put(cmd)
        while True:
            try:
                ok, value = cmd.done.get(timeout=0.5)
                break
            except queue.Empty:
                if self._closed.is_set() and cmd.done.empty():  # the loop died or stopped meanwhile
                    raise RuntimeError(STOPPED) from None
        if not ok:
            raise value
        return value

    # -- engine thread -----------------------------------------------------------
    def _run_commands(self) -> None:
        self._pending += _drain(self._commands)
        busy = {r.req.adapter for r in self._rows}
        still = []
        for cmd in self._pending:
            if cmd.adapter is not None and cmd.adapter in busy:
                still.append(cmd)  # never swap an adapter out from under a running row
                continue
            try:
                cmd.done.put((True, cmd.fn(*cmd.args)))
            except Exception as e:  # reported to the caller (admin API / registry watcher), the loop goes on
                cmd.done.put((False, e))
        self._pending = still

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                admitted: list[GenRequest] = []
                try:
                    self._run_commands()
                    self._admit(admitted)
                    self._step(admitted)
                except Exception as e:  # a bug must not kill the server silently: fail the batch, keep serving
                    log.exception("engine step failed")
                    # Admitted requests may not be rows yet (prefill raised): fail them too, or they would hang.
                    self._fail([r.req for r in self._rows] + admitted, f"engine error: {e}")
                    self._rows, self._cache, self._mask = [], None, None
        finally:
            self._close()

    def _close(self) -> None:
        """The loop ends (shutdown, or a BaseException): every request and command still here fails."""
        self._closed.set()
        self._fail([r.req for r in self._rows] + list(self._backlog) + _drain(self._waiting), STOPPED)
        self._rows, self._cache, self._mask = [], None, None
        for cmd in self._pending + _drain(self._commands):
            cmd.done.put((False, RuntimeError(STOPPED)))
        self._pending = []

    def _step(self, admitted: list[GenRequest]) -> None:
        """Prefill what was admitted, then one decode step for every running row (or wait for work)."""
        if admitted:
            self._prefill(admitted)
        if self._rows:
            self._decode()
        elif not admitted and not self._backlog:
            try:
                self._backlog.append(self._waiting.get(timeout=0.02))  # idle: sleep until a request comes
            except queue.Empty:
                pass

    def _admit(self, out: list[GenRequest]) -> None:
        """Move waiting requests into `out` while there are free slots (out is the caller's: on an
        exception it still holds what was taken). Requests for an adapter being swapped wait in the backlog."""
        swapping = {c.adapter for c in self._pending if c.adapter is not None}
        held: list[GenRequest] = []
        while len(self._rows) + len(out) < self.max_batch:
            req = self._next_waiting()
            if req is None:
                break
            if req.cancelled.is_set():
                continue
            if req.adapter in swapping:
                held.append(req)  # admitting it would keep the swap waiting for as long as traffic lasts
            elif not req.prompt_ids:  # nothing to condition on: the model must never see an empty row
                self._fail([req], "prompt must not be empty")
            elif req.adapter is not None and req.adapter not in self.adapters:
                refusal = self._not_held(req)  # None: the engine loads the adapter and brings req back
                if refusal:
                    self._fail([req], refusal.message, not_found=refusal.gone)
            else:
                out.append(req)
        self._backlog.extendleft(reversed(held))  # first in line once the swap is done

    def _not_held(self, req: GenRequest) -> Refusal | None:
        """Adapter weights not held: None if the engine parks req to load them (it returns later), else why it fails."""
        return gone(req.adapter)

    def _next_waiting(self) -> GenRequest | None:
        if self._backlog:
            return self._backlog.popleft()
        try:
            return self._waiting.get_nowait()
        except queue.Empty:
            return None

    def _prefill(self, reqs: list[GenRequest]) -> None:
        """Prefill `reqs` and add them to the running batch. A forward that raises fails the requests it
        was for, one by one (a poisoned request does not take its neighbours down); the running rows'
        cache is untouched by a prefill, so they go on."""
        rows = []
        for r in reqs:
            try:
                rows.append(self._new_row(r))
            except Exception as e:  # e.g. a seed torch refuses: this request's own fault
                self._fail([r], f"engine error: {e}")
        reqs = [row.req for row in rows]
        if not reqs:
            return
        ids, mask, pos = left_pad([r.prompt_ids for r in reqs], self.tok.pad_token_id)
        try:
            logits, cache = self._forward(ids, mask, pos, None, [r.adapter or BASE for r in reqs])
        except Exception as e:
            if len(reqs) == 1:
                log.exception("prefill failed")
                self._fail(reqs, f"engine error: {e}")
                return
            for r in reqs:
                self._prefill([r])
            return
        self._merge(rows, cache, mask)
        self._emit(rows, logits)

    def _new_row(self, req: GenRequest) -> _Row:
        row = _Row(req, Detokenizer(self.tok, whole=self._whole_text), length=len(req.prompt_ids))
        if req.params.seed is not None:
            row.gen = torch.Generator().manual_seed(req.params.seed)
        return row

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
        """Sample each row's next token, send the text it settles; finished and cancelled rows leave.
        A row whose sampling or text raises fails alone (NaN logits, a tokenizer error)."""
        finished = set()
        now = time.perf_counter()
        greedy = logits.argmax(-1).tolist()  # one batched argmax; sampled rows are drawn per row below
        for i, row in enumerate(rows):
            try:
                done = row.req.cancelled.is_set() or self._advance(row, self._sample(row, logits[i], greedy[i]), now)
            except Exception as e:
                log.exception("row failed")
                self._fail([row.req], f"engine error: {e}")
                done = True
            if done:
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
        if reason is None and (len(row.generated) >= req.params.max_tokens or row.length + 1 >= self.max_model_len):
            reason = "length"
        row.unsent += row.detok.step(row.generated, final=reason is not None)
        # Sent text never holds the start of a stop string (held back below), so a stop lies in `unsent`.
        cut = find_stop(row.unsent, req.params.stop)
        if cut is not None:
            row.unsent, reason = row.unsent[:cut], "stop"
        safe = len(row.unsent) if reason else emit_safe_len(row.unsent, req.params.stop)
        if safe > 0:
            req.events.put(TextDelta(req.index, row.unsent[:safe]))
            row.unsent = row.unsent[safe:]
        if reason:
            _end(req, Finished(req.index, reason, len(row.generated)))
        return reason is not None

    def _fail(self, reqs: list[GenRequest], message: str, not_found: bool = False) -> None:
        for req in reqs:
            _end(req, Failed(req.index, message, not_found))

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


_END_LOCK = threading.Lock()  # submit() may fail a request from an HTTP thread while the loop closes


def _end(req: GenRequest, event: Finished | Failed) -> None:
    """Put a request's last event, once: a request failed after it finished must not end twice."""
    with _END_LOCK:
        if req.ended:
            return
        req.ended = True
    req.events.put(event)


def _drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def _lpad(x: torch.Tensor, t: int, dim: int = 2) -> torch.Tensor:
    """Left-pad along `dim` with zeros to length t (KV: (B, H, T, D) dim 2; mask: (B, T) dim 1)."""
    missing = t - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
