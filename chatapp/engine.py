"""Serving engine: streams replies from the live policy (base + LoRA adapter) and hot-swaps
adapter versions published by training rounds.

Concurrent replies are decoded together by one background loop (:mod:`chatapp.batching`):
left-padded rows joining and leaving between decoding steps, one stopping rule per reply.
Several replies to one prompt (the answers of a comparison) are queued at once and stream
together from one batch (:meth:`ChatEngine.stream_many`).

Torn-free hot-swap: each reply resolves its version once, when it starts, and its row carries
that version's adapter name to its last token (peft mixed-adapter batches); a version published
mid-reply is loaded by the decode loop for the *next* reply, never swapped under a running one.

Nothing bad is served (:class:`chatapp.served.ServedVersions`, shared with the vLLM backend):
a version is checked before its first reply — its files against the checksum recorded at
publishing, its weights finite, and here, at startup, a forward pass with finite logits. A live
version that fails is taken out of service and the newest version that was live before and
passes serves instead; when none does, a fresh adapter (the base model) is published
(:func:`publish_fresh_adapter`), so the app always starts.

Text: see :mod:`chatapp.text` (stop ids, special tokens never shown, ``<think>`` removed from the
answer). Context: the oldest whole turns are dropped until prompt + ``max_new_tokens`` fits
(:func:`training.chat_format.fit_messages`); a message too long on its own raises
:class:`training.chat_format.ContextTooLongError` before anything is generated.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import torch

from chatapp.batching import Batcher, Inbox, Request
from chatapp.served import UNSERVABLE, Reply, Sampling, ServedVersions
from chatapp.text import ReplyText, split_reasoning, template_special_ids
from storage.registry import AdapterRegistry, RewardModelRegistry
from training.chat_format import end_of_turn_ids, inert_text
from training.models import NonFiniteAdapter, add_lora, context_window, load_lora, save_adapter

log = logging.getLogger(__name__)

__all__ = ["UNSERVABLE", "ChatEngine", "Reply", "Sampling", "publish_fresh_adapter"]


def publish_fresh_adapter(model, registry: AdapterRegistry, name: str | None = None):
    """Publish a fresh LoRA adapter on ``model`` (B = 0: the base model itself) as the next
    policy version, live: the first version of a new data dir, or the fallback when no
    published version can be served. Returns ``(the peft model holding it as adapter
    ``name``, default ``v{N}``, the version number)``."""
    name = name or ChatEngine.adapter_name(registry.store.next_version())
    peft_model = add_lora(model, adapter_name=name)
    staging = registry.staging_dir()
    save_adapter(peft_model, name, staging)
    version = registry.publish(staging, parent=None, round_id=None, metrics={}, live=True)
    return peft_model, version


class ChatEngine(ServedVersions):
    """Streams chat replies from ``base_model`` with the live LoRA adapter from ``registry``.

    Args:
        base_model: a causal LM (optionally bitsandbytes-quantized) in eval mode.
        tokenizer: its tokenizer, with a chat template.
        registry: the adapter registry; its store says which version is live.
        keep_loaded: how many adapter versions stay loaded at once (live, previous, …); versions
            that running replies use are never unloaded.
        max_batch: most replies decoded together; more wait for a free row.
        stream_interval_s: seconds between two streamed updates of one reply (tokens that
            arrive meanwhile are shown together; 0.02 s = 50 updates/s, more than a screen
            shows): the reader wakes once per update instead of once per token, which leaves
            the CPU to decoding. The first text and the end of a reply are never delayed.

    ``engine.batcher.on_busy`` may be set to a quick ``hook(busy: bool)`` called when decoding
    starts after an idle spell and when it ends (e.g. to pause a training child meanwhile).
    Torch threads are process-wide: set them (``torch.set_num_threads``) before building the
    engine (``bench.serving`` compares thread counts).
    """

    def __init__(
        self, base_model, tokenizer, registry: AdapterRegistry, keep_loaded: int = 3, max_batch: int = 8,
        stream_interval_s: float = 0.02,
    ):
        if stream_interval_s < 0:
            raise ValueError(f"stream_interval_s must be >= 0, got {stream_interval_s}")
        super().__init__(tokenizer, registry, context_window(base_model))
        self.stream_interval_s = stream_interval_s
        self.eos_ids = end_of_turn_ids(base_model, tokenizer)
        self.stop_ids = frozenset(self.eos_ids) | frozenset(template_special_ids(tokenizer))
        self.keep_loaded = keep_loaded
        self._loaded: list[int] = []  # adapter versions loaded into self.model, oldest first
        self.model = self._ensure_version_zero(base_model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.batcher = Batcher(
            self.model, pad_id, max_batch=max_batch, prepare=self._prepare, set_adapter=self._set_adapter
        )
        self._rm = None  # the reward model that scores comparison answers (an adapter on self.model)
        self._rm_dir = None  # the directory it was loaded from
        self._rm_lock = threading.Lock()

    # ---- adapters -------------------------------------------------------------------------
    @staticmethod
    def adapter_name(version: int) -> str:
        return f"v{version}"

    def _ensure_version_zero(self, base_model):
        """Wrap the base in a PeftModel holding the live adapter, checked (files, weights, one
        forward pass with finite logits) and replaced by the last good version when it fails
        (:meth:`_fall_back`). On first run, or when no published version can be served, publish
        a fresh LoRA adapter (B = 0, so identical to the base) as the next version, live."""
        model, tried = base_model, set()
        live = self.store.live_version()
        while live is not None:
            try:
                self._vet(live)  # checksum and weights
                model = load_lora(model, self.registry.path(live, verify=False), self.adapter_name(live))
                self._probe(model, live)
            except UNSERVABLE as exc:
                live = self._fall_back(live, exc, tried)
                continue
            self._vetted.add(live)
            self._loaded.append(live)
            model.eval()
            return model
        name = self.adapter_name(self.store.next_version())
        peft_model, version = publish_fresh_adapter(model, self.registry, name)
        if self.adapter_name(version) != name:
            peft_model.delete_adapter(name)
            load_lora(peft_model, self.registry.path(version), self.adapter_name(version))
        peft_model.set_adapter(self.adapter_name(version))
        self._vetted.add(version)
        self._loaded.append(version)
        peft_model.eval()
        return peft_model

    @torch.no_grad()
    def _probe(self, model, version: int) -> None:
        """One forward pass with version ``version``'s adapter (loaded in ``model``) on a short
        input; its logits must be finite. A failing adapter is removed from ``model``.

        Raises:
            NonFiniteAdapter: NaN or inf logits.
        """
        name = self.adapter_name(version)
        model.set_adapter(name)
        token = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_ids[0]
        device = next(model.parameters()).device
        logits = model(input_ids=torch.tensor([[token, token]], device=device)).logits
        if not bool(torch.isfinite(logits).all()):
            model.delete_adapter(name)
            raise NonFiniteAdapter(f"policy version {version} gives NaN or inf logits")

    def _set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter (decode thread only)."""
        if self.model.active_adapter != name:
            self.model.set_adapter(name)

    def _prepare(self, req: Request, in_use: set) -> None:
        """Load the adapter of ``req`` if needed (decode thread only, between two steps) and
        unload the oldest versions beyond ``keep_loaded`` that no running reply uses.

        Raises:
            FileNotFoundError: the version's adapter directory is missing.
        """
        version = int(req.adapter[1:])
        if version not in self._loaded:
            load_lora(self.model, self.registry.path(version), req.adapter)
            self.model.eval()
            self._loaded.append(version)
        keep = {version, self.store.live_version()} | {int(n[1:]) for n in in_use if n}
        for victim in [v for v in self._loaded if v not in keep][: max(0, len(self._loaded) - self.keep_loaded)]:
            if self.model.active_adapter == self.adapter_name(victim):
                self.model.set_adapter(req.adapter)
            self.model.delete_adapter(self.adapter_name(victim))
            self._loaded.remove(victim)

    # ---- generation -----------------------------------------------------------------------
    def stream_many(
        self,
        messages: list[dict],
        versions: list[int],
        sampling: Sampling | None = None,
        stop_event: threading.Event | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[list[str]]:
        """Stream one reply per entry of ``versions`` to ``messages``, decoded together: all
        requests are queued at once, so the decode loop admits them at its next step (a request
        queued just after the loop took the first joins the batch one step later) and decodes
        them in one batch (n answers cost about one answer's time, not n; while other replies
        fill ``max_batch``, the rest wait for free rows). Yields the list of the n
        answer texts so far each time one of them grows (at least once), and returns
        (``StopIteration.value``) the list of n :class:`Reply`, in the order of ``versions``.

        Updates are coalesced as the single reply's are (``stream_interval_s``): once every
        unfinished reply shows text, tokens arriving within the interval are shown together;
        the end of any reply is shown at once. ``stop_event`` ends every one of them
        (``stopped=True``), and so does closing the generator early or an error in any one.
        With ``sampling.seed``, reply i uses ``seed + i``.

        Args:
            messages: ``{"role", "content"}`` dicts ending with the user message to answer.
            versions: the policy version of each reply (at least one).
            sampling: sampling settings of every reply (default :class:`Sampling`).
            stop_event: set it to end generation early.
            timeout_s: seconds after which unfinished replies are stopped and an error raised
                (None: no limit).

        Raises:
            ValueError: ``versions`` is empty.
            training.chat_format.ContextTooLongError: the newest message alone does not fit.
            FileNotFoundError: a version has no adapter directory (the decode loop's error for
                that request, raised as is).
            RuntimeError: the decode loop ended without finishing a reply.
            TimeoutError: not finished within ``timeout_s`` (the requests are stopped).
        """
        sampling, stop_event, ids = self._begin(messages, versions, sampling, stop_event)
        arrived, ended = threading.Event(), threading.Event()
        reqs = [self._request(ids, sampling, v, stop_event, None if sampling.seed is None else sampling.seed + i,
                              Inbox(arrived, ended))
                for i, v in enumerate(versions)]
        texts = [ReplyText(self.tokenizer) for _ in reqs]
        done = [False] * len(reqs)
        shown: list[str] = [""] * len(reqs)
        yielded_any, last_yield = False, 0.0
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            for req in reqs:  # queued together: admitted at the loop's next step (or the one after)
                self.batcher.submit(req)
            while not all(done):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{len(reqs)} answers not finished within {timeout_s:.0f} s")
                # coalesce: once every unfinished reply shows text, let tokens pile up for
                # stream_interval_s unless a reply ends first (one wake-up per update, not per
                # token; the first text and the end are delivered at once)
                wait = last_yield + self.stream_interval_s - time.monotonic()
                if wait > 0 and all(s or d for s, d in zip(shown, done, strict=True)):
                    ended.wait(wait)
                if not arrived.wait(1.0):
                    if not self.batcher.alive() and all(r.out.empty() for r in reqs):
                        raise RuntimeError("the decode loop ended without finishing this reply")
                    continue
                arrived.clear()  # before draining: an event put after this sets it again
                ended.clear()
                grew = False
                for i, (req, text) in enumerate(zip(reqs, texts, strict=True)):
                    for kind, value in req.out.drain():  # one yield for all tokens that arrived meanwhile
                        if kind == "error":
                            raise value
                        if kind == "done":
                            done[i] = True
                        else:
                            grew = text.add(value) or grew
                answers = [t.answer for t in texts]
                if grew and answers != shown:
                    shown, yielded_any = answers, True
                    yield list(shown)
                    last_yield = time.monotonic()
        finally:
            if not all(done):  # the consumer went away (closed tab), an error or a timeout: end them now
                stop_event.set()
        replies = [self._reply(req, text, sampling, v) for req, text, v in zip(reqs, texts, versions, strict=True)]
        if not yielded_any:  # a stream yields at least once (empty or unprintable replies: "")
            yield [r.text for r in replies]
        return replies

    def _request(self, ids: list[int], sampling: Sampling, version: int, stop_event: threading.Event,
                 seed: int | None, out: queue.Queue) -> Request:
        """A decode-loop request for prompt ``ids`` with version ``version``'s adapter, its
        events put on ``out``."""
        return Request(
            prompt=ids,
            adapter=self.adapter_name(version),
            stop_ids=self.stop_ids,
            stop_event=stop_event,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens,
            generator=None if seed is None else torch.Generator().manual_seed(seed),
            out=out,
        )

    def _reply(self, req: Request, text: ReplyText, sampling: Sampling, version: int) -> Reply:
        """The :class:`Reply` of a finished request whose tokens ``text`` has read; its text is
        inert (:func:`training.chat_format.inert_text`): a special token the model spelled out
        in ordinary pieces never becomes one when the answer is stored, trained on or exported."""
        answer, reasoning = split_reasoning(text.finish(), partial=False)
        return Reply(
            text=inert_text(self.tokenizer, answer.strip()),
            version=version,
            stopped=req.finish == "stopped",
            sampling=sampling.as_dict(),
            tokens=list(req.tokens),
            finish=req.finish,
            reasoning=reasoning,
        )

    # ---- the reward model, for choosing which answers to compare --------------------------
    def member_scores(self, messages: list[dict], answers: list[str]) -> torch.Tensor | None:
        """(K, n) the ensemble members' scores of ``answers`` to ``messages`` under the newest
        published reward model (``DATA/reward``), loaded as one more adapter on the serving base
        (no second copy of the weights) and reloaded when a round publishes a newer one; None
        while there is no reward model with an ensemble. Runs with the decode loop held between
        two steps, so the adapter switch never meets a running forward pass."""
        from training.reward_model import RewardModel
        from training.reward_training import score

        if not self.registry.data_dir.reward_models.is_dir():  # no round has published one (and none is made here)
            return None
        latest = RewardModelRegistry(self.registry.data_dir).latest()
        if latest is None:
            return None
        with self._rm_lock, self.batcher.paused():
            if self._rm_dir != latest:
                if self._rm is not None:
                    self._rm.release()
                    self._rm = None
                self._rm = RewardModel.load(self.model, latest, adapter=f"reward_{latest.name}")
                self._rm_dir = latest
                log.info("comparison pairs are chosen with the reward model in %s (%d members)",
                         latest, self._rm.members)
            if not self._rm.members:
                return None
            return score(self._rm, self.tokenizer, [messages] * len(answers), answers, members=True)
