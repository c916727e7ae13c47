"""Serving engine: streams replies from the live policy (base + LoRA adapter) and hot-swaps
adapter versions published by training rounds.

Concurrent replies are decoded together by one background loop (:mod:`chatapp.batching`):
left-padded rows joining and leaving between decoding steps, one stopping rule per reply.
Several replies to one prompt (the answers of a comparison) are queued at once and stream
together from one batch (:meth:`ChatEngine.stream_many`).

Torn-free hot-swap: each reply resolves its version once, when it starts, and its row carries
that version's adapter name to its last token (peft mixed-adapter batches); a version published
mid-reply is loaded by the decode loop for the *next* reply, never swapped under a running one.

Nothing bad is served: a version is checked before its first reply — its files against the
checksum recorded at publishing, its weights finite, and at startup a forward pass with finite
logits. A live version that fails is taken out of service (``'rejected'``, with the reason as
its note, logged) and the newest version that was live before and passes serves instead; when
none does, a fresh adapter (the base model) is published, so the app always starts.

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
from dataclasses import asdict, dataclass, field

import torch
from safetensors import SafetensorError

from chatapp.batching import Batcher, Inbox, Request
from chatapp.streams import drain, map_stream
from chatapp.text import ReplyText, split_reasoning, template_special_ids
from storage.registry import AdapterRegistry, CorruptAdapter, RewardModelRegistry
from training.chat_format import end_of_turn_ids, fit_messages, inert_text, render_prompt
from training.models import (
    NonFiniteAdapter,
    add_lora,
    check_adapter_weights,
    context_window,
    load_lora,
    save_adapter,
)

log = logging.getLogger(__name__)

# why a published version cannot be served: its files changed (checksum), are missing, truncated
# or unreadable, its weights or logits are not finite, or peft/torch cannot load them
UNSERVABLE = (CorruptAdapter, NonFiniteAdapter, OSError, ValueError, RuntimeError, SafetensorError)


@dataclass
class Sampling:
    """Sampling settings for one reply; stored with every comparison."""

    temperature: float = 0.8  # softmax temperature; 0 means greedy decoding
    top_p: float = 0.95  # nucleus sampling mass
    max_new_tokens: int = 128  # reply length limit, in tokens
    min_new_tokens: int = 0  # end-of-turn ids are suppressed until this many tokens (tests, benches)
    seed: int | None = None  # sampling seed of the reply (None: torch's global RNG)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")

    def as_dict(self) -> dict:
        """The settings as stored with a reply (defaults of the test-only fields left out)."""
        d = asdict(self)
        for key in ("min_new_tokens", "seed"):
            if d[key] == Sampling.__dataclass_fields__[key].default:
                del d[key]
        return d


@dataclass
class Reply:
    """A finished (or stopped) reply: its answer text (reasoning removed), the policy version
    that produced it and whether it was stopped before its end (stopped replies are never offered
    for voting)."""

    text: str
    version: int
    stopped: bool
    sampling: dict
    tokens: list[int] = field(default_factory=list)  # generated ids, the stop id excluded
    finish: str = "eos"  # eos | length | stopped
    reasoning: str = ""  # removed <think> content


class ChatEngine:
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
        self.stream_interval_s = stream_interval_s
        self.tokenizer = tokenizer
        self.registry = registry
        self.store = registry.store
        self.eos_ids = end_of_turn_ids(base_model, tokenizer)
        self.stop_ids = frozenset(self.eos_ids) | frozenset(template_special_ids(tokenizer))
        self.window = context_window(base_model)
        self.keep_loaded = keep_loaded
        self._loaded: list[int] = []  # adapter versions loaded into self.model, oldest first
        self._vetted: set[int] = set()  # versions whose files passed the checks (_vet)
        self._vet_lock = threading.Lock()
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
        peft_model = add_lora(model, adapter_name=name)
        staging = self.registry.staging_dir()
        save_adapter(peft_model, name, staging)
        version = self.registry.publish(staging, parent=None, round_id=None, metrics={}, live=True)
        if self.adapter_name(version) != name:
            peft_model.delete_adapter(name)
            load_lora(peft_model, self.registry.path(version), self.adapter_name(version))
        peft_model.set_adapter(self.adapter_name(version))
        self._vetted.add(version)
        self._loaded.append(version)
        peft_model.eval()
        return peft_model

    def _vet(self, version: int) -> None:
        """Check version ``version``'s files: the recorded checksum, finite weights.

        Raises:
            one of ``UNSERVABLE``: see the module docstring.
        """
        check_adapter_weights(self.registry.path(version))

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

    def _fall_back(self, bad: int, exc: Exception, tried: set[int]) -> int | None:
        """Take live version ``bad`` out of service for ``exc`` and return the version serving
        instead: the newest one that was live before (``'retired'``) and not ``tried`` yet (it is
        checked by the caller's next pass), or None (none is left)."""
        tried.add(bad)
        older = [v["version"] for v in reversed(self.store.versions())
                 if v["status"] == "retired" and v["version"] not in tried]
        fallback = older[0] if older else None
        reason = f"{exc.__class__.__name__}: {exc}"
        log.error("policy version %s cannot be served (%s); %s", bad, reason,
                  f"version {fallback} serves instead" if fallback is not None else "a fresh adapter is published")
        self.store.quarantine_version(bad, fallback, f"taken out of service: {reason}")
        return fallback

    def live_version(self) -> int:
        """The version that serves the next reply (read from the registry each time). A version
        not served before is checked first (:meth:`_vet`) and, when it fails, replaced by the
        last good one (:meth:`_fall_back`).

        Raises:
            RuntimeError: no version is live, or none can be served.
        """
        live = self.store.live_version()
        if live is None:
            raise RuntimeError("no live policy version is registered")
        if live in self._vetted:
            return live
        with self._vet_lock:
            tried: set[int] = set()
            while live is not None and live not in self._vetted:
                try:
                    self._vet(live)
                    self._vetted.add(live)
                except UNSERVABLE as exc:
                    live = self._fall_back(live, exc, tried)
        if live is None:
            raise RuntimeError("no published policy version can be served (see the log); restart the app to "
                               "publish a fresh one")
        return live

    def previous_version(self) -> int | None:
        """The version the live one was trained from (its parent), if any and if it passes the
        checks of :meth:`_vet` (else None: comparisons then show the live version twice)."""
        parent = self.store.version(self.live_version()).get("parent")
        if parent is None or parent in self._vetted:
            return parent
        try:
            self._vet(parent)
        except UNSERVABLE as exc:
            log.warning("policy version %s (the live version's parent) is not compared: %s", parent, exc)
            return None
        self._vetted.add(parent)
        return parent

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
    def prompt_ids(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        """Token ids of the prompt after dropping the oldest turns that do not fit.

        Raises:
            training.chat_format.ContextTooLongError: the newest message alone does not fit.
        """
        kept = fit_messages(self.tokenizer, messages, self.window, max_new_tokens)
        return render_prompt(self.tokenizer, kept)

    def stream(
        self,
        messages: list[dict],
        sampling: Sampling | None = None,
        version: int | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[str]:
        """Stream a reply to ``messages``; yields the answer text so far each time it grows (at
        least once: an empty reply yields ``""``), and returns (``StopIteration.value``) a
        :class:`Reply`. One reply of :meth:`stream_many`.

        Closing the generator early (a closed tab) or setting ``stop_event`` (the stop button)
        ends the reply at the decode loop's next step; such a reply has ``stopped=True``.

        Args:
            messages: ``{"role", "content"}`` dicts ending with the user message to answer.
            sampling: sampling settings (default :class:`Sampling`).
            version: the policy version to use; default the live one, resolved at the first
                ``next``.
            stop_event: set it to end generation early.

        Raises:
            training.chat_format.ContextTooLongError: the newest message alone does not fit.
            FileNotFoundError: ``version`` has no adapter directory.
            RuntimeError: the decode loop ended without finishing the reply.
        """
        version = self.live_version() if version is None else version
        replies = yield from map_stream(self.stream_many(messages, [version], sampling, stop_event),
                                        lambda texts: texts[0])
        return replies[0]

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
        if not versions:
            raise ValueError("stream_many needs at least one version")
        sampling = sampling or Sampling()
        stop_event = stop_event or threading.Event()
        ids = self.prompt_ids(messages, sampling.max_new_tokens)
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
                    while True:  # drain: one yield for all tokens that arrived meanwhile
                        try:
                            kind, value = req.out.get_nowait()
                        except queue.Empty:
                            break
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

    def sample_many(self, messages: list[dict], versions: list[int], sampling: Sampling | None = None,
                    stop_event: threading.Event | None = None, timeout_s: float = 600.0) -> list[Reply]:
        """The replies of :meth:`stream_many` (one per entry of ``versions``, decoded in one
        batch), without streaming: returns when all are done.

        Raises:
            as :meth:`stream_many`.
        """
        return drain(self.stream_many(messages, versions, sampling, stop_event, timeout_s=timeout_s))

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

    def reply(self, messages: list[dict], sampling: Sampling | None = None, version: int | None = None) -> Reply:
        """The whole reply at once (no streaming); see :meth:`stream`."""
        return drain(self.stream(messages, sampling=sampling, version=version))
