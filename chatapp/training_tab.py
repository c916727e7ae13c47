"""The Training tab: live version and candidate, vote counts, the running round's progress,
plots of the rounds, the version leaderboard, what the newest versions changed, and the admin
actions (Train now, rollback, promote / retire the candidate, export).

Everything shown is read from the database on each refresh (a 5 s timer, after every vote,
send and admin action), so several tabs and a second app on one data dir agree. Handlers only
check input, call the store or scheduler and render; errors become ``gr.Error`` here.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from chatapp.auth import AdminRequired
from storage.leaderboard import leaderboard, leaderboard_frame
from storage.round_history import round_history, votes_over_time
from storage.versions import version_changes
from training.progress import describe as describe_progress
from training.progress import progress_fraction
from training.user_gate import UserGateConfig, candidate_verdict

ROUND_COLUMNS = [
    "round", "trigger", "status", "reason", "rm/accuracy", "objective/reward",
    "objective/kl", "version", "started", "finished",
]  # fmt: skip
# the long reason column wraps; the others keep room for their headers
ROUND_COLUMN_WIDTHS = ["5%", "7%", "8%", "25%", "10%", "10%", "9%", "7%", "9.5%", "9.5%"]
LEADERBOARD_COLUMNS = ["version", "status", "rating", "95% interval", "matches", "wins", "losses", "ties",
                       "win rate vs parent"]
LEADERBOARD_COLOURS = {"rating": "#1565c0", "95% low": "#90caf9", "95% high": "#90caf9"}
CHANGES_COLUMNS = ["version", "prompt", "before (previous version)", "after (this version)"]
OUTCOME_COLOURS = {"promoted": "#2e7d32", "live": "#2e7d32", "candidate": "#f9a825", "rejected": "#c62828",
                   "retired": "#8e24aa", "failed": "#616161"}  # promoted and rejected never look alike


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def rounds_table(store) -> list[list[str]]:
    """Rows of the rounds table, newest first; a running round's reason column is its progress."""
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


def candidate_line(store, user_gate: UserGateConfig | None) -> str:
    """The waiting candidate, its votes against live and its Wilson bounds, or why there is none."""
    version = store.candidate_version()
    if version is None:
        return ("none waiting" if user_gate is not None
                else "none (--user-gate false: a passing candidate goes live at once)")
    return f"version {version}, {candidate_verdict(store, version, user_gate or UserGateConfig()).note}"


def status_markdown(store, user_gate: UserGateConfig | None, busy: bool = False) -> str:
    """The tab's summary: live version, candidate, vote counts, whether a round runs."""
    counts = store.vote_counts()
    running = busy or store.running_round() is not None
    return (
        f"**Live policy version:** {store.live_version()}  \n"
        f"**Candidate:** {candidate_line(store, user_gate)}  \n"
        f"**Votes:** {counts['total']} (A {counts['a']}, B {counts['b']}, tie {counts['tie']}, "
        f"both bad {counts['both_bad']}; {counts['pending']} comparisons awaiting a vote)  \n"
        f"**Training:** {'a round is running' if running else 'idle'}"
    )


def progress_html(store) -> str:
    """The running round as a progress bar with its stage and ETA (empty when none runs). Only
    numbers and the stage name (the project's own words) go into the markup."""
    row = store.running_round()
    if row is None:
        return ""
    progress = row.get("progress") or {}
    fraction = progress_fraction(progress)
    words = html.escape(describe_progress(progress) or "starting")
    value = f'value="{fraction:.3f}"' if fraction is not None else ""  # no value: an indeterminate bar
    percent = f" ({fraction:.0%})" if fraction is not None else ""
    return (f'<div id="round-progress"><b>Round {int(row["id"])}</b>: {words}{percent}<br>'
            f'<progress max="1" {value} style="width:100%"></progress></div>')


