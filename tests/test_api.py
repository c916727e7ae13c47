"""The HTTP API as a script sees it (``gradio_client``, a tiny model served by the real app):

* the README's example runs as written and leaves the vote it cast in the database;
* ``/send`` names the stored comparison and its versions and gives the raw texts;
* ``/rollback`` works from a fresh client that never loaded the Training tab;
* user errors reach the caller as errors with their message;
* every input and output of every endpoint has a name.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app import AppConfig
from storage.store import open_store
from tests.conftest import free_port, served_app

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    config = AppConfig(model=str(tiny_model_dir), data_dir=str(tmp_path_factory.mktemp("api") / "data"),
                       port=free_port(), max_new_tokens=4, temperature=1.0, no_train=True)
    with served_app(config):
        yield config


def _client(app):
    from gradio_client import Client

    return Client(f"http://127.0.0.1:{app.port}/", verbose=False)


def readme_example() -> str:
    """The Python block of the README's "Driving it from a script" section."""
    section = README.read_text().split("## Driving it from a script", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    return code


def test_the_readme_example_runs_and_its_vote_is_stored(app, capsys):
    code = readme_example().replace("http://127.0.0.1:7860/", f"http://127.0.0.1:{app.port}/")
    assert f":{app.port}/" in code  # the example talks to the served app
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the project's own README
    printed = capsys.readouterr().out
    assert "- from version 0" in printed and "Live policy version" in printed
    store = open_store(app.data_dir)
    [row] = [r for r in store.voted_comparisons() if r["context"][-1]["content"] == "And 4 plus 4?"]
    assert row["choice"] == "a"
    assert row["context"][0] == {"role": "system", "content": "Be brief."}  # the example's system prompt
    assert f"A: {row['answer_a']} | B: {row['answer_b']} | versions [0, 0]" in printed  # raw texts


def test_send_names_the_comparison_and_vote_errors_are_errors(app):
    from gradio_client.exceptions import AppError

    client = _client(app)
    with pytest.raises(AppError, match="Type a message first"):
        client.predict("   ", True, api_name="/send")
    with pytest.raises(AppError, match="There is no comparison to vote on"):
        client.predict(api_name="/vote_b")  # no comparison awaits a vote
    *_, turn = client.predict("hello <b>there</b> & 2 < 3", True, api_name="/send")
    row = open_store(app.data_dir).comparison(turn["comparison_id"])
    assert row["choice"] is None and row["context"][-1]["content"] == "hello <b>there</b> & 2 < 3"
    assert (row["answer_a"], row["answer_b"]) == (turn["answer_a"], turn["answer_b"])
    assert [row["version_a"], row["version_b"]] == turn["versions"] == [0, 0]
    with pytest.raises(AppError, match="Vote on the two answers first"):
        client.predict("again", True, api_name="/send")
    client.predict(api_name="/vote_tie")
    assert open_store(app.data_dir).comparison(turn["comparison_id"])["choice"] == "tie"


def test_rollback_works_from_a_fresh_client(app):
    from gradio_client.exceptions import AppError

    status = _client(app).predict("0", api_name="/rollback")  # never called /training_status
    assert "Live policy version:** 0" in status
    with pytest.raises(AppError, match="99"):
        _client(app).predict("99", api_name="/rollback")
    with pytest.raises(AppError, match="Pick a version"):
        _client(app).predict("", api_name="/rollback")


def test_every_endpoint_input_and_output_has_a_name(app):
    api = _client(app).view_api(return_format="dict", print_info=False)
    endpoints = api["named_endpoints"]
    assert {"/send", "/vote_a", "/new_conversation", "/training_status", "/rollback", "/export_votes"} <= set(endpoints)
    for name, info in endpoints.items():
        for item in info["parameters"] + info["returns"]:
            assert (item.get("label") or "").strip(), (name, item)
    assert [r["label"] for r in endpoints["/send"]["returns"]][-1] == "turn"


def test_regenerate_answers_the_last_message_again(app):
    from gradio_client.exceptions import AppError

    client = _client(app)
    *_, first = client.predict("tell me something", False, api_name="/send")
    chat, turn = client.predict(api_name="/regenerate")
    store = open_store(app.data_dir)
    replies = store.db.execute("select id, content, replaced_at from messages where role = 'assistant' "
                               "order by id desc limit 2").fetchall()
    (new_id, new_text, new_replaced), (_, old_text, old_replaced) = replies
    assert new_text == turn["reply"] and new_replaced is None
    assert old_text == first["reply"] and old_replaced is not None
    assert [m["role"] for m in chat][-2:] == ["user", "assistant"]
    client.predict("compare now", True, api_name="/send")
    with pytest.raises(AppError, match="Vote on the two answers first"):
        client.predict(api_name="/regenerate")
