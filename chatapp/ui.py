"""The Gradio UI: a Chat tab (streaming, stop, new conversation, side-by-side comparisons with
votes) and the Training tab (:mod:`chatapp.training_tab`).

Handlers only parse input, call one method of :class:`chatapp.service.ChatService` (or the
store / scheduler) and render the result; errors become ``gr.Error`` here only, so an API
caller gets them as errors with their message. Replies and compared answers are rendered as
Markdown with HTML shown as typed, user messages exactly as typed (:mod:`chatapp.display`);
the store keeps every text byte for byte, and ``/send``'s ``turn`` output gives API callers the
raw texts with the versions and the comparison id.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import gradio as gr

from chatapp.auth import AdminAuth
from chatapp.display import literal_markdown, reply_markdown
from chatapp.exports import ExportDesk
from chatapp.served import ServingError
from chatapp.service import ChatService, ChatSession, UserInputError
from chatapp.streams import map_stream
from chatapp.training_tab import build_training_tab
from storage.registry import AdapterRegistry
from storage.store import AlreadyVoted
from training.chat_format import ContextTooLongError
from training.scheduler import TrainingScheduler

log = logging.getLogger(__name__)


@dataclass
class UIParts:
    """What the UI needs from the rest of the app (wired by ``app.py``)."""

    service: ChatService
    registry: AdapterRegistry
    scheduler: TrainingScheduler | None = None
    admin: AdminAuth | None = None  # None: admin actions are open (local use)
    exports: ExportDesk | None = None  # None: one is made over the service's store
    examples: tuple[str, ...] = ()  # prompts the model handles, offered on the Chat tab (clickable)
    model_note: str | None = None  # one line under the chat about the model (e.g. the starter is a demo)


# System fonts only: nothing is fetched at run time (the app must look the same offline).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])
# A 1280x720 window shows the last message, both compared answers and the vote buttons at once.
CHAT_HEIGHT = "38vh"
ANSWER_HEIGHT = "16vh"

# the two answer views are Markdown (no label of their own): name them, small, above the text
CSS = """
#answer-a::before, #answer-b::before { display: block; font-size: var(--text-sm); color: var(--block-label-text-color);
  margin-bottom: 4px; }
#answer-a::before { content: "Answer A"; }
#answer-b::before { content: "Answer B"; }
"""

STOPPED_MARK = "\n\n[stopped]"  # after an answer cut short by Stop (display only; not stored)


def _display(messages: list[dict]) -> list[dict]:
    """Chatbot value: user messages shown as typed, replies as Markdown with HTML shown as typed
    (:mod:`chatapp.display`), an answer cut short by Stop followed by :data:`STOPPED_MARK`."""
    return [{"role": m["role"],
             "content": (literal_markdown(m["content"]) if m["role"] == "user" else reply_markdown(m["content"]))
             + (STOPPED_MARK if m.get("stopped") else "")}
            for m in messages]


def _growing(view: list[dict], partial: str) -> list[dict]:
    """Chatbot value while a reply streams: ``view`` and the reply so far."""
    return view + [{"role": "assistant", "content": reply_markdown(partial)}]


def _system_line(session: ChatSession | None) -> dict:
    """The conversation's system prompt, shown above the chat (hidden when it has none)."""
    prompt = session.system_prompt if session is not None else None
    if not prompt:
        return gr.update(value="", visible=False)
    return gr.update(value=f"**System prompt of this conversation:** {literal_markdown(prompt)}", visible=True)


def _reply_turn(reply) -> dict:
    """``/send``'s ``turn`` output for a plain reply (raw text)."""
    return {"kind": "reply", "reply": reply.text, "version": reply.version, "stopped": reply.stopped,
            "comparison_id": None, "answer_a": None, "answer_b": None, "versions": None}


def _comparison_turn(session: ChatSession, stopped_reply: str | None = None) -> dict:
    """``/send``'s ``turn`` output for a comparison (raw texts, versions of A and B, the id to
    vote on); a stopped comparison has no id and continues with its partial A answer."""
    pending = session.pending
    if pending is None:
        return {"kind": "comparison", "reply": stopped_reply, "version": None, "stopped": True,
                "comparison_id": None, "answer_a": None, "answer_b": None, "versions": None}
    a, b = pending.replies
    return {"kind": "comparison", "reply": None, "version": None, "stopped": False,
            "comparison_id": pending.comparison_id, "answer_a": a.text, "answer_b": b.text,
            "versions": [a.version, b.version]}


