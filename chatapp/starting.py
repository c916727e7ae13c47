"""The page the app serves while the offline starter model is built (a data dir's first run).

The chat needs a model and a first run has none yet: building the starter takes minutes
(:mod:`training.starter.build`). So ``app.py`` serves this page at once, on the app's own host
and port: a note, the build's stage and percentage (refreshed every second by a ``gr.Timer``)
and the chat box and Send button, disabled. Once the model is ready the app proper replaces it
on the port, and an open page reloads into the chat by itself: a small script polls
:data:`STATUS_ROUTE`, which only this page serves, and reloads on the first 404 (the app
answers there now); a refused connection in between (one server gone, the next not yet up) is
polled again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import gradio as gr
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

STATUS_ROUTE = "/rlhf/starting"  # JSON of StartingPage.status(); absent from the app proper
POLL_MS = 1000
# Run once when the page loads (Gradio's launch(js=...)): poll the status route; reload on a
# 404. The path is relative to the page's <base>, the app's root.
RELOAD_JS = f"""() => {{
  const poll = async () => {{
    try {{
      const response = await fetch("{STATUS_ROUTE.lstrip('/')}", {{cache: "no-store"}});
      if (response.status === 404) {{ window.location.reload(); return; }}
    }} catch (error) {{}}
    setTimeout(poll, {POLL_MS});
  }};
  setTimeout(poll, {POLL_MS});
}}"""

HEADING = "## Building the offline starter model"
NOTE = (
    "This is the first run on this data dir, and no `--model` was given: the app first trains its "
    "own small model (about 8 minutes on 2 cores). **Chat is disabled until the model is ready**; "
    "this page then opens the chat by itself."
)
PLACEHOLDER = "Chat opens when the starter model is ready…"


def _duration(seconds: float) -> str:
    """``"2 min 05 s"`` or ``"42 s"`` for a non-negative number of seconds."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class StartingPage:
    """A small Gradio page that shows a build's progress, fed by :meth:`report`.

    ``stages`` names the build's stages in order (:data:`training.starter.build.STAGES`, plus
    whatever the app does after it); :meth:`report` takes ``(stage, done, total)`` from any
    thread, so it can be passed as a build's ``on_progress``. ``demo`` is the page; serve it
    with ``app.launch`` (its ``rlhf_routes`` and ``rlhf_launch_kwargs`` carry the status route
    and the reload script).
    """

    def __init__(self, stages: Sequence[str], refresh_s: float = 1.0):
        if not stages:
            raise ValueError("StartingPage needs at least one stage")
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be > 0 seconds, got {refresh_s}")
        self.stages = tuple(stages)
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._done = self._total = 0
        self._started = time.monotonic()
        self.demo = self._blocks(refresh_s)

    def report(self, stage: str, done: int, total: int) -> None:
        """Record that ``stage`` has ``done`` of ``total`` units done.

        Raises:
            ValueError: ``stage`` is not one of ``stages``, or not ``0 <= done <= total``.
        """
        if stage not in self.stages:
            raise ValueError(f"unknown stage {stage!r}; expected one of {self.stages}")
        if not 0 <= done <= total:
            raise ValueError(f"progress must satisfy 0 <= done <= total, got {done} of {total}")
        with self._lock:
            self._stage, self._done, self._total = stage, done, total

    def status(self) -> dict:
        """``{"stage", "stage_index" (1-based), "stages", "done", "total", "percent" (0–100, of
        the stage), "elapsed_s" (since the page was made)}``; stage and index are ``None`` before
        the first report. What the status route serves."""
        with self._lock:
            stage, done, total = self._stage, self._done, self._total
        return {
            "stage": stage,
            "stage_index": None if stage is None else self.stages.index(stage) + 1,
            "stages": len(self.stages),
            "done": done,
            "total": total,
            "percent": 100.0 * done / total if total else 0.0,
            "elapsed_s": time.monotonic() - self._started,
        }

    def progress_markdown(self) -> str:
        """One line: the stage, its number, ``done`` of ``total`` with the percentage, and the
        time elapsed; ``"Preparing the build…"`` before the first report."""
        s = self.status()
        elapsed = _duration(s["elapsed_s"])
        if s["stage"] is None:
            return f"Preparing the build… ({elapsed} elapsed)"
        return (f"**Stage {s['stage_index']} of {s['stages']}: {s['stage']}** — {s['done']} of {s['total']} "
                f"({s['percent']:.0f} %) · {elapsed} elapsed")

    def progress_html(self) -> str:
        """A native ``<progress>`` bar of the current stage's percentage."""
        s = self.status()
        return (f'<progress max="100" value="{s["percent"]:.1f}" style="width: 100%" '
                f'aria-label="progress of the current stage">{s["percent"]:.0f} %</progress>')

    def _route(self) -> APIRoute:
        def starting_status():
            return JSONResponse(self.status(), headers={"Cache-Control": "no-store"})

        return APIRoute(STATUS_ROUTE, starting_status, methods=["GET"], include_in_schema=False)

    def _blocks(self, refresh_s: float) -> gr.Blocks:
        from chatapp.ui import THEME  # the app's look

        def refresh():
            # at the last stage the timer stops: nothing changes until the reload, and a tick
            # sent while the port changes hands would raise Gradio's "connection lost" notice
            last = self.status()["stage"] == self.stages[-1]
            return self.progress_markdown(), self.progress_html(), gr.Timer(active=not last)

        with gr.Blocks(title="RLHF chat") as demo:
            gr.Markdown(f"{HEADING}\n\n{NOTE}")
            line = gr.Markdown(self.progress_markdown(), elem_id="starter-progress")
            bar = gr.HTML(self.progress_html(), elem_id="starter-progress-bar")
            gr.Chatbot(label="Conversation", height="30vh", placeholder=PLACEHOLDER)
            with gr.Row():
                gr.Textbox(placeholder=PLACEHOLDER, show_label=False, scale=6, interactive=False)
                gr.Button("Send", variant="primary", scale=1, interactive=False)
            timer = gr.Timer(refresh_s)
            timer.tick(refresh, None, [line, bar, timer], api_name="starting_status", show_progress="hidden")
            demo.load(refresh, None, [line, bar, timer], api_visibility="private", show_progress="hidden")
        demo.rlhf_routes = [self._route()]  # served beside Gradio's own by app.launch
        demo.rlhf_launch_kwargs = {"theme": THEME, "js": RELOAD_JS}
        return demo
