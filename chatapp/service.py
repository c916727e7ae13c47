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

import torch
from limits import RateLimitItem, parse, storage, strategies

from chatapp.engine import ChatEngine, Reply, Sampling
from chatapp.streams import map_stream
from storage.store import CHOICES, Store
from training.chat_format import inert_text
from training.ensemble import PAIR_RULES, select_pair
from training.flags import help_field
from training.user_gate import UserGateConfig, review_candidate

MAX_MESSAGE_CHARS = 100_000  # default --max-message-chars: longer messages are refused before they are tokenized


@dataclass
class LimitConfig:
    """How much one user may send (flags of ``python app.py``): sizes are checked before any
    tokenizing (so an oversized request costs nothing), rates with a moving window (the
    ``limits`` library; ``"N/second|minute|hour|day"``)."""

    max_message_chars: int = help_field(MAX_MESSAGE_CHARS, help="longest message accepted, in characters")
    max_system_prompt_chars: int = help_field(8_000, help="longest system prompt accepted, in characters")
    max_conversation_chars: int = help_field(
        300_000, help="a conversation whose messages add up to more characters takes no more turns (start a new one)")
    session_vote_rate: str = help_field("30/minute", help="most votes one browser session may cast, e.g. 30/minute")
    client_vote_rate: str = help_field(
        "300/minute", help="most votes one client address may cast, all its sessions together (a shared proxy or NAT counts as one)")

    def __post_init__(self):
        for name in ("max_message_chars", "max_system_prompt_chars", "max_conversation_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("session_vote_rate", "client_vote_rate"):
            try:
                parse(getattr(self, name))
            except ValueError:
                raise ValueError(f"--{name.replace('_', '-')} must look like 20/minute, got "
                                 f"{getattr(self, name)!r}") from None

    def rates(self) -> tuple[RateLimitItem, RateLimitItem]:
        """``(per session, per client)`` vote rates."""
        return parse(self.session_vote_rate), parse(self.client_vote_rate)


@dataclass
class PairConfig:
    """Which two answers a comparison shows (flags of ``python app.py``)."""

    compare_samples: int = help_field(
        4, help="answers sampled together (one batch) for a comparison; the reward model's ensemble shows the "
        "two it is least sure about (2: two answers, no choice)")
    pair_rule: str = help_field("variance", choices=list(PAIR_RULES),
                                help="how the pair is chosen: variance (most uncertain preference), dts (double "
                                "Thompson sampling) or random")
    pair_random_share: float = help_field(
        0.25, help="share of comparisons that show two plain samples (live vs its parent once one exists), "
        "not chosen by the reward model: an unbiased sample of what users think")

    def __post_init__(self):
        if self.compare_samples < 2:
            raise ValueError(f"--compare-samples must be >= 2, got {self.compare_samples}")
        if self.pair_rule not in PAIR_RULES:
            raise ValueError(f"--pair-rule must be one of {', '.join(PAIR_RULES)}, got {self.pair_rule!r}")
        if not 0.0 <= self.pair_random_share <= 1.0:
            raise ValueError(f"--pair-random-share must be in [0, 1], got {self.pair_random_share}")


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
        user_gate: the users' promotion rule (:mod:`training.user_gate`); None or
            ``user_gate=False``: no candidate is shown and no vote decides one.
        pairs: how a comparison's two answers are chosen (:class:`PairConfig`; default: its
            defaults).
        limits: sizes and vote rates (:class:`LimitConfig`; default: its defaults).

    One turn at a time per session: a message sent while the session's previous reply is still
    being written is refused (:class:`UserInputError`), never interleaved with it.
    """

    def __init__(
        self,
        engine: ChatEngine,
        store: Store,
        sampling: Sampling | None = None,
        seed=None,
        compare_sampling: Sampling | None = None,
        distinct_redraws: int = 2,
        user_gate: UserGateConfig | None = None,
        pairs: PairConfig | None = None,
        limits: LimitConfig | None = None,
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
        self.user_gate = user_gate if user_gate is not None and user_gate.user_gate else None
        self.pairs = pairs or PairConfig()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.limits = limits or LimitConfig()
        self._vote_limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        self._busy: set[str] = set()  # sessions with a turn in progress
        self._busy_lock = threading.Lock()

    def _draw(self) -> random.Random:
        """A private RNG seeded from the service's (so concurrent sessions never share one)."""
        with self._rng_lock:
            return random.Random(self._rng.getrandbits(64))

    # ---- helpers ----------------------------------------------------------------------------
    def _check_text(self, text: str | None, session: ChatSession) -> str:
        """Refuse empty messages, messages so long that tokenizing them would only burn CPU
        (the context window check then gives the precise limit for the rest), and turns beyond
        the conversation's size limit; returns the text made inert
        (:func:`training.chat_format.inert_text`: typed template tokens stay text)."""
        if text is None or not text.strip():
            raise UserInputError("Type a message first: empty messages are not sent.")
        limit = self.limits.max_message_chars
        if len(text) > limit:
            raise UserInputError(
                f"The message is too long: {len(text):,} characters, at most {limit:,} are accepted. Shorten it."
            )
        total = len(text) + sum(len(m["content"]) for m in session.messages) + len(session.system_prompt or "")
        if total > self.limits.max_conversation_chars:
            raise UserInputError(
                f"This conversation is too long ({total:,} characters with this message, at most "
                f"{self.limits.max_conversation_chars:,}): start a new conversation."
            )
        return inert_text(self.engine.tokenizer, text)

    def _claim(self, session: ChatSession) -> None:
        """Mark ``session`` as answering a message.

        Raises:
            UserInputError: it already is (a second send while the reply is written).
        """
        with self._busy_lock:
            if session.session_id in self._busy:
                raise UserInputError("The previous reply is still being written: wait for it, or press Stop.")
            self._busy.add(session.session_id)

    def _release(self, session: ChatSession) -> None:
        with self._busy_lock:
            self._busy.discard(session.session_id)

    def _begin_turn(self, session: ChatSession, text: str) -> list[dict]:
        """Validate, store the user message and return the context to answer."""
        text = self._check_text(text, session)
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

    def _append_reply(self, session: ChatSession, reply: Reply, plain: bool = False) -> None:
        """Store ``reply`` and continue the conversation with it; ``plain``: a chat reply (not
        a comparison's), which :meth:`regenerate` may replace."""
        message_id = self.store.add_message(
            session.conversation_id,
            "assistant",
            reply.text,
            policy_version=reply.version,
            sampling={**reply.sampling, "stopped": reply.stopped},
        )
        message = {"role": "assistant", "content": reply.text, "version": reply.version, "id": message_id,
                   "plain": plain}
        if reply.stopped:
            message["stopped"] = True  # shown marked in the UI; the context keeps the text as is
        session.messages.append(message)

    # ---- chat -------------------------------------------------------------------------------
    def new_conversation(self, session: ChatSession, system_prompt: str | None = None) -> ChatSession:
        """A fresh conversation in the same browser session (pending comparison dropped), with
        ``system_prompt`` made inert (:func:`training.chat_format.inert_text`).

        Raises:
            UserInputError: the system prompt is longer than ``limits.max_system_prompt_chars``
                (checked before anything else: a huge one costs nothing).
        """
        limit = self.limits.max_system_prompt_chars
        if system_prompt and len(system_prompt) > limit:
            raise UserInputError(f"The system prompt is too long: {len(system_prompt):,} characters, at most "
                                 f"{limit:,} are accepted. Shorten it.")
        system_prompt = inert_text(self.engine.tokenizer, system_prompt) if system_prompt else None
        return ChatSession(session_id=session.session_id, system_prompt=system_prompt)

    def chat(
        self, session: ChatSession, text: str, stop_event: threading.Event | None = None
    ) -> Iterator[str]:
        """Answer ``text`` with the live policy, streaming the text so far.

        The user message is stored first; the reply (stopped or not) is stored when it ends,
        with the version that produced it. When the engine fails (a vLLM server gone), the
        message stays stored but leaves the session's context, so the next message does not
        follow an unanswered one.

        Raises:
            UserInputError: empty or oversized message, a comparison awaiting its vote, or this
                session's previous reply still being written.
            training.chat_format.ContextTooLongError: the message alone does not fit the window.
            chatapp.served.ServingError: the backend failed the reply.
        """
        self._claim(session)
        try:
            context = self._begin_turn(session, text)
            try:
                reply = yield from self.engine.stream(context, sampling=self.sampling, stop_event=stop_event)
            except Exception:
                session.messages.pop()
                raise
            self._append_reply(session, reply, plain=True)
            return reply
        finally:
            self._release(session)

    def regenerate(self, session: ChatSession, stop_event: threading.Event | None = None) -> Iterator[str]:
        """Answer the last user message again, streaming the text so far: once the new reply from
        the live policy is written, the last plain reply is replaced by it (kept in the store,
        marked replaced: no longer part of the conversation or of training prompts); if
        generating fails, the conversation is left as it was.

        Raises:
            UserInputError: the conversation does not end with a plain chat reply (nothing yet,
                a comparison's chosen answer, a comparison awaiting its vote), or this session's
                previous reply is still being written.
        """
        self._claim(session)
        try:
            last = session.messages[-1] if session.messages else None
            if session.pending is not None:
                raise UserInputError("Vote on the two answers first (or start a new conversation).")
            if last is None or last["role"] != "assistant" or not last.get("plain"):
                raise UserInputError("There is no plain reply to regenerate (a compared answer is chosen by a vote).")
            context = session.context()[:-1]  # up to the user message the reply answered
            reply = yield from self.engine.stream(context, sampling=self.sampling, stop_event=stop_event)
            self.store.replace_reply(last["id"])  # only once the new reply exists: a failure changes nothing
            session.messages.pop()
            self._append_reply(session, reply, plain=True)
            return reply
        finally:
            self._release(session)

    def compare(
        self, session: ChatSession, text: str, stop_event: threading.Event | None = None
    ) -> Iterator[tuple[str, str]]:
        """Answer ``text`` twice and stream ``(answer_a, answer_b)`` as they grow.

        Which two answers (stored with the comparison as its ``selection``):

        * ``candidate``: while a candidate waits for users (:mod:`training.user_gate`), a share
          ``user_gate_share`` of comparisons shows it against the live version;
        * ``variance`` / ``dts``: otherwise, except for a share ``pair_random_share``,
          ``compare_samples`` answers of the live version are generated in one batch and the
          reward model's ensemble picks the pair (:func:`training.ensemble.select_pair`; only
          pairs of different texts). These are shown when all are done; before the first reward
          model with an ensemble, two of them at random (``random``);
        * ``random``: two samples, of the live and the previous version once one exists. Also
          used while there is no reward model with an ensemble.

        ``candidate`` and ``random`` answers stream at the same time, decoded in one batch
        (:meth:`chatapp.engine.ChatEngine.stream_many`); when B comes out word for word the same
        text as A, it is drawn again (at most ``distinct_redraws`` times; B's stream starts over
        while A stays shown, and B's stored sampling settings count the redraws).

        Either way the order is random, and the comparison is stored when both ended normally; a
        stopped comparison is never offered for voting (its partial A answer continues the
        conversation instead).

        Raises:
            UserInputError: as :meth:`chat`.
        """
        self._claim(session)
        try:
            return (yield from self._compare(session, text, stop_event))
        finally:
            self._release(session)

    def _compare(self, session: ChatSession, text: str,
                 stop_event: threading.Event | None) -> Iterator[tuple[str, str]]:
        context = self._begin_turn(session, text)
        rng = self._draw()
        live = self.engine.live_version()
        candidate = self.store.candidate_version() if self.user_gate is not None else None
        stop_event = stop_event or threading.Event()
        if candidate is not None and candidate != live and rng.random() < self.user_gate.user_gate_share:
            versions, selection = [candidate, live], "candidate"
        elif (self.pairs.compare_samples > 2 and self.pairs.pair_rule != "random"
              and rng.random() >= self.pairs.pair_random_share):
            yield "", ""
            replies = self.engine.sample_many(context, [live] * self.pairs.compare_samples,
                                              self.compare_sampling, stop_event)
            if any(r.stopped for r in replies):
                self._append_reply(session, replies[0])
                return None
            return (yield from self._offer(session, context, *self._chosen_pair(context, replies, rng)))
        else:
            previous = self.engine.previous_version()
            versions, selection = [live, live if previous is None else previous], "random"
        rng.shuffle(versions)
        a, b = yield from map_stream(
            self.engine.stream_many(context, versions, self.compare_sampling, stop_event), tuple)
        redraws, a_text = 0, a.text
        while not (a.stopped or b.stopped) and b.text == a_text and redraws < self.distinct_redraws:
            redraws += 1  # B is word for word A: nothing to compare, draw B again (A stays shown)
            b = yield from map_stream(
                self.engine.stream(context, sampling=self.compare_sampling, version=versions[1], stop_event=stop_event),
                lambda text: (a_text, text))
        if redraws:
            b.sampling = {**b.sampling, "distinct_redraws": redraws}
        if a.stopped or b.stopped:
            self._append_reply(session, a)
            return None
        return (yield from self._offer(session, context, a, b, selection))

    def _chosen_pair(self, context: list[dict], replies: list[Reply],
                     rng: random.Random) -> tuple[Reply, Reply, str]:
        """The two of ``replies`` the reward model's ensemble picks by ``pair_rule``, among pairs
        of different texts, in random order, with the rule's name; two at random (``"random"``)
        while no reward model with an ensemble exists; the first two when all texts are the same."""
        texts = [r.text for r in replies]
        allowed = [(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts)) if texts[i] != texts[j]]
        rule = self.pairs.pair_rule
        if not allowed:
            allowed, rule = [(0, 1)], "random"
        scores = self.engine.member_scores(context, texts) if rule != "random" else None  # (K, n)
        if scores is None:
            rule = "random"
        i, j = select_pair(scores if scores is not None else torch.zeros(1, len(texts)), rule, rng, allowed)
        a, b = (replies[i], replies[j]) if rng.random() < 0.5 else (replies[j], replies[i])
        return a, b, rule

    def _offer(self, session: ChatSession, context: list[dict], a: Reply, b: Reply,
               selection: str) -> Iterator[tuple[str, str]]:
        """Store answers ``a`` and ``b`` as the session's comparison awaiting a vote and show them."""
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
            selection=selection,
        )
        session.pending = PendingComparison(comparison_id, (a, b))
        yield a.text, b.text
        return session.pending

    def vote(self, session: ChatSession, choice: str, client: str | None = None) -> dict:
        """Record the vote on the pending comparison; the chosen answer (A on a tie or when
        both are bad) continues the conversation. A vote on a candidate-vs-live comparison may
        settle the candidate (:func:`training.user_gate.review_candidate`).

        Args:
            client: the voter's address (None: unknown, only the session's rate applies).

        Raises:
            UserInputError: no comparison is pending, ``choice`` is not one of CHOICES, or the
                session (``limits.session_vote_rate``) or client (``limits.client_vote_rate``)
                voted too often; a refused vote leaves the comparison pending.
            storage.store.AlreadyVoted: this comparison already has a vote (the first is kept).
        """
        if choice not in CHOICES:
            raise UserInputError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if session.pending is None:
            raise UserInputError("There is no comparison to vote on.")
        self._count_vote(session, client)
        pending = session.pending
        result = self.store.vote(pending.comparison_id, choice)
        chosen = pending.replies[1] if choice == "b" else pending.replies[0]
        session.pending = None
        self._append_reply(session, chosen)
        if self.user_gate is not None and result.get("selection") == "candidate":
            review_candidate(self.store, self.user_gate)  # promotes or retires it once the votes allow
        return result

    def _count_vote(self, session: ChatSession, client: str | None) -> None:
        """Count one vote against the session's and the client's rate.

        Raises:
            UserInputError: either rate is used up (nothing is counted then).
        """
        per_session, per_client = self.limits.rates()
        keys = [(per_session, "session", session.session_id)] + ([(per_client, "client", client)] if client else [])
        for rate, kind, key in keys:
            if not self._vote_limiter.test(rate, kind, key):
                raise UserInputError(f"Too many votes from this {kind}: at most {rate} "
                                     f"({'--session-vote-rate' if kind == 'session' else '--client-vote-rate'}); wait a moment.")
        for rate, kind, key in keys:
            self._vote_limiter.hit(rate, kind, key)
