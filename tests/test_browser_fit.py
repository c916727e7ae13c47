"""The first session in a real 1280×720 Chromium window (Debian's ``/usr/bin/chromium`` through
Playwright; skipped with the reason when either is missing, never in CI):

* after a comparison, both answers and the four vote buttons are in the viewport;
* no font (or anything else) is fetched from another host, and no web font at all;
* after a vote the Training tab's vote count is the database's, with no click on Refresh;
* "Train now" with too few votes says it was skipped and why, and the rounds table shows it;
* the example prompts fill the message box.
"""

from __future__ import annotations

import shutil
from urllib.parse import urlparse

import pytest

from app import AppConfig
from storage.store import open_store
from tests.conftest import free_port, served_app
from tests.test_browser import browser_page, needs_browser
from training.round import RoundConfig
from training.starter.build import STARTER_JSON
from training.starter.vocab import EXAMPLE_PROMPTS

pytestmark = [pytest.mark.slow, pytest.mark.browser]
MIN_VOTES = 5
FONT_FILES = (".woff", ".woff2", ".ttf", ".otf")


@pytest.fixture
def app(tiny_model_dir, tmp_path):
    model = tmp_path / "starter"  # the tiny model, marked as a starter build: the Chat tab offers examples
    shutil.copytree(tiny_model_dir, model)
    (model / STARTER_JSON).write_text("{}")
    config = AppConfig(
        model=str(model), data_dir=str(tmp_path / "data"), port=free_port(),
        max_new_tokens=4, temperature=1.0, round=RoundConfig(min_votes=MIN_VOTES),
    )  # fmt: skip
    with served_app(config):
        yield config


@needs_browser
def test_first_session_fits_1280x720_and_training_numbers_are_current(app):
    store = open_store(app.data_dir)
    requests: list[str] = []
    with browser_page(viewport={"width": 1280, "height": 720}) as (page, expect):
        page.on("request", lambda r: requests.append(r.url))
        page.goto(f"http://127.0.0.1:{app.port}/")
        box = page.get_by_placeholder("Type a message…")

        # the starter's examples fill the box when clicked; one line says it is a demo model
        expect(page.get_by_text("The offline starter is a tiny demo model")).to_be_visible()
        page.get_by_text(EXAMPLE_PROMPTS[1], exact=True).click()
        expect(box).to_have_value(EXAMPLE_PROMPTS[1])

        # a comparison: the last message, both answers and every vote button in view
        box.fill("hello there")
        page.get_by_role("button", name="Send", exact=True).click()
        buttons = [page.get_by_role("button", name=n, exact=True)
                   for n in ("A is better", "B is better", "Tie", "Both bad")]
        for button in buttons:
            expect(button).to_be_visible()
        for element in [*buttons, page.locator("#answer-a"), page.locator("#answer-b"),
                        page.locator("[data-testid='user']").last]:
            expect(element).to_be_in_viewport(ratio=1.0)
        assert page.evaluate("window.scrollY") == 0  # without scrolling the page

        # a vote: the Training tab's count is the database's, no Refresh pressed
        buttons[0].click()
        expect(buttons[0]).to_be_hidden()
        page.get_by_role("tab", name="Training").click()
        total = store.vote_counts()["total"]
        assert total == 1
        status = page.locator("#training-status")
        expect(status).to_contain_text(f"Votes: {total} (A 1, B 0")

        # Train now with 1 A/B vote of MIN_VOTES: the skip and its reason, in the toast and the table
        page.get_by_role("button", name="Train now").click()
        reason = f"too few votes: 1 A/B votes, {MIN_VOTES} needed"
        expect(page.get_by_text(f"Skipped: {reason}").first).to_be_visible()
        expect(page.get_by_role("gridcell", name="skipped").first).to_be_visible()
        assert "Training round started" not in page.content()

    [row] = store.rounds()
    assert row["status"] == "skipped" and reason in row["reason"]
    local = {"127.0.0.1", "localhost"}
    elsewhere = [u for u in requests if urlparse(u).hostname not in local and not u.startswith("data:")]
    assert elsewhere == [], elsewhere  # nothing fetched from another host (fonts included)
    assert [u for u in requests if urlparse(u).path.endswith(FONT_FILES)] == []  # system fonts only
