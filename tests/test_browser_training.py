"""The Training tab in a real Chromium (Debian's ``/usr/bin/chromium`` through Playwright;
skipped with the reason when either is missing, never in CI): a round started with *Train now*
shows its stage and a progress bar while it runs; once it has finished, the plots draw its point
and the leaderboard rates the versions users compared.
"""

from __future__ import annotations

import pytest

from app import AppConfig
from storage.store import open_store
from tests.conftest import free_port, served_app
from tests.test_browser import browser_page, needs_browser
from training.gate import GateConfig
from training.ppo import PPOConfig
from training.round import RoundConfig
from training.user_gate import UserGateConfig

pytestmark = [pytest.mark.slow, pytest.mark.browser]
VOTES = 10


@pytest.fixture
def app(tiny_model_dir, tmp_path):
    config = AppConfig(
        model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), port=free_port(), max_new_tokens=8,
        temperature=1.0, user_gate=UserGateConfig(user_gate=False), min_new_votes=10_000,
        # PPO long enough (60 iterations) that the page sees the round running
        round=RoundConfig(min_votes=VOTES, gate=GateConfig(enabled=False), ppo=PPOConfig(steps=60, rollout_batch_size=8, mini_batch_size=8)),
    )  # fmt: skip
    with served_app(config):
        yield config


def _vote(app, n: int) -> None:
    from gradio_client import Client

    client = Client(f"http://127.0.0.1:{app.port}/", verbose=False)
    for i in range(n):
        client.predict(f"question {i}: what is {i} plus 2?", True, api_name="/send")
        client.predict(api_name="/vote_a" if i % 2 else "/vote_b")


def _plot(page, title: str):
    """The plot block whose label is ``title``."""
    return page.locator(".block", has=page.get_by_text(title, exact=True)).last


@needs_browser
def test_a_round_shows_progress_then_its_point_in_the_plots(app):
    store = open_store(app.data_dir)
    _vote(app, VOTES)
    with browser_page(viewport={"width": 1280, "height": 900}) as (page, expect):
        page.goto(f"http://127.0.0.1:{app.port}/")
        page.get_by_role("tab", name="Training").click()
        expect(page.locator("#round-progress")).to_have_count(0)  # nothing runs yet
        page.get_by_role("button", name="Train now").click()
        # while it runs: the round, its stage and a progress bar, refreshed by the tab's timer
        progress = page.locator("#round-progress")
        expect(progress).to_contain_text("Round 1")
        expect(progress.locator("progress")).to_be_visible()
        expect(progress).to_contain_text("ppo", timeout=300_000)
        value = float(progress.locator("progress").get_attribute("value") or "nan")
        assert 0.0 <= value < 1.0
        # finished: the bar is gone, the version is live, the plots draw the round
        expect(page.locator("#training-status")).to_contain_text("Live policy version: 1", timeout=600_000)
        expect(progress).to_have_count(0)
        for title, column in (("KL to the reference (nats)", "kl"), ("Mean reward (reward model)", "reward")):
            points = _plot(page, title).locator("[aria-roledescription='point']")
            expect(points).to_have_count(1)  # one point per round, coloured by its outcome
            label = points.first.get_attribute("aria-label")
            assert "round: 1;" in label and f"{column}: " in label and "outcome: promoted" in label, label
        print(_plot(page, "Votes over time").locator("[aria-roledescription]").evaluate_all(
            "els => els.map(e => e.getAttribute('aria-roledescription') + ':' + (e.getAttribute('aria-label')||'').slice(0,80))"))
        # the leaderboard: version 0 and version 1 are listed (votes so far were all v0 vs v0)
        board = page.locator(".block", has=page.get_by_text("Leaderboard", exact=True)).last
        expect(board).to_contain_text("live")
    [row] = store.rounds()
    assert row["status"] == "succeeded" and row["version"] == 1