def leaderboard_rows(board: list[dict]) -> list[list[str]]:
    """:func:`storage.leaderboard.leaderboard`'s result as table rows (best first): the
    Bradley–Terry rating from live votes with its bootstrap interval, matches, and the win rate
    against the version's parent."""
    rows = []
    for r in board:
        interval = "" if r.get("low") is None else f"{r['low']:.0f} – {r['high']:.0f}"
        rows.append([_fmt(r["version"]), r.get("status") or "", "" if r.get("rating") is None else f"{r['rating']:.0f}",
                     interval, _fmt(r["votes"]), _fmt(r["wins"]), _fmt(r["losses"]),
                     _fmt(r["ties"]), _fmt(r.get("win_rate_vs_parent"))])
    return rows


def leaderboard_points(board: list[dict]) -> pd.DataFrame:
    """The rated versions' ratings and interval ends in long form for one scatter plot:
    columns ``version`` (int), ``rating`` (float, rating points), ``kind`` ("rating", "95% low",
    "95% high")."""
    frame = leaderboard_frame(board)
    long = frame.melt(id_vars=["version"], value_vars=["rating", "low", "high"], var_name="kind", value_name="value")
    long["kind"] = long["kind"].map({"rating": "rating", "low": "95% low", "high": "95% high"})
    return long.dropna(subset=["value"]).rename(columns={"value": "rating"})


def changes_rows(registry, versions: list[int]) -> list[list[str]]:
    """What each of ``versions`` changed: held-out prompts with the previous version's answer
    and its own, as the gate sampled them (none for version 0 and for versions without a
    record). Raw text: the table shows cells as plain text."""
    return [[str(v), c["prompt"], f"v{c['before_version']}: {c['before']}", c["after"]]
            for v in versions for c in version_changes(registry, v)]


def changed_versions(store) -> list[int]:
    """The versions whose changes the tab shows: the waiting candidate (if any), then the live one."""
    shown = [store.candidate_version(), store.live_version()]
    return [v for v in dict.fromkeys(shown) if v]  # version 0 changed nothing


@dataclass
class TrainingTab:
    """The tab's components; :meth:`refresh` returns their values in :attr:`outputs` order."""

    status: gr.Markdown
    progress: gr.HTML
    rounds: gr.Dataframe
    version_pick: gr.Dropdown
    metrics_plots: list
    votes_plot: gr.LinePlot
    board: gr.Dataframe
    board_plot: gr.ScatterPlot
    changes_title: gr.Markdown
    changes: gr.Dataframe

    @property
    def core_outputs(self) -> list:
        """What ``/training_status`` returns: status, rounds table, version choices."""
        return [self.status, self.rounds, self.version_pick]

    @property
    def extra_outputs(self) -> list:
        return [self.progress, *self.metrics_plots, self.votes_plot, self.board, self.board_plot,
                self.changes_title, self.changes]

    @property
    def outputs(self) -> list:
        return self.core_outputs + self.extra_outputs


METRIC_PLOTS = [  # (column of round_history, title)
    ("reward", "Mean reward (reward model)"),
    ("kl", "KL to the reference (nats)"),
    ("rm_accuracy", "Reward-model accuracy (held out)"),
    ("answer_tokens", "Answer length (tokens)"),
]


