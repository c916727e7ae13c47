"""The first run: the UI answers while the starter model is built, then the chat takes over.

* ``build_starter``'s ``on_progress`` reports every stage in order, optimizer steps one by one.
* The starting page (``chatapp.starting``) serves the build's stage and percentage over HTTP
  and its Gradio API, with the chat controls disabled; once it is closed the app proper serves
  on the same port, where the status route is gone (the 404 an open page reloads on).
* ``python app.py`` on a fresh data dir with a tiny ``--starter.*`` recipe: the address line
  comes first, the page shows the running build, SIGTERM mid-build exits 0 and leaves no
  starter and no temp dir; a second start builds the starter to the end and serves the chat.
* In headless Chromium (skipped with the reason when missing): the page shows the progress
  and a disabled message box, and reloads into the chat by itself when the app replaces it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from app import READY_STAGE, AppConfig, launch
from chatapp.starting import PLACEHOLDER, STATUS_ROUTE, StartingPage
from tests.conftest import free_port, served_app
from tests.test_browser import browser_page, needs_browser
from training.starter.build import STAGES, StarterConfig, build_starter

WAIT_S = 300  # a deadline against hangs only
ROOT = Path(__file__).resolve().parents[1]
# a build of a few seconds (quality does not matter here); sft_steps is set per test
RECIPE = dict(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
              max_position_embeddings=64, n_documents=60, n_conversations=120, seq_len=64,
              batch_size=4, pretrain_steps=3, eval_per_skill=0, num_threads=1)


def _get(url: str) -> tuple[int, bytes]:
    """``(HTTP status, body)`` of a GET (an error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _status(port: int) -> dict:
    code, body = _get(f"http://127.0.0.1:{port}{STATUS_ROUTE}")
    assert code == 200, (code, body)
    return json.loads(body)


def _wait_for(condition, what: str):
    """Poll ``condition()`` until it returns something truthy; fail after :data:`WAIT_S`."""
    deadline = time.monotonic() + WAIT_S
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def _recipe_flags(**changes) -> list[str]:
    return [f"--starter.{k.replace('_', '-')}={v}" for k, v in (RECIPE | changes).items()]


# ------------------------------------------------------------------ build progress -------------
def test_build_reports_every_stage_in_order_and_each_step(tmp_path):
    config = StarterConfig(**(RECIPE | {"sft_steps": 4, "eval_per_skill": 1}))
    events: list[tuple[str, int, int]] = []
    build_starter(tmp_path / "starter", config, progress=False, on_progress=lambda *e: events.append(e))
    assert [s for i, (s, _, _) in enumerate(events) if i == 0 or events[i - 1][0] != s] == list(STAGES)
    for stage in STAGES:
        mine = [(done, total) for s, done, total in events if s == stage]
        total = mine[0][1]
        assert [d for d, _ in mine] == list(range(total + 1)), stage  # from 0, one by one, to total
        assert {t for _, t in mine} == {total}
    assert {s: t for s, _, t in events}["pre-training"] == RECIPE["pretrain_steps"]
    assert {s: t for s, _, t in events}["supervised fine-tuning"] == 4
    # without pre-training or evaluation those stages are left out
    events.clear()
    build_starter(tmp_path / "b", StarterConfig(**(RECIPE | {"sft_steps": 2, "pretrain_steps": 0})),
                  progress=False, on_progress=lambda *e: events.append(e))
    assert "pre-training" not in {s for s, _, _ in events} and "evaluating" not in {s for s, _, _ in events}


# ------------------------------------------------------------------ the starting page ----------
def test_starting_page_shows_progress_then_the_app_takes_the_port(tiny_model_dir, tmp_path):
    from gradio_client import Client

    config = AppConfig(model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), port=free_port(),
                       max_new_tokens=4, no_train=True)
    url = f"http://127.0.0.1:{config.port}"
    page = StartingPage((*STAGES, READY_STAGE))
    with pytest.raises(ValueError, match="unknown stage"):
        page.report("warming up", 0, 1)
    with pytest.raises(ValueError, match="done <= total"):
        page.report("pre-training", 301, 300)
    launch(page.demo, config, block=False)
    try:
        assert _get(url + "/")[0] == 200
        assert _status(config.port)["stage"] is None
        page.report("pre-training", 126, 300)
        status = _status(config.port)
        assert (status["stage"], status["stage_index"], status["stages"]) == ("pre-training", 3, len(STAGES) + 1)
        assert (status["done"], status["total"], status["percent"]) == (126, 300, 42.0)
        line, bar, _ = Client(url + "/", verbose=False).predict(api_name="/starting_status")
        assert f"Stage 3 of {len(STAGES) + 1}: pre-training" in line and "126 of 300 (42 %)" in line
        assert 'value="42.0"' in bar
        # the chat controls are there, disabled, with the note as their placeholder
        components = json.loads(_get(url + "/config")[1])["components"]
        box = next(c["props"] for c in components if c["type"] == "textbox")
        send = next(c["props"] for c in components if c["type"] == "button" and c["props"].get("value") == "Send")
        assert box["interactive"] is False and box["placeholder"] == PLACEHOLDER and send["interactive"] is False
    finally:
        page.demo.close(verbose=False)
    with served_app(config):  # the app proper, on the same port at once
        assert _get(url + STATUS_ROUTE)[0] == 404  # what an open starting page reloads on
        chat, *_ = Client(url + "/", verbose=False).predict("hello", False, api_name="/send")
        assert chat[-1]["role"] == "assistant"


