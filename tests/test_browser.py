"""Hostile input end to end, and the acceptance test in a real browser.

* Over HTTP (always runs): HTML/JS, RTL and emoji, SQL-looking text and angle brackets are
  stored byte for byte and come back HTML-escaped for the chat view; a 100 KB message gets a
  clear "too long" message, nothing is stored and nothing crashes.
* In headless Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright; skipped with the
  reason when either is missing, installed by ``.ci/run``): chat, compare, vote; a message and
  a model reply full of HTML/JS are shown literally (chat bubbles and the Answer A/B boxes), no
  ``<img src=x>`` or injected script element exists, no dialog opens, nothing runs.

The model's replies are the tiny model's, with a hostile tail appended by a wrapper around
``ChatEngine.stream`` (the tiny model cannot be made to emit markup on demand).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from app import AppConfig
from chatapp.engine import ChatEngine
from chatapp.service import MAX_MESSAGE_CHARS
from storage.store import open_store
from tests.conftest import free_port, served_app

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = '<img src=x onerror="window.__pwned=1;alert(1)"> <script>window.__pwned=2;alert(2)</script>'
LINK = "[click me](javascript:window.__pwned=3)"
HOSTILE_MESSAGES = [
    f"{XSS} tell me",
    "שלום עולם! مرحبا 👋🏽👨‍👩‍👧 RTL\u202eevil\u202c and emoji",
    "Robert'); DROP TABLE comparisons; -- \" OR 1=1; SELECT * FROM votes WHERE '1'='1",
    "a < b && c > d; </textarea><b>not bold</b> &amp; &lt;",
]
HOSTILE_REPLY = (' <img src=x onerror="window.__pwned=4;alert(4)"> <script>alert(5)</script> 1<2>0 '
                 '<I am a bot> 2 < 3 && 5 > 4 **bold**\n```python\nprint(1 < 2 and "<b>")\n```')
CODE_LINE = 'print(1 < 2 and "<b>")'  # the reply's fenced code block, shown as code
BIG = "long message " * 6000  # ~78 KB: under the character limit, over the context window


@pytest.fixture
def hostile_model_output(monkeypatch):
    """Every reply ends with HOSTILE_REPLY (angle brackets and markup in model output); the
    replies of one batch (a comparison's answers) get their index before it, so they differ."""
    real = ChatEngine.stream_many  # the one core under stream, sample_many and comparisons

    def stream_many(self, *args, **kwargs):
        replies = yield from real(self, *args, **kwargs)
        texts = [f"{r.text} {i}{HOSTILE_REPLY}" for i, r in enumerate(replies)]
        yield texts
        return [dataclasses.replace(r, text=t) for r, t in zip(replies, texts, strict=True)]

    monkeypatch.setattr(ChatEngine, "stream_many", stream_many)


@pytest.fixture
def app(tiny_model_dir, tmp_path, hostile_model_output):
    config = AppConfig(
        model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), port=free_port(),
        max_new_tokens=4, temperature=1.0, no_train=True,
    )  # fmt: skip
    with served_app(config):
        yield config