def build_training_tab(parts, training_status_api: str = "training_status"):
    """Lay out the Training tab inside the current ``gr.Blocks`` and wire its events; returns
    ``(tab, core, refresh)``: ``core()`` gives ``tab.core_outputs`` (cheap: after every vote and
    send), ``refresh()`` every value of ``tab.outputs`` (the timer, admin actions)."""
    service = parts.service
    store = service.store
    exports = parts.exports

    board_cache: dict = {}  # the bootstrap fit is redone only when votes or versions changed

    def board_values():
        key = (store.vote_counts()["total"], len(store.versions()))
        if board_cache.get("key") != key:
            board = leaderboard(store)
            board_cache.update(key=key, rows=leaderboard_rows(board), frame=leaderboard_points(board))
        return board_cache["rows"], board_cache["frame"]

    def core():
        """The API's ``/training_status``: (status, rounds table, version choices)."""
        versions = [str(v["version"]) for v in store.versions() if v.get("status") not in ("rejected", "candidate")]
        live = store.live_version()
        return (
            summary(),
            rounds_table(store),
            gr.update(choices=versions, value=str(live) if live is not None else None),
        )

    def extra():
        """Progress bar, plots, leaderboard and what changed."""
        history = round_history(store)
        shown = changed_versions(store)
        rows, frame = board_values()
        return (
            progress_html(store),
            *[history for _ in METRIC_PLOTS],
            votes_over_time(store),
            rows,
            frame,
            f"**What {' and '.join(f'version {v}' for v in shown)} changed** (the candidate first; held-out "
            "prompts: the previous version's answer, then its own)"
            if shown else "**What changed:** version 0 is the base model; a trained version shows its answers here.",
            changes_rows(parts.registry, shown),
        )

    def refresh():
        return (*core(), *extra())

    def require_admin(user, password, action: str, request: gr.Request | None = None) -> None:
        if parts.admin is None:
            return
        client = getattr(getattr(request, "client", None), "host", None)
        try:
            parts.admin.require(user, password, action, client=client)
        except AdminRequired as exc:
            raise gr.Error(str(exc), title="Admin login required", print_exception=False) from None

    def summary() -> str:
        return status_markdown(store, service.user_gate, parts.scheduler is not None and parts.scheduler.busy)

    def train_now(user=None, password=None, request: gr.Request = None):
        require_admin(user, password, "Train now", request)
        if parts.scheduler is None:
            raise gr.Error("Training is not enabled in this app.", print_exception=False)
        gr.Info(parts.scheduler.request_round())
        return summary()

    def export_votes(user=None, password=None, request: gr.Request = None):
        require_admin(user, password, "Exporting the votes", request)
        link, n = exports.create()
        gr.Info(f"Exported {n} preference pairs.")
        minutes = max(1, round(exports.ttl_s / 60))
        return (f"[Download votes.jsonl]({link}) ({n} preference pairs, TRL conversational format; "
                f"the link works once, for {minutes} minutes)")

    def rollback(version, user=None, password=None, request: gr.Request = None):
        require_admin(user, password, "Rollback", request)
        if version in (None, ""):
            raise gr.Error("Pick a version to make live.", print_exception=False)
        try:
            store.set_live(int(version))
        except (KeyError, ValueError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        gr.Info(f"Version {version} is live; the next reply uses it.")
        return summary()

    def decide(promote: bool, user=None, password=None, request: gr.Request = None):
        action = "Promoting the candidate" if promote else "Retiring the candidate"
        require_admin(user, password, action, request)
        version = store.candidate_version()
        if version is None:
            raise gr.Error("No candidate is waiting.", print_exception=False)
        note = ("promoted by an admin" if promote else "retired by an admin") + \
            f" ({candidate_verdict(store, version, service.user_gate or UserGateConfig()).note})"
        if not store.decide_candidate(version, promote, note):
            raise gr.Error(f"Version {version} was decided meanwhile; refresh.", print_exception=False)
        gr.Info(f"Version {version} is live; the next reply uses it." if promote else f"Version {version} is retired.")
        return summary()

    def decider(promote: bool):
        def handler(user, password, request: gr.Request):
            return decide(promote, user, password, request)
        return handler

    status = gr.Markdown(summary(), elem_id="training-status", label="status")
    progress = gr.HTML(progress_html(store), label="round progress")
    with gr.Row(visible=parts.admin is not None):
        admin_user = gr.Textbox(label="Admin user", scale=1)
        admin_password = gr.Textbox(label="Admin password", type="password", scale=1)
    with gr.Row():
        train_btn = gr.Button("Train now", variant="primary", visible=parts.scheduler is not None)
        refresh_btn = gr.Button("Refresh")
        export_btn = gr.Button("Export votes (JSONL)")
    export_link = gr.Markdown(label="export link")
    rounds = gr.Dataframe(headers=ROUND_COLUMNS, value=rounds_table(store), label="Training rounds",
                          interactive=False, wrap=True, column_widths=ROUND_COLUMN_WIDTHS)
    with gr.Row():
        # any version number is accepted (the store checks it): a fresh API client can roll back
        # without first loading the current list of choices
        version_pick = gr.Dropdown(label="Policy version", choices=[], interactive=True, allow_custom_value=True)
        rollback_btn = gr.Button("Make this version live (rollback)")
    with gr.Row():
        promote_btn = gr.Button("Promote the candidate now")
        retire_btn = gr.Button("Retire the candidate")
    # the plots start with the current (typed) frames: an axis's type (temporal, quantitative,
    # nominal) is taken from the first value's columns
    history = round_history(store)
    with gr.Accordion("Rounds over time", open=True):
        with gr.Row():
            metrics_plots = [
                gr.ScatterPlot(history, x="round", y=column, color="outcome", title=title,
                               color_map=OUTCOME_COLOURS, label=title, height=220,
                               tooltip=["round", column, "outcome"])
                for column, title in METRIC_PLOTS[:2]
            ]
        with gr.Row():
            metrics_plots += [
                gr.ScatterPlot(history, x="round", y=column, color="outcome", title=title,
                               color_map=OUTCOME_COLOURS, label=title, height=220,
                               tooltip=["round", column, "outcome", "rm_heldout_n"] if column == "rm_accuracy"
                               else ["round", column, "outcome"])
                for column, title in METRIC_PLOTS[2:]
            ]
        votes_plot = gr.LinePlot(votes_over_time(store), x="time", y="votes", color="kind", title="Votes over time",
                                 x_axis_format="%b %d %H:%M",
                                 label="votes", height=220)
    with gr.Accordion("Version leaderboard (Bradley–Terry from live votes)", open=True):
        board = gr.Dataframe(headers=LEADERBOARD_COLUMNS, label="Leaderboard", interactive=False, wrap=True)
        board_plot = gr.ScatterPlot(board_values()[1], x="version", y="rating", color="kind",
                                    color_map=LEADERBOARD_COLOURS, title="Rating with its 95% interval",
                                    label="leaderboard plot", height=220, tooltip=["version", "rating", "kind"])
    changes_title = gr.Markdown(label="what changed")
    changes = gr.Dataframe(headers=CHANGES_COLUMNS, label="What changed", interactive=False, wrap=True,
                           datatype=["str", "str", "str", "str"], column_widths=["8%", "30%", "31%", "31%"])
    timer = gr.Timer(5.0)

    tab = TrainingTab(status, progress, rounds, version_pick, metrics_plots, votes_plot, board, board_plot,
                      changes_title, changes)
    refresh_btn.click(core, None, tab.core_outputs, api_name=training_status_api).then(
        extra, None, tab.extra_outputs, api_visibility="private")
    timer.tick(refresh, None, tab.outputs, api_visibility="private")
    admin = [admin_user, admin_password]  # checked in each admin handler
    train_btn.click(train_now, admin, status, api_name="train_now").then(
        refresh, None, tab.outputs, api_visibility="private")  # a skipped round shows at once
    export_btn.click(export_votes, admin, export_link, api_name="export_votes")
    rollback_btn.click(rollback, [version_pick, *admin], status, api_name="rollback").then(
        refresh, None, tab.outputs, api_visibility="private")
    promote_btn.click(decider(True), admin, status, api_name="promote_candidate").then(
        refresh, None, tab.outputs, api_visibility="private")
    retire_btn.click(decider(False), admin, status, api_name="retire_candidate").then(
        refresh, None, tab.outputs, api_visibility="private")
    return tab, core, refresh
