"""Continuous batching: one background thread decodes every live request together.

Requests join and leave between decoding steps. Each loop iteration:

1. drop rows whose request was stopped (stop event set, or the consumer went away);
2. admit waiting requests (up to ``max_batch`` rows): prefill them together, left-padded, and
   merge their KV cache into the batch's (both left-padded to the longer length, the padding
   masked out); their first token comes from the prefill logits;
3. one decoding step for every row: input (B, 1) = each row's last token, position = the row's
   count of real tokens, attention mask (B, L + 1);
4. sample one token per row with that row's own settings; a row ends on one of *its* stop ids,
   at *its* ``max_new_tokens`` or when *its* stop event is set, and its row is dropped from the
   cache (leading all-padding columns are trimmed).

Rows may use different LoRA adapters: a batch with more than one adapter is run through peft's
mixed-adapter forward (``adapter_names=[...]``, one name per row); a batch with one adapter
makes it the active one. Only this thread runs the model or changes its adapters (through the
``prepare`` hook), so adapter loading can never interleave with a forward pass.

Each request receives only its own tokens, on its own queue: ``("token", id)`` per token, then
``("done", finish)`` with ``finish`` in ``eos | length | stopped``, or ``("error", exc)``;
its ``ended`` event is set with that last event (a reader may sleep on it between updates).
Caches other than plain ``DynamicLayer`` KV tensors (sliding windows, recurrent state) cannot be
merged; such models decode one request at a time (``mergeable`` is False), still correctly.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from training.rollout import left_pad, position_ids_from_mask

log = logging.getLogger(__name__)

class Inbox(queue.Queue):
    """One request's event queue that also wakes the reader of several requests: ``arrived`` is
    set on every event, ``ended`` on a request's last one (``done`` or ``error``)."""

    def __init__(self, arrived: threading.Event, ended: threading.Event):
        super().__init__()
        self.arrived, self.ended = arrived, ended

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if item[0] != "token":
            self.ended.set()
        self.arrived.set()

    def drain(self) -> list[tuple[str, object]]:
        """Every event waiting now, oldest first (none: empty); the reader's one wake-up for all."""
        events = []
        while True:
            try:
                events.append(self.get_nowait())
            except queue.Empty:
                return events


