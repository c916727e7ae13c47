"""The Gradio UI: a Chat tab (streaming, stop, new conversation, side-by-side comparisons with
votes) and a Training tab (live version, rounds, vote counts, train now, rollback, export).

Handlers only parse input, call one method of :class:`chatapp.service.ChatService` (or the
store / scheduler) and render the result; errors become ``gr.Error`` / ``gr.Warning`` here only.
Message text is HTML-escaped for display and Markdown is not rendered, so markup in a message
(HTML, ``*stars*``, a line like ``206.``) is shown exactly as typed or generated, never run; the
store keeps it byte for byte.
"""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass

import gradio as gr

from chatapp.auth import AdminAuth, AdminRequired
from chatapp.exports import ExportDesk
from chatapp.service import ChatService, ChatSession, UserInputError
from storage.registry import AdapterRegistry
from storage.store import AlreadyVoted
from training.chat_format import ContextTooLongError
from training.progress import describe as describe_progress
from training.scheduler import TrainingScheduler
from training.user_gate import UserGateConfig, candidate_verdict

ROUND_COLUMNS = [
    "round", "trigger", "status", "reason", "rm/accuracy", "objective/reward",
    "objective/kl", "version", "started", "finished",
]  # fmt: skip
# the long reason column wraps; the others keep room for their headers
ROUND_COLUMN_WIDTHS = ["5%", "7%", "8%", "25%", "10%", "10%", "9%", "7%", "9.5%", "9.5%"]


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


STOPPED_MARK = "\n\n[stopped]"  # after an answer cut short by Stop (display only; not stored)


def _display(messages: list[dict]) -> list[dict]:
    """Chatbot value: role/content dicts with the content HTML-escaped (shown literally), an
    answer cut short by Stop followed by :data:`STOPPED_MARK`."""
    return [{"role": m["role"], "content": html.escape(m["content"]) + (STOPPED_MARK if m.get("stopped") else "")}
            for m in messages]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def rounds_table(store) -> list[list[str]]:
    """Rows of the rounds table, newest first."""
    rows = []
    for r in store.rounds(limit=50):
        m = r.get("metrics") or {}
        rows.append(
            [
                _fmt(r["id"]), r.get("trigger") or "", r["status"],
                describe_progress(r.get("progress")) if r["status"] == "running" else r.get("reason") or "",
                _fmt(m.get("rm/accuracy")), _fmt(m.get("objective/reward")),
                _fmt(m.get("objective/kl")), _fmt(r.get("version")),
                (r.get("started_at") or "")[:19], (r.get("finished_at") or "")[:19],
            ]
        )  # fmt: skip
    return rows


def status_markdown(parts: UIParts) -> str:
    """The Training tab's summary: live version, vote counts, whether a round runs."""
    store = parts.service.store
    counts = store.vote_counts()
    live = store.live_version()
    running = parts.scheduler is not None and parts.scheduler.busy or store.running_round() is not None
    return (
        f"**Live policy version:** {live}  \n"
        f"**Candidate:** {candidate_line(parts)}  \n"
        f"**Votes:** {counts['total']} (A {counts['a']}, B {counts['b']}, tie {counts['tie']}, "
        f"both bad {counts['both_bad']}; {counts['pending']} comparisons awaiting a vote)  \n"
        f"**Training:** {'a round is running' if running else 'idle'}"
    )


def candidate_line(parts: UIParts) -> str:
    """The waiting candidate, its votes against live and its Wilson bounds, or why there is none."""
    store = parts.service.store
    gate = parts.service.user_gate
    version = store.candidate_version()
    if version is None:
        return "none waiting" if gate is not None else "none (--user-gate false: a passing candidate goes live at once)"
    rule = gate or UserGateConfig()
    return f"version {version}, {candidate_verdict(store, version, rule).note}"


def _client(request: gr.Request | None) -> str | None:
    """The caller's address (None when unknown)."""
    return getattr(getattr(request, "client", None), "host", None)


def _voter(vote, choice: str):
    """The click handler of one vote button (Gradio passes the request, for the client's address)."""

    def handler(state, request: gr.Request):
        return vote(choice, state, request)

    return handler


def _decider(decide, promote: bool):
    """The click handler of "Promote the candidate" (``promote``) or "Retire the candidate"."""

    def handler(user, password, request: gr.Request):
        return decide(promote, user, password, request)

    return handler