def _text(message: dict) -> str:
    """A Chatbot message's text (Gradio 6 sends content as a list of typed parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def _user_messages(store) -> list[str]:
    return [r[0] for r in store.db.execute("select content from messages where role = 'user' order by id")]


def test_hostile_input_is_stored_byte_for_byte_and_escaped_for_display(app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    store = open_store(app.data_dir)
    client = Client(f"http://127.0.0.1:{app.port}/", verbose=False)
    for text in HOSTILE_MESSAGES:
        chat, box, _, _, turn = client.predict(text, False, api_name="/send")
        assert box == ""
        assert turn["reply"].endswith(HOSTILE_REPLY.strip())  # the API's raw text
        # the view: the user's text with every punctuation mark escaped (shown as typed), the
        # reply's markup as character references (no tag survives into the rendered view)
        assert chat[-2]["role"] == "user" and re.search(r"(?<!\\)[<>&*\[]", _text(chat[-2])) is None
        view = _text(chat[-1])
        assert "<img" not in view and "<script" not in view and '&lt;img src=x onerror="window' in view
        assert view.endswith(f"```python\n{CODE_LINE}\n```")  # code is left as it is (Markdown shows it literally)
    assert _user_messages(store) == HOSTILE_MESSAGES  # byte for byte
    replies = [r[0] for r in store.db.execute("select content from messages where role = 'assistant'")]
    assert all(r.endswith(HOSTILE_REPLY.strip()) for r in replies)
    # in a comparison too: the context and both answers are kept as they were
    *_, turn = client.predict(HOSTILE_MESSAGES[2], True, api_name="/send")
    a, b = turn["answer_a"], turn["answer_b"]
    assert a.endswith(HOSTILE_REPLY.strip()) and b.endswith(HOSTILE_REPLY.strip())  # raw texts
    client.predict(api_name="/vote_b")
    row = store.voted_comparisons()[-1]
    assert row["context"][-1] == {"role": "user", "content": HOSTILE_MESSAGES[2]}
    assert (row["answer_a"], row["answer_b"], row["choice"], row["id"]) == (a, b, "b", turn["comparison_id"])
    assert store.db.execute("select count(*) from comparisons").fetchone()[0] == 1  # no injection

    # a 78 KB message: an error with a clear message for the API caller, nothing stored
    before = len(_user_messages(store))
    with pytest.raises(AppError, match="too long"):
        client.predict(BIG, False, api_name="/send")
    assert len(_user_messages(store)) == before
    huge = "x" * (MAX_MESSAGE_CHARS + 1)  # refused before tokenizing, with its own message
    with pytest.raises(AppError, match="too long: 100,001 characters"):
        client.predict(huge, False, api_name="/send")
    assert len(_user_messages(store)) == before
    status, *_ = client.predict(api_name="/training_status")  # the app still serves
    assert "Live policy version" in status


# ---- the real browser ---------------------------------------------------------------------
def _browser_unavailable() -> str | None:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -r requirements.txt)"
    return None


REQUIRED = os.environ.get("REQUIRE_BROWSER_TEST") == "1"  # set by .ci/run: never skip in CI
# a browser test: skipped with the reason when Chromium or Playwright is missing, except in CI
needs_browser = pytest.mark.skipif(not REQUIRED and _browser_unavailable() is not None,
                                   reason=str(_browser_unavailable()))


@contextmanager
def browser_page(**page_options):
    """A page of a fresh headless Chromium (closed on exit), with generous deadlines against
    hangs on a busy machine (not timed assertions); yields ``(page, expect)``."""
    if _browser_unavailable() is not None:
        pytest.fail(f"REQUIRE_BROWSER_TEST=1 but {_browser_unavailable()}")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(**page_options)
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)
            yield page, expect
        finally:
            browser.close()


@pytest.mark.browser
@needs_browser
def test_browser_chat_compare_vote_and_markup_shown_literally(app):
    store = open_store(app.data_dir)
    dialogs: list[str] = []
    with browser_page() as (page, expect):
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"http://127.0.0.1:{app.port}/")
        box = page.get_by_placeholder("Type a message…")
        send = page.get_by_role("button", name="Send", exact=True)
        user_bubbles = page.locator("[data-testid='user']")
        bot_bubbles = page.locator("[data-testid='bot']")

        # 1. plain chat with a hostile message; the reply ends with hostile markup
        page.get_by_label("Compare two answers side by side").uncheck()
        message = f"{XSS} {LINK} {HOSTILE_MESSAGES[1]}"
        box.fill(message)
        send.click()
        expect(bot_bubbles).to_have_count(1)
        expect(bot_bubbles.last).to_contain_text("1<2>0")
        expect(user_bubbles.last).to_contain_text(XSS)  # the literal text is visible
        expect(user_bubbles.last).to_contain_text("שלום עולם! مرحبا 👋🏽👨‍👩‍👧")
        expect(bot_bubbles.last).to_contain_text('<img src=x onerror="window.__pwned=4;alert(4)">')
        expect(bot_bubbles.last).to_contain_text("<I am a bot> 2 < 3 && 5 > 4")
        # the reply's Markdown is rendered: bold text and a highlighted code block
        expect(bot_bubbles.last.locator("strong", has_text="bold")).to_have_count(1)
        expect(bot_bubbles.last.locator("pre code")).to_contain_text(CODE_LINE)
        expect(user_bubbles.last).to_contain_text(LINK)  # a user's Markdown is shown as typed

        # 2. compare: both answers in the A/B boxes, literally; vote for B
        page.get_by_label("Compare two answers side by side").check()
        box.fill(HOSTILE_MESSAGES[3])
        send.click()
        vote_b = page.get_by_role("button", name="B is better")
        expect(vote_b).to_be_visible()
        answer_a, answer_b = page.locator("#answer-a"), page.locator("#answer-b")
        for answer in (answer_a, answer_b):  # Markdown rendered, markup shown as typed
            expect(answer).to_contain_text('1<2>0 <I am a bot> 2 < 3 && 5 > 4')
            expect(answer.locator("pre code")).to_contain_text(CODE_LINE)
        shown_b = answer_b.inner_text()
        vote_b.click()
        expect(vote_b).to_be_hidden()
        expect(bot_bubbles).to_have_count(2)
        expect(user_bubbles.last).to_contain_text("</textarea><b>not bold</b> &amp; &lt;")

        # 3. a 100 KB message: a clear message, no crash, the page keeps working
        box.fill(BIG)
        send.click()
        expect(page.get_by_text("too long").first).to_be_visible()
        expect(box).to_have_value(BIG)

        # nothing ran, nothing was injected
        assert page.evaluate("window.__pwned") is None
        assert dialogs == []
        assert page.locator("img[src='x']").count() == 0
        assert page.locator("a[href^='javascript']").count() == 0
        assert page.locator("script:text('__pwned')").count() == 0
        assert page.locator("b:text('not bold')").count() == 0

    # what the browser sent is stored byte for byte; the vote is B on what B showed
    assert _user_messages(store) == [message, HOSTILE_MESSAGES[3]]
    row = store.voted_comparisons()[-1]
    assert row["choice"] == "b" and row["answer_b"].endswith(HOSTILE_REPLY.strip())
    words = row["answer_b"].split()[:2]  # the model's own first words (not the appended markup)
    assert all(w in shown_b for w in words if w.isalnum())  # B showed the answer stored as B