@dataclass(eq=False)
class Request:
    """One reply being generated. ``tokens`` (generated ids, stop token excluded) and ``finish``
    are written by the decode thread only; the consumer reads ``out``."""

    prompt: list[int]  # prompt token ids, template applied
    adapter: str | None  # peft adapter name for this row (None: the model as it is)
    stop_ids: frozenset[int]  # ids that end this reply (never emitted)
    stop_event: threading.Event  # set to end the reply early
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus mass, used when temperature > 0
    max_new_tokens: int = 128
    min_new_tokens: int = 0  # stop ids are masked out until this many tokens were generated
    generator: torch.Generator | None = None  # sampling RNG for this row (None: torch's global)
    out: queue.Queue = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    ended: threading.Event = field(default_factory=threading.Event)  # set with the last event on ``out``

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("a request needs at least one prompt token")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _lpad_time(x: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad (B, H, T, D) key/value states with zeros to T = ``length``."""
    return F.pad(x, (0, 0, length - x.shape[-2], 0)) if x.shape[-2] < length else x


def _lpad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad a (B, T) attention mask with zeros to T = ``length``."""
    return F.pad(mask, (length - mask.shape[1], 0)) if mask.shape[1] < length else mask


def sample(logits: torch.Tensor, rows: list[Request]) -> list[int]:
    """One token id per row from (B, V) float logits, each with its row's settings: stop ids
    masked below ``min_new_tokens``, then argmax (temperature 0) or temperature + top-p."""
    suppress = [i for i, r in enumerate(rows) if len(r.tokens) < r.min_new_tokens and r.stop_ids]
    if suppress:
        logits = logits.clone()
        for i in suppress:
            logits[i, list(rows[i].stop_ids)] = float("-inf")
    out = torch.argmax(logits, dim=-1).tolist()  # (B,) greedy for every row; sampled rows replaced
    for i, req in enumerate(rows):
        if req.temperature > 0:
            out[i] = _sample_row(logits[i], req)
    return out


def _sample_row(logits: torch.Tensor, req: Request) -> int:
    """One token id from (V,) float logits with temperature + top-p (``req.temperature`` > 0)."""
    probs = torch.softmax(logits / req.temperature, dim=-1)
    if req.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= req.top_p  # keep the smallest head >= top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=req.generator))


class Batcher:
    """Decodes concurrent requests in one batch on a background thread.

    Args:
        model: a causal LM (optionally a peft ``PeftModel``) in eval mode.
        pad_id: token id used for left padding (masked out, never attended to).
        max_batch: most rows decoded together; further requests wait for a free row.
        prepare: ``prepare(request, in_use)`` runs on the decode thread before a request is
            admitted (load its adapter; ``in_use`` = adapter names of the current rows, which
            must stay loaded). An exception fails that request only.
        set_adapter: ``set_adapter(name)`` makes one adapter active (single-adapter batches).
        on_busy: ``on_busy(True)`` when decoding starts after an idle spell and ``on_busy(False)``
            when nothing is left to decode, called in that order under the loop's lock (keep it
            quick: e.g. pause/resume a training child so that chat has the CPU; errors are logged).
    """

    def __init__(
        self,
        model,
        pad_id: int,
        max_batch: int = 8,
        prepare: Callable[[Request, set], None] | None = None,
        set_adapter: Callable[[str], None] | None = None,
        on_busy: Callable[[bool], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.pad_id = int(pad_id)
        self.max_batch = max_batch
        self.prepare = prepare
        self.set_adapter = set_adapter
        self.on_busy = on_busy
        self.mergeable = True  # becomes False at the first cache that cannot be merged
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.device = next(model.parameters()).device  # ids go there; logits come back to the CPU
        params = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()  # held for one whole loop iteration
        self._pending: list[Request] = []
        self._thread: threading.Thread | None = None
        self._rows: list[Request] = []
        self._cache = None  # the batch's KV cache, (B, H, L, D) per layer
        self._mask: torch.Tensor | None = None  # (B, L) 1 = real token
        self._next: torch.Tensor | None = None  # (B,) last sampled id per row, not yet fed
        self.stats = {"steps": 0, "prefills": 0, "max_rows": 0, "tokens": 0}

    # ---- public ---------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue ``req``; its events arrive on ``req.out``. Starts the decode thread if idle."""
        with self._cond:
            self._pending.append(req)
            if self._thread is None:
                self._notify_busy(True)
                self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return req

    def alive(self) -> bool:
        """True while the decode thread runs (it exits when there is nothing to decode)."""
        with self._cond:
            return self._thread is not None

    @contextmanager
    def paused(self):
        """Hold the decode loop between two iterations (tests: queue several requests so that
        they are admitted together)."""
        with self._step_lock:
            yield

    def counts(self) -> dict:
        """``{"rows": decoding now, "pending": waiting}``."""
        with self._cond:
            return {"rows": len(self._rows), "pending": len(self._pending)}

    # ---- the loop -------------------------------------------------------------------------
    def _notify_busy(self, busy: bool) -> None:
        if self.on_busy is not None:
            try:
                self.on_busy(busy)
            except Exception:  # noqa: BLE001 - a failing hook must not stop serving
                log.exception("on_busy(%s) hook failed", busy)

    def _run(self) -> None:
        while True:
            with self._step_lock:
                with self._cond:
                    if not self._rows and not self._pending:
                        self._thread = None
                        self._notify_busy(False)
                        return
                    room = self.max_batch if self.mergeable else (0 if self._rows else 1)
                    room = max(0, room - len(self._rows))
                    newcomers, self._pending = self._pending[:room], self._pending[room:]
                try:
                    self._drop_stopped()
                    if newcomers:
                        self._admit(newcomers)
                        newcomers = []
                    if self._rows:
                        self._step()
                except BaseException as exc:  # noqa: BLE001 - delivered to every affected request
                    log.exception("decode step failed; failing %d request(s)", len(self._rows) + len(newcomers))
                    for req in self._rows + newcomers:
                        if req.finish is None:
                            self._fail(req, exc)
                    self._reset()

    def _reset(self) -> None:
        with self._cond:
            self._rows = []
        self._cache = self._mask = self._next = None

    def _finish(self, req: Request, reason: str) -> None:
        req.finish = reason
        req.out.put(("done", reason))
        req.ended.set()

    def _fail(self, req: Request, exc: BaseException) -> None:
        req.finish = "error"
        req.out.put(("error", exc))
        req.ended.set()

    def _emit(self, rows: list[Request], tokens: list[int]) -> None:
        """Apply each row's stopping rule to its new token and send it to its consumer."""
        for req, tok in zip(rows, tokens, strict=True):
            if req.stop_event.is_set():
                self._finish(req, "stopped")
            elif tok in req.stop_ids:
                self._finish(req, "eos")
            else:
                req.tokens.append(tok)
                req.out.put(("token", tok))
                self.stats["tokens"] += 1
                if len(req.tokens) >= req.max_new_tokens:
                    self._finish(req, "length")

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, rows: list[Request]):
        """Model forward for ``rows``: ids/mask/pos (B, T) on the CPU → (logits (B, V) float on
        the CPU, where rows are sampled with their own generators; cache on the model's device)."""
        kwargs = {}
        names = [r.adapter for r in rows]
        if any(n is not None for n in names):
            if len(set(names)) > 1:
                kwargs["adapter_names"] = names
            elif self.set_adapter is not None:
                self.set_adapter(names[0])
        kwargs[self._cache_kw] = cache
        with torch.inference_mode():
            out = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos.to(self.device),
                use_cache=True, logits_to_keep=1, **kwargs
            )
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1].float().cpu(), new_cache

    def _admit(self, newcomers: list[Request]) -> None:
        """Prefill ``newcomers`` together and merge them into the batch."""
        ready = []
        in_use = {r.adapter for r in self._rows}
        for req in newcomers:
            if req.stop_event.is_set():
                self._finish(req, "stopped")
                continue
            try:
                if self.prepare is not None:
                    self.prepare(req, in_use)
            except Exception as exc:  # noqa: BLE001 - fails this request only
                self._fail(req, exc)
                continue
            in_use.add(req.adapter)
            ready.append(req)
        if not ready:
            return
        ids, mask = left_pad([r.prompt for r in ready], self.pad_id)  # (n, T)
        logits, cache = self._forward(ids, mask, position_ids_from_mask(mask), None, ready)
        self.stats["prefills"] += 1
        nxt = torch.tensor(sample(logits, ready), dtype=torch.long)
        if self._rows:
            self._merge(cache, mask)
        else:
            self._cache, self._mask = cache, mask
            self.mergeable = self.mergeable and all(
                type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", [None])
            )
        self._next = nxt if self._next is None else torch.cat([self._next, nxt])
        with self._cond:
            self._rows = self._rows + ready
            self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))
        self._emit(ready, nxt.tolist())
        self._compact()

    def _merge(self, cache, mask: torch.Tensor) -> None:
        """Append the newcomers' cache/mask (n rows) below the batch's, left-padding the shorter."""
        length = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_lpad_time(old.keys, length), _lpad_time(new.keys, length)])
            old.values = torch.cat([_lpad_time(old.values, length), _lpad_time(new.values, length)])
        self._mask = torch.cat([_lpad_mask(self._mask, length), _lpad_mask(mask, length)])

    def _step(self) -> None:
        """One decoding step for every row."""
        ids = self._next.unsqueeze(1)  # (B, 1)
        pos = self._mask.sum(dim=1, keepdim=True)  # (B, 1): real tokens so far = next position
        self._mask = F.pad(self._mask, (0, 1), value=1)  # (B, L + 1)
        logits, self._cache = self._forward(ids, self._mask, pos, self._cache, self._rows)
        self.stats["steps"] += 1
        rows = list(self._rows)
        self._next = torch.tensor(sample(logits, rows), dtype=torch.long)
        self._emit(rows, self._next.tolist())
        self._compact()

    def _drop_stopped(self) -> None:
        for req in self._rows:
            if req.finish is None and req.stop_event.is_set():
                self._finish(req, "stopped")
        self._compact()

    def _compact(self) -> None:
        """Drop finished rows from the batch and trim all-padding columns on the left."""
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, dtype=torch.long)
        self._mask = self._mask[index]
        self._next = self._next[index]
        first = int((self._mask.sum(dim=0) > 0).nonzero()[0])  # first column some row uses
        on_device = index.to(self.device)
        for layer in self._cache.layers:
            layer.keys = layer.keys[on_device, :, first:]
            layer.values = layer.values[on_device, :, first:]
        self._mask = self._mask[:, first:]
        with self._cond:
            self._rows = [self._rows[i] for i in keep]