@pytest.mark.browser
@needs_browser
def test_browser_page_shows_progress_then_reloads_into_the_chat(tiny_model_dir, tmp_path):
    config = AppConfig(model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), port=free_port(),
                       max_new_tokens=4, no_train=True)
    page = StartingPage((*STAGES, READY_STAGE), refresh_s=0.5)
    launch(page.demo, config, block=False)
    closed = False
    try:
        with browser_page() as (browser, expect):
            browser.goto(f"http://127.0.0.1:{config.port}/")
            expect(browser.get_by_text("Building the offline starter model")).to_be_visible()
            box = browser.get_by_placeholder(PLACEHOLDER)
            expect(box).to_be_disabled()
            expect(browser.get_by_role("button", name="Send", exact=True)).to_be_disabled()
            page.report("supervised fine-tuning", 300, 1200)  # the timer shows it, no reload needed
            expect(browser.locator("#starter-progress")).to_contain_text("supervised fine-tuning")
            expect(browser.locator("#starter-progress")).to_contain_text("300 of 1200 (25 %)")
            expect(browser.locator("#starter-progress-bar progress")).to_have_attribute("value", "25.0")
            page.report(READY_STAGE, 0, 1)  # the timer stops: only the page's own script reloads it
            expect(browser.locator("#starter-progress")).to_contain_text(READY_STAGE)
            page.demo.close(verbose=False)
            closed = True
            with served_app(config):
                message = browser.get_by_placeholder("Type a message…")  # the chat, without a goto
                expect(message).to_be_editable()
                expect(browser.get_by_text("Building the offline starter model")).to_have_count(0)
    finally:
        if not closed:
            page.demo.close(verbose=False)


# ------------------------------------------------------------------ python app.py --------------
class App:
    """``python app.py ARGS`` in a child process, its console lines collected as they come."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.extend(part for part in line.rstrip("\n").split("\r") if part.strip())  # tqdm's \r

    def wait_for_line(self, text: str) -> None:
        def seen():
            assert self.proc.poll() is None, "\n".join(self.lines)
            return text in self.lines

        _wait_for(seen, repr(text))

    def stop(self) -> int:
        """SIGTERM, then the exit code; the output is complete afterwards."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_first_run_serves_the_build_progress_then_the_chat(tmp_path):
    from gradio_client import Client

    port = free_port()
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--port", str(port), "--no-train", "--max-new-tokens", "4"]
    address = f"RLHF chat on http://127.0.0.1:{port}"

    # 1. a build far too long to finish: the page answers and shows it running; SIGTERM stops it
    app = App(*args, *_recipe_flags(sft_steps=10**7))
    try:
        app.wait_for_line(address)  # printed once the page answers, before the build
        assert _get(f"http://127.0.0.1:{port}/")[0] == 200
        first = _wait_for(lambda: (s := _status(port))["stage"] == "supervised fine-tuning" and s["done"] > 0 and s,
                          "the fine-tuning stage")
        assert first["total"] == 10**7 and first["stage_index"] == STAGES.index("supervised fine-tuning") + 1
        _wait_for(lambda: _status(port)["done"] > first["done"], "the step count to move")
        line, *_ = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(api_name="/starting_status")
        assert "supervised fine-tuning" in line and f"of {10**7}" in line
        code = app.stop()
    finally:
        app.kill()
    assert code == 0, app.output
    assert "Traceback" not in app.output and "stopped before the chat was ready" in app.output, app.output
    assert app.lines.index(address) <= 3, app.output
    assert sorted(p.name for p in data.iterdir()) == [], "a starter or a temp dir was left"

    # 2. the same data dir, a build that finishes: the chat is served after it, on the same port
    app = App(*args, *_recipe_flags(sft_steps=3))
    try:
        ready = f"the starter model is ready: chat on http://127.0.0.1:{port} (an open page reloads into it)"
        app.wait_for_line(ready)
        assert _get(f"http://127.0.0.1:{port}{STATUS_ROUTE}")[0] == 404
        chat, *_ = Client(f"http://127.0.0.1:{port}/", verbose=False).predict("hello", False, api_name="/send")
        assert chat[-1]["role"] == "assistant"
        code = app.stop()
    finally:
        app.kill()
    assert code == 0 and "Traceback" not in app.output, app.output
    lines = app.lines
    built = next(i for i, line in enumerate(lines) if line.startswith("starter: "))
    assert lines.count(address) == 1 and lines.index(address) < built < lines.index(ready), app.output
    assert sum("INFO training.models: model" in line for line in lines) == 1, app.output  # loaded once
    info = json.loads((data / "starter" / "starter.json").read_text())
    assert info["config"]["sft_steps"] == 3 and info["config"]["hidden_size"] == RECIPE["hidden_size"]
