"""What the UI does, without the UI: chat turns, side-by-side comparisons and votes.

The Gradio handlers in :mod:`chatapp.ui` only parse input, call one method here and render the
result, so the same code is driven by the browser, the HTTP API and the tests.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from chatapp.engine import ChatEngine, Reply, Sampling
from storage.store import CHOICES, Store

MAX_MESSAGE_CHARS = 200_000  # longer messages are refused before they are tokenized


class UserInputError(ValueError):
    """Input the user can fix (empty message, vote pending, …); the message is shown as is."""


@dataclass
class PendingComparison:
    """Two answers waiting for a vote; ``replies[0]`` is shown as A, ``replies[1]`` as B."""

    comparison_id: str
    replies: tuple[Reply, Reply]


@dataclass
class ChatSession:
    """One browser tab's state: its conversation and any comparison awaiting a vote."""

    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    conversation_id: str | None = None
    system_prompt: str | None = None
    messages: list[dict] = field(default_factory=list)  # {"role", "content", "version"?}
    pending: PendingComparison | None = None

    def context(self) -> list[dict]:
        """The conversation as ``{"role", "content"}`` dicts, system prompt first."""
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages]


class ChatService:
    """Chat turns, comparisons and votes for many sessions over one engine and one store.

    Args:
        engine: the serving engine.
        store: the SQLite store.
        sampling: sampling settings of plain chat replies.
        compare_sampling: sampling settings of the two answers of a comparison (default: pure
            sampling, temperature 1 and no nucleus cut, the distribution PPO trains on).
        seed: seeds the A/B order shuffle (None: nondeterministic).
        distinct_redraws: when the B answer comes out word for word the same as A, it is drawn
            again up to this many times (0: never). Two identical answers tell the user nothing
            and give the reward model nothing to learn (identical pairs are left out of its
            loss); a sharpened policy writes many of them for short factual questions.
    """

    def __init__(
        self,
        engine: ChatEngine,
        store: Store,
        sampling: Sampling | None = None,
        seed=None,
        compare_sampling: Sampling | None = None,
        distinct_redraws: int = 2,
    ):
        if distinct_redraws < 0:
            raise ValueError(f"distinct_redraws must be >= 0, got {distinct_redraws}")
        self.distinct_redraws = distinct_redraws
        self.engine = engine
        self.store = store
        self.sampling = sampling or Sampling()
        self.compare_sampling = compare_sampling or Sampling(
            temperature=1.0, top_p=1.0, max_new_tokens=self.sampling.max_new_tokens
        )
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    # ---- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _check_text(text: str | None) -> str:
        """Refuse empty messages, and messages so long that tokenizing them would only burn
        CPU (the context window check then gives the precise limit for the rest)."""
        if text is None or not text.strip():
            raise UserInputError("Type a message first: empty messages are not sent.")
        if len(text) > MAX_MESSAGE_CHARS:
            raise UserInputError(
                f"The message is too long: {len(text):,} characters, at most "
                f"{MAX_MESSAGE_CHARS:,} are accepted. Shorten it."
            )
        return text

    def _begin_turn(self, session: ChatSession, text: str) -> list[dict]:
        """Validate, store the user message and return the context to answer."""
        self._check_text(text)
        if session.pending is not None:
            raise UserInputError("Vote on the two answers first (or start a new conversation).")
        context = session.context() + [{"role": "user", "content": text}]
        # fails early (before anything is stored) when the message cannot fit at all
        self.engine.prompt_ids(context, self.sampling.max_new_tokens)
        if session.conversation_id is None:
            session.conversation_id = self.store.new_conversation(
                session.session_id, system_prompt=session.system_prompt
            )
        self.store.add_message(session.conversation_id, "user", text)
        session.messages.append({"role": "user", "content": text})
        return context

    def _append_reply(self, session: ChatSession, reply: Reply) -> None:
        self.store.add_message(
            session.conversation_id,
            "assistant",
            reply.text,
            policy_version=reply.version,
            sampling={**reply.sampling, "stopped": reply.stopped},
        )
        session.messages.append({"role": "assistant", "content": reply.text, "version": reply.version})

    def _stream_answer(
        self, context: list[dict], version: int, stop_event: threading.Event, shown: list[str], i: int
    ) -> Iterator[tuple[str, str]]:
        """Stream one answer of a comparison into ``shown[i]`` (from empty), yielding both
        answers' texts as they grow; returns the :class:`Reply`."""
        shown[i] = ""
        gen = self.engine.stream(context, sampling=self.compare_sampling, version=version, stop_event=stop_event)
        while True:
            try:
                shown[i] = next(gen)
            except StopIteration as done:
                return done.value
            yield shown[0], shown[1]

    # ---- chat -------------------------------------------------------------------------------
    def new_conversation(self, session: ChatSession, system_prompt: str | None = None) -> ChatSession:
        """A fresh conversation in the same browser session (pending comparison dropped)."""
        return ChatSession(session_id=session.session_id, system_prompt=system_prompt or None)

    def chat(
        self, session: ChatSession, text: str, stop_event: threading.Event | None = None
    ) -> Iterator[str]:
        """Answer ``text`` with the live policy, streaming the text so far.

        The user message is stored first; the reply (stopped or not) is stored when it ends,
        with the version that produced it.

        Raises:
            UserInputError: empty message or a comparison awaiting its vote.
            training.chat_format.ContextTooLongError: the message alone does not fit the window.
        """
        context = self._begin_turn(session, text)
        gen = self.engine.stream(context, sampling=self.sampling, stop_event=stop_event)
        reply = yield from gen
        self._append_reply(session, reply)
        return reply

    def compare(
        self, session: ChatSession, text: str, stop_event: threading.Event | None = None
    ) -> Iterator[tuple[str, str]]:
        """Answer ``text`` twice and stream ``(answer_a, answer_b)`` as they grow.

        The two answers are two samples of the live policy, or the live and the previous
        version once one exists, in random order. When B comes out the same text as A it is
        drawn again (at most ``distinct_redraws`` times; B's stream starts over, and its stored
        sampling settings count the redraws). The comparison is stored when both ended
        normally; a stopped comparison is never offered for voting (its partial A answer
        continues the conversation instead).
        """
        context = self._begin_turn(session, text)
        live = self.engine.live_version()
        previous = self.engine.previous_version()
        versions = [live, live if previous is None else previous]
        with self._rng_lock:
            self._rng.shuffle(versions)
        stop_event = stop_event or threading.Event()
        replies: list[Reply] = []
        shown = ["", ""]
        for i, version in enumerate(versions):
            reply = yield from self._stream_answer(context, version, stop_event, shown, i)
            redraws = 0
            while (i == 1 and not reply.stopped and reply.text == replies[0].text
                   and redraws < self.distinct_redraws):
                redraws += 1  # B is word for word A: nothing to compare, draw B again
                reply = yield from self._stream_answer(context, version, stop_event, shown, i)
            if redraws:
                reply.sampling = {**reply.sampling, "distinct_redraws": redraws}
            replies.append(reply)
            if reply.stopped:
                self._append_reply(session, replies[0])
                return None
        a, b = replies
        comparison_id = self.store.add_comparison(
            session.conversation_id,
            session.session_id,
            context,
            a.text,
            b.text,
            a.version,
            b.version,
            a.sampling,
            b.sampling,
        )
        session.pending = PendingComparison(comparison_id, (a, b))
        yield a.text, b.text
        return session.pending

    def vote(self, session: ChatSession, choice: str) -> dict:
        """Record the vote on the pending comparison; the chosen answer (A on a tie or when
        both are bad) continues the conversation.

        Raises:
            UserInputError: no comparison is pending, or ``choice`` is not one of CHOICES.
            storage.store.AlreadyVoted: this comparison already has a vote (the first is kept).
        """
        if choice not in CHOICES:
            raise UserInputError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if session.pending is None:
            raise UserInputError("There is no comparison to vote on.")
        pending = session.pending
        result = self.store.vote(pending.comparison_id, choice)
        chosen = pending.replies[1] if choice == "b" else pending.replies[0]
        session.pending = None
        self._append_reply(session, chosen)
        return result
