"""Serving engine: streams replies from the live policy (base + LoRA adapter) and hot-swaps
adapter versions published by training rounds.

Each reply resolves the live version once, at its start, and uses that adapter from its first
token to its last: adapter switches happen under the same lock as generation, so a version
published mid-reply only takes effect for the next reply.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from storage.registry import AdapterRegistry
from training.models import (
    add_lora,
    context_window,
    end_of_turn_ids,
    fit_messages,
    load_lora,
    render_prompt,
)

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """Sampling settings for one reply; stored with every comparison."""

    temperature: float = 0.8  # softmax temperature; 0 means greedy decoding
    top_p: float = 0.95  # nucleus sampling mass
    max_new_tokens: int = 128  # reply length limit, in tokens

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def as_dict(self) -> dict:
        return asdict(self)

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


class _StopOnEvent(StoppingCriteria):
    """Stops generation as soon as ``event`` is set (stop button, closed tab)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


@dataclass
class Reply:
    """A finished (or stopped) reply: its text, the policy version that produced it and
    whether it was stopped before its end-of-turn token."""

    text: str
    version: int
    stopped: bool
    sampling: dict


class ChatEngine:
    """Streams chat replies from ``base_model`` with the live LoRA adapter from ``registry``.

    Args:
        base_model: a causal LM (optionally bitsandbytes-quantized) in eval mode.
        tokenizer: its tokenizer, with a chat template.
        registry: the adapter registry; its store says which version is live.
        keep_loaded: how many adapter versions stay loaded at once (live, previous, …).
    """

    def __init__(self, base_model, tokenizer, registry: AdapterRegistry, keep_loaded: int = 3):
        self.tokenizer = tokenizer
        self.registry = registry
        self.store = registry.store
        self.eos_ids = end_of_turn_ids(base_model, tokenizer)
        self.window = context_window(base_model)
        self.keep_loaded = keep_loaded
        self._lock = threading.RLock()  # held for a whole generation and for adapter switches
        self._loaded: list[int] = []  # adapter versions loaded into self.model, oldest first
        self.model = self._ensure_version_zero(base_model)

    # ---- adapters -------------------------------------------------------------------------
    @staticmethod
    def adapter_name(version: int) -> str:
        return f"v{version}"

    def _ensure_version_zero(self, base_model):
        """Wrap the base in a PeftModel holding the live adapter; on first run, publish a fresh
        LoRA adapter (B = 0, so identical to the base) as version 0."""
        live = self.store.live_version()
        if live is None:
            peft_model = add_lora(base_model, adapter_name=self.adapter_name(0))
            staging = self.registry.staging_dir()
            peft_model.save_pretrained(str(staging), selected_adapters=[self.adapter_name(0)])
            # peft writes non-default adapters into a sub-folder named after the adapter
            sub = staging / self.adapter_name(0)
            if sub.is_dir():
                for f in sub.iterdir():
                    f.rename(staging / f.name)
                sub.rmdir()
            version = self.registry.publish(staging, parent=None, round_id=None, metrics={}, live=True)
            if version != 0:
                peft_model.delete_adapter(self.adapter_name(0))
                load_lora(peft_model, self.registry.path(version), self.adapter_name(version))
            self._loaded.append(version)
            peft_model.eval()
            return peft_model
        peft_model = load_lora(base_model, self.registry.path(live), self.adapter_name(live))
        self._loaded.append(live)
        peft_model.eval()
        return peft_model

    def live_version(self) -> int:
        """The version that serves the next reply (read from the registry each time)."""
        live = self.store.live_version()
        if live is None:
            raise RuntimeError("no live policy version is registered")
        return live

    def previous_version(self) -> int | None:
        """The version the live one was trained from (its parent), if any."""
        info = self.store.version(self.live_version())
        return info.get("parent")

    def _activate(self, version: int) -> None:
        """Load ``version``'s adapter if needed and make it the active one (lock held)."""
        name = self.adapter_name(version)
        if version not in self._loaded:
            load_lora(self.model, self.registry.path(version), name)
            self._loaded.append(version)
            live = self.store.live_version()
            while len(self._loaded) > self.keep_loaded:
                victim = next((v for v in self._loaded if v not in (version, live)), None)
                if victim is None:
                    break
                self.model.delete_adapter(self.adapter_name(victim))
                self._loaded.remove(victim)
        self.model.set_adapter(name)

    # ---- generation -----------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        """Token ids of the prompt after dropping the oldest turns that do not fit.

        Raises:
            training.models.ContextTooLongError: the newest message alone does not fit.
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
        """Stream a reply to ``messages``; yields the text so far after each new piece, and
        returns (``StopIteration.value``) a :class:`Reply`.

        Args:
            messages: ``{"role", "content"}`` dicts ending with the user message to answer.
            sampling: sampling settings (default :class:`Sampling`).
            version: the policy version to use; default the live one, resolved now.
            stop_event: set it to end generation early (within one decoding step).

        Raises:
            training.models.ContextTooLongError: the newest message alone does not fit.
        """
        sampling = sampling or Sampling()
        version = self.live_version() if version is None else version
        stop_event = stop_event or threading.Event()
        ids = self.prompt_ids(messages, sampling.max_new_tokens)
        input_ids = torch.tensor([ids], dtype=torch.long)
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120.0
        )
        finished = {"eos": False, "error": None}

        def worker():
            try:
                with self._lock, torch.inference_mode():
                    self._activate(version)
                    out = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        streamer=streamer,
                        max_new_tokens=sampling.max_new_tokens,
                        eos_token_id=self.eos_ids,
                        pad_token_id=self.tokenizer.pad_token_id,
                        stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop_event)]),
                        **sampling.generate_kwargs(),
                    )
                new = out[0, input_ids.shape[1]:].tolist()
                finished["eos"] = any(t in self.eos_ids for t in new)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
                finished["error"] = exc
                streamer.end()

        thread = threading.Thread(target=worker, name="generate", daemon=True)
        thread.start()
        text, completed = "", False
        try:
            for piece in streamer:
                if piece:
                    text += piece
                    yield text
            completed = True
        finally:
            if not completed:
                # the consumer went away (stop button, closed tab): end generation promptly
                stop_event.set()
            thread.join()
        if finished["error"] is not None:
            raise finished["error"]
        return Reply(
            text=text.strip(),
            version=version,
            stopped=stop_event.is_set() and not finished["eos"],
            sampling=sampling.as_dict(),
        )

    def reply(self, messages: list[dict], sampling: Sampling | None = None, version: int | None = None) -> Reply:
        """The whole reply at once (no streaming); see :meth:`stream`."""
        gen = self.stream(messages, sampling=sampling, version=version)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                return done.value