def build_ui(parts: UIParts) -> gr.Blocks:
    """Build the Blocks app. Launch it with ``demo.queue().launch(...)``."""
    service = parts.service
    store = service.store
    exports = parts.exports or ExportDesk(store)
    stops: dict[str, threading.Event] = {}  # session id → stop event of its running reply

    def _session(state: ChatSession | None) -> ChatSession:
        return state if state is not None else ChatSession()

    def _stop_event(session: ChatSession) -> threading.Event:
        event = threading.Event()
        stops[session.session_id] = event
        return event

    def send(text, compare, state):
        session = _session(state)
        hidden = gr.update(visible=False)
        stop = _stop_event(session)
        try:
            if compare:
                pending_view = _display(session.messages) + [{"role": "user", "content": html.escape(text or "")}]
                for a, b in service.compare(session, text, stop_event=stop):
                    yield pending_view, "", a, b, gr.update(visible=True), gr.update(visible=False), session
                if session.pending is None:  # stopped: no vote offered
                    yield _display(session.messages), "", "", "", hidden, hidden, session
                else:
                    a, b = (r.text for r in session.pending.replies)
                    yield pending_view, "", a, b, gr.update(visible=True), gr.update(visible=True), session
            else:
                base = _display(session.messages) + [{"role": "user", "content": html.escape(text or "")}]
                for partial in service.chat(session, text, stop_event=stop):
                    view = base + [{"role": "assistant", "content": html.escape(partial)}]
                    yield view, "", gr.skip(), gr.skip(), hidden, hidden, session
                yield _display(session.messages), "", gr.skip(), gr.skip(), hidden, hidden, session
        except (UserInputError, ContextTooLongError) as exc:
            gr.Warning(str(exc))
            yield _display(session.messages), text, gr.skip(), gr.skip(), gr.skip(), gr.skip(), session
        finally:
            if stops.get(session.session_id) is stop:  # one entry per reply in flight
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
        return [], "", "", hidden, hidden, session

    def refresh_training():
        versions = [str(v["version"]) for v in store.versions() if v.get("status") not in ("rejected", "candidate")]
        live = store.live_version()
        return (
            status_markdown(parts),
            rounds_table(store),
            gr.update(choices=versions, value=str(live) if live is not None else None),
        )

    def _require_admin(user, password, action: str, request: gr.Request | None = None) -> None:
        if parts.admin is None:
            return
        try:
            parts.admin.require(user, password, action, client=_client(request))
        except AdminRequired as exc:
            raise gr.Error(str(exc), title="Admin login required", print_exception=False) from None

    def train_now(user=None, password=None, request: gr.Request = None):
        _require_admin(user, password, "Train now", request)
        if parts.scheduler is None:
            raise gr.Error("Training is not enabled in this app.", print_exception=False)
        gr.Info(parts.scheduler.request_round())
        return status_markdown(parts)

    def export_votes(user=None, password=None, request: gr.Request = None):
        _require_admin(user, password, "Exporting the votes", request)
        link, n = exports.create()
        gr.Info(f"Exported {n} preference pairs.")
        minutes = max(1, round(exports.ttl_s / 60))
        return (f"[Download votes.jsonl]({link}) ({n} preference pairs, TRL conversational format; "
                f"the link works once, for {minutes} minutes)")

    def rollback(version, user=None, password=None, request: gr.Request = None):
        _require_admin(user, password, "Rollback", request)
        if version in (None, ""):
            raise gr.Error("Pick a version to make live.", print_exception=False)
        try:
            store.set_live(int(version))
        except (KeyError, ValueError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        gr.Info(f"Version {version} is live; the next reply uses it.")
        return status_markdown(parts)

    def decide(promote: bool, user=None, password=None, request: gr.Request = None):
        action = "Promoting the candidate" if promote else "Retiring the candidate"
        _require_admin(user, password, action, request)
        version = store.candidate_version()
        if version is None:
            raise gr.Error("No candidate is waiting.", print_exception=False)
        note = ("promoted by an admin" if promote else "retired by an admin") + \
            f" ({candidate_verdict(store, version, service.user_gate or UserGateConfig()).note})"
        if not store.decide_candidate(version, promote, note):
            raise gr.Error(f"Version {version} was decided meanwhile; refresh.", print_exception=False)
        gr.Info(f"Version {version} is live; the next reply uses it." if promote else f"Version {version} is retired.")
        return status_markdown(parts)

    with gr.Blocks(title="RLHF chat") as demo:
        state = gr.State(None)
        with gr.Tab("Chat"):
            chatbot = gr.Chatbot(label="Conversation", height=CHAT_HEIGHT, sanitize_html=True, render_markdown=False)
            with gr.Group(visible=False) as compare_box:
                with gr.Row():
                    answer_a = gr.Textbox(label="Answer A", lines=4, max_lines=8, interactive=False)
                    answer_b = gr.Textbox(label="Answer B", lines=4, max_lines=8, interactive=False)
            with gr.Row(visible=False, elem_id="vote-row") as vote_row:
                vote_a = gr.Button("A is better")
                vote_b = gr.Button("B is better")
                vote_tie = gr.Button("Tie")
                vote_bad = gr.Button("Both bad")
            with gr.Row():
                text = gr.Textbox(placeholder="Type a message…", show_label=False, scale=6, max_lines=8)
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
                system_prompt = gr.Textbox(show_label=False, lines=2)
        with gr.Tab("Training"):
            status = gr.Markdown(status_markdown(parts), elem_id="training-status")
            with gr.Row(visible=parts.admin is not None):
                admin_user = gr.Textbox(label="Admin user", scale=1)
                admin_password = gr.Textbox(label="Admin password", type="password", scale=1)
            with gr.Row():
                train_btn = gr.Button("Train now", variant="primary", visible=parts.scheduler is not None)
                refresh_btn = gr.Button("Refresh")
                export_btn = gr.Button("Export votes (JSONL)")
            export_link = gr.Markdown()
            rounds = gr.Dataframe(
                headers=ROUND_COLUMNS, value=rounds_table(store), label="Training rounds", interactive=False,
                wrap=True, column_widths=ROUND_COLUMN_WIDTHS,
            )
            with gr.Row():
                version_pick = gr.Dropdown(label="Policy version", choices=[], interactive=True)
                rollback_btn = gr.Button("Make this version live (rollback)")
            with gr.Row():
                promote_btn = gr.Button("Promote the candidate now")
                retire_btn = gr.Button("Retire the candidate")
            timer = gr.Timer(5.0)

        training_outputs = [status, rounds, version_pick]
        send_outputs = [chatbot, text, answer_a, answer_b, compare_box, vote_row, state]
        for event in (send_btn.click(send, [text, compare, state], send_outputs, api_name="send"),
                      text.submit(send, [text, compare, state], send_outputs, api_visibility="private")):
            event.then(refresh_training, None, training_outputs, api_visibility="private")  # comparisons awaiting
        # stop ends generation within one decoding step; the send handler then finishes normally
        stop_btn.click(stop, [state], None, api_name="stop", queue=False)
        vote_outputs = [chatbot, answer_a, answer_b, compare_box, vote_row, state]
        for button, choice in ((vote_a, "a"), (vote_b, "b"), (vote_tie, "tie"), (vote_bad, "both_bad")):
            button.click(_voter(vote, choice), [state], vote_outputs, api_name=f"vote_{choice}").then(
                refresh_training, None, training_outputs, api_visibility="private")  # counts current at once
        new_outputs = [chatbot, answer_a, answer_b, compare_box, vote_row, state]
        new_btn.click(new_conversation, [system_prompt, state], new_outputs, api_name="new_conversation")
        # the Chatbot's own trash icon starts over too (not just an empty display)
        chatbot.clear(new_conversation, [system_prompt, state], new_outputs, api_visibility="private")
        refresh_btn.click(refresh_training, None, training_outputs, api_name="training_status")
        timer.tick(refresh_training, None, training_outputs, api_visibility="private")
        demo.load(refresh_training, None, training_outputs, api_visibility="private")
        admin = [admin_user, admin_password]  # checked in each admin handler
        train_btn.click(train_now, admin, status, api_name="train_now").then(
            refresh_training, None, training_outputs, api_visibility="private")  # a skipped round shows at once
        export_btn.click(export_votes, admin, export_link, api_name="export_votes")
        rollback_btn.click(rollback, [version_pick, *admin], status, api_name="rollback")
        promote_btn.click(_decider(decide, True), admin, status, api_name="promote_candidate")
        retire_btn.click(_decider(decide, False), admin, status, api_name="retire_candidate")
    demo.rlhf_routes = [exports.route()]  # served beside Gradio's own by app.launch
    demo.rlhf_launch_kwargs = {"theme": THEME}  # Gradio 6 takes the theme at launch
    return demo
