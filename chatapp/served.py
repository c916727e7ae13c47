"""What every serving backend shares (:class:`chatapp.engine.ChatEngine` in process,
:class:`chatapp.vllm_engine.VllmEngine` through a vLLM server): the sampling settings and the
finished :class:`Reply`, which policy version serves (checked before its first reply, replaced
by the last good one when it fails), the prompt cut to the context window, and the single-reply
forms of a backend's ``stream_many``.

Nothing bad is served: a version is checked before its first reply — its files against the
checksum recorded at publishing, its weights finite. A live version that fails is taken out of
service (``'rejected'``, with the reason as its note, logged) and the newest version that was
live before and passes serves instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from safetensors import SafetensorError

from chatapp.streams import drain, map_stream
from storage.registry import AdapterRegistry, CorruptAdapter
from training.chat_format import fit_messages, render_prompt
from training.models import NonFiniteAdapter, check_adapter_weights

log = logging.getLogger(__name__)


class ServingError(RuntimeError):
    """The backend that decodes replies failed (a vLLM server absent or answering an error):
    the user sees the message, the log has it, the chat stays up."""

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




class ServedVersions:
    """The policy versions a backend serves and the prompts it is given; a backend adds
    ``stream_many(messages, versions, sampling, stop_event, timeout_s)`` (a generator of the
    answer texts so far, returning one :class:`Reply` per version) and ``member_scores``.

    Args:
        tokenizer: the base model's tokenizer, with a chat template.
        registry: the adapter registry; its store says which version is live.
        window: the model's context window, in tokens.
    """

    def __init__(self, tokenizer, registry: AdapterRegistry, window: int):
        self.tokenizer = tokenizer
        self.registry = registry
        self.store = registry.store
        self.window = window
        self._vetted: set[int] = set()  # versions whose files passed the checks (_vet)
        self._vet_lock = threading.Lock()

    def _vet(self, version: int) -> None:
        """Check version ``version``'s files: the recorded checksum, finite weights.

        Raises:
            one of ``UNSERVABLE``: see the module docstring.
        """
        check_adapter_weights(self.registry.path(version))

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

    # ---- generation -----------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        """Token ids of the prompt after dropping the oldest turns that do not fit.

        Raises:
            training.chat_format.ContextTooLongError: the newest message alone does not fit.
        """
        kept = fit_messages(self.tokenizer, messages, self.window, max_new_tokens)
        return render_prompt(self.tokenizer, kept)

    def _begin(self, messages: list[dict], versions: list[int], sampling: Sampling | None,
               stop_event: threading.Event | None) -> tuple[Sampling, threading.Event, list[int]]:
        """``(sampling, stop event, prompt ids)`` of a ``stream_many`` call, defaults filled in.

        Raises:
            ValueError: ``versions`` is empty.
            training.chat_format.ContextTooLongError: the newest message alone does not fit.
        """
        if not versions:
            raise ValueError("stream_many needs at least one version")
        sampling = sampling or Sampling()
        return sampling, stop_event or threading.Event(), self.prompt_ids(messages, sampling.max_new_tokens)

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

    def sample_many(self, messages: list[dict], versions: list[int], sampling: Sampling | None = None,
                    stop_event: threading.Event | None = None, timeout_s: float = 600.0) -> list[Reply]:
        """The replies of :meth:`stream_many` (one per entry of ``versions``, decoded in one
        batch), without streaming: returns when all are done.

        Raises:
            as :meth:`stream_many`.
        """
        return drain(self.stream_many(messages, versions, sampling, stop_event, timeout_s=timeout_s))

    def reply(self, messages: list[dict], sampling: Sampling | None = None, version: int | None = None) -> Reply:
        """The whole reply at once (no streaming); see :meth:`stream`."""
        return drain(self.stream(messages, sampling=sampling, version=version))