def _client(request: gr.Request | None) -> str | None:
    """The caller's address (None when unknown)."""
    return getattr(getattr(request, "client", None), "host", None)


def _voter(vote, choice: str):
    """The click handler of one vote button (Gradio passes the request, for the client's address)."""

    def handler(state, request: gr.Request):
        return vote(choice, state, request)

    return handler


def build_ui(parts: UIParts) -> gr.Blocks:
    """Build the Blocks app. Launch it with ``demo.queue().launch(...)``.

    API (``gradio_client``; every output has a label): ``/send(message, compare)`` →
    ``(conversation, message box, answer A, answer B, turn)`` where ``turn`` is a dict with the
    raw texts (``reply`` or ``answer_a``/``answer_b``), ``versions``, ``comparison_id``;
    ``/vote_a`` ``/vote_b`` ``/vote_tie`` ``/vote_both_bad``; ``/new_conversation(system_prompt)``;
    ``/regenerate`` (another answer to the last message, replacing a plain reply) → ``(conversation,
    turn)``; ``/stop``; ``/training_status`` → ``(status, rounds, versions)``; the admin actions
    ``/train_now``, ``/rollback(version)``, ``/promote_candidate``, ``/retire_candidate``,
    ``/export_votes`` (plus admin user and password when the app has ``--auth``). A user error
    (empty or oversized message, a vote with nothing to vote on) is raised as an error with its
    message."""
    service = parts.service
    parts.exports = parts.exports or ExportDesk(service.store)
    stops: dict[str, threading.Event] = {}  # session id → stop event of its running reply

    def _session(state: ChatSession | None) -> ChatSession:
        return state if state is not None else ChatSession()

    def _stop_event(session: ChatSession) -> threading.Event:
        event = threading.Event()
        stops[session.session_id] = event
        return event

    def send(text, compare, state):
        session = _session(state)
        shown, hidden = gr.update(visible=True), gr.update(visible=False)
        stop = _stop_event(session)
        pending_view = _display(session.messages) + [{"role": "user", "content": literal_markdown(text or "")}]
        try:
            if compare:
                for a, b in service.compare(session, text, stop_event=stop):
                    yield pending_view, "", reply_markdown(a), reply_markdown(b), gr.skip(), shown, hidden, session
                if session.pending is None:  # stopped: no vote offered; the partial A answer continues
                    last = session.messages[-1]["content"] if session.messages else None
                    yield (_display(session.messages), "", "", "", _comparison_turn(session, last),
                           hidden, hidden, session)
                else:
                    a, b = (reply_markdown(r.text) for r in session.pending.replies)
                    yield pending_view, "", a, b, _comparison_turn(session), shown, shown, session
            else:
                reply = yield from map_stream(
                    service.chat(session, text, stop_event=stop),
                    lambda partial: (_growing(pending_view, partial), "", gr.skip(), gr.skip(), gr.skip(),
                                     hidden, hidden, session))
                yield _display(session.messages), "", gr.skip(), gr.skip(), _reply_turn(reply), hidden, hidden, session
        except (UserInputError, ContextTooLongError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None  # the message stays in the box
        except ServingError as exc:
            log.error("reply failed: %s", exc)
            raise gr.Error(f"The model server failed: {exc}", print_exception=False) from None
        finally:
            if stops.get(session.session_id) is stop:  # one entry per reply in flight
                del stops[session.session_id]

    def regenerate(state):
        session = _session(state)
        stop = _stop_event(session)
        hidden = gr.update(visible=False)
        base = _display(session.messages[:-1])  # without the reply being replaced
        try:
            reply = yield from map_stream(service.regenerate(session, stop_event=stop),
                                          lambda partial: (_growing(base, partial), gr.skip(), hidden, session))
            yield _display(session.messages), _reply_turn(reply), hidden, session
        except UserInputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except ServingError as exc:
            log.error("reply failed: %s", exc)
            raise gr.Error(f"The model server failed: {exc}", print_exception=False) from None
        finally:
            if stops.get(session.session_id) is stop:
                del stops[session.session_id]

    def stop(state):
        if state is not None and state.session_id in stops:
            stops[state.session_id].set()

    def vote(choice, state, request: gr.Request | None = None):
        session = _session(state)
        try:
            service.vote(session, choice, client=_client(request))
        except (UserInputError, AlreadyVoted) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        hidden = gr.update(visible=False)
        return _display(session.messages), "", "", hidden, hidden, session

    def new_conversation(system_prompt, state):
        try:
            session = service.new_conversation(_session(state), system_prompt)
        except UserInputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        hidden = gr.update(visible=False)
        return [], "", "", _system_line(session), hidden, hidden, session

    with gr.Blocks(title="RLHF chat") as demo:
        state = gr.State(None)
        with gr.Tab("Chat"):
            system_line = gr.Markdown(visible=False, elem_id="system-line", label="system prompt")
            chatbot = gr.Chatbot(label="Conversation", height=CHAT_HEIGHT, sanitize_html=True, render_markdown=True)
            with gr.Group(visible=False) as compare_box:
                with gr.Row():
                    answer_a = gr.Markdown(label="Answer A", container=True, padding=True, elem_id="answer-a",
                                           height=ANSWER_HEIGHT, sanitize_html=True, line_breaks=True)
                    answer_b = gr.Markdown(label="Answer B", container=True, padding=True, elem_id="answer-b",
                                           height=ANSWER_HEIGHT, sanitize_html=True, line_breaks=True)
            with gr.Row(visible=False, elem_id="vote-row") as vote_row:
                vote_a = gr.Button("A is better")
                vote_b = gr.Button("B is better")
                vote_tie = gr.Button("Tie")
                vote_bad = gr.Button("Both bad")
            with gr.Row():
                text = gr.Textbox(placeholder="Type a message…", label="message", show_label=False, scale=6,
                                  max_lines=8)
                send_btn = gr.Button("Send", variant="primary", scale=1)
                stop_btn = gr.Button("Stop", variant="stop", scale=1)
            with gr.Row():
                compare = gr.Checkbox(value=True, label="Compare two answers side by side")
                new_btn = gr.Button("New conversation", size="sm")
            if parts.examples:
                gr.Examples(examples=[[e] for e in parts.examples], inputs=[text], label="Try")
            if parts.model_note:
                gr.Markdown(parts.model_note)
            with gr.Accordion("System prompt (applies to the next new conversation)", open=False):
                system_prompt = gr.Textbox(show_label=False, label="system prompt", lines=2)
            turn = gr.JSON(visible=False, label="turn")  # the raw result, for API callers
        with gr.Tab("Training"):
            training, training_core, training_refresh = build_training_tab(parts)

        send_outputs = [chatbot, text, answer_a, answer_b, turn, compare_box, vote_row, state]
        for event in (send_btn.click(send, [text, compare, state], send_outputs, api_name="send"),
                      text.submit(send, [text, compare, state], send_outputs, api_visibility="private")):
            event.then(training_core, None, training.core_outputs, api_visibility="private")  # awaiting votes
        # stop ends generation within one decoding step; the send handler then finishes normally
        stop_btn.click(stop, [state], None, api_name="stop", queue=False)
        vote_outputs = [chatbot, answer_a, answer_b, compare_box, vote_row, state]
        for button, choice in ((vote_a, "a"), (vote_b, "b"), (vote_tie, "tie"), (vote_bad, "both_bad")):
            button.click(_voter(vote, choice), [state], vote_outputs, api_name=f"vote_{choice}").then(
                training_core, None, training.core_outputs, api_visibility="private")  # counts current at once
        # the Chatbot's retry icon on the last reply: another answer to the same message
        chatbot.retry(regenerate, [state], [chatbot, turn, vote_row, state], api_name="regenerate")
        new_outputs = [chatbot, answer_a, answer_b, system_line, compare_box, vote_row, state]
        new_btn.click(new_conversation, [system_prompt, state], new_outputs, api_name="new_conversation")
        # the Chatbot's own trash icon starts over too (not just an empty display)
        chatbot.clear(new_conversation, [system_prompt, state], new_outputs, api_visibility="private")
        demo.load(training_refresh, None, training.outputs, api_visibility="private")
    demo.rlhf_routes = [parts.exports.route()]  # served beside Gradio's own by app.launch
    demo.rlhf_launch_kwargs = {"theme": THEME, "css": CSS}  # Gradio 6 takes these at launch
    return demo
