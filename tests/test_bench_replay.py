"""bench.ppo_replay: a round replayed offline on a data dir and scored by an annotator (tiny model,
real SQLite)."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from bench.gold import standard_error
from bench.ppo_replay import ReplayConfig, gold_reward_fn, main
from storage.paths import DataDir
from storage.store import open_store
from tests.conftest import add_votes
from training.models import add_lora, load_model_and_tokenizer
from training.ppo import PPOConfig
from training.round import RoundConfig

pytestmark = pytest.mark.usefixtures("single_thread")

MARK = "MARKED ANSWER"


def prefers_marked(messages, answer_a, answer_b):
    """The answer that is exactly MARK wins; otherwise a tie."""
    a, b = answer_a == MARK, answer_b == MARK
    return "tie" if a == b else ("a" if a else "b")


def prefers_short(messages, answer_a, answer_b):
    return "tie" if len(answer_a) == len(answer_b) else ("a" if len(answer_a) < len(answer_b) else "b")


TINY_ROUND = ("--round.reward.epochs 1 --round.reward.batch-size 4 --round.ppo.steps 1 --round.ppo.rollout-batch-size 4 "
              "--round.ppo.mini-batch-size 4 --round.ppo.ppo-epochs 1 --round.ppo.max-new-tokens 6 "
              "--round.ppo.normalize-samples 4").split()


@pytest.fixture
def run_dir(world, tmp_path):
    """A data dir as the online benchmark leaves it (version 0 published, 12 votes stored) and a
    prompts file."""
    store, _registry, data = world
    add_votes(store, 12)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"}]}) + "\n"
                               for w in "one two three four five six seven eight".split()))
    return data, prompts


def test_gold_reward_scores_each_answer_against_reference_answers(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    policy = add_lora(model, adapter_name="policy")
    prompts = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "how are you"}]]
    reward_fn = gold_reward_fn(prefers_marked, policy, tok, prompts + prompts[:1], refs=3, max_new_tokens=5, seed=0)
    scores = reward_fn(prompts, [MARK, "something else"])
    # the marked answer beats every reference answer; any other answer ties with them
    assert scores.tolist() == [1.0, 0.5]
    assert policy.active_adapter == "policy" and not policy.training
    with pytest.raises(KeyError):
        reward_fn([[{"role": "user", "content": "never seen"}]], [MARK])


@pytest.mark.parametrize(("reward", "rounds"), [("rm", 1), ("gold", 2)])
def test_replay_trains_and_scores_without_touching_the_data_dir(run_dir, tiny_model_dir, tmp_path, capsys, reward, rounds):
    data, prompts = run_dir
    before = sorted(p.name for p in DataDir(data).adapters.iterdir())
    out = tmp_path / "replay.json"
    code = main(["--data-dir", str(data), "--model", str(tiny_model_dir), "--reward", reward,
                 "--annotator", "tests.test_bench_replay:prefers_short", "--prompts", str(prompts),
                 "--eval-prompts", "4", "--eval-max-new-tokens", "6", "--threads", "1",
                 "--rounds", str(rounds), "--json", str(out), *TINY_ROUND])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["reward"] == reward and result["eval_n"] == 4 and result["pairs"] == 12
    assert 0.0 <= result["gold_win_rate"] <= 1.0 and result["metrics"]["ppo/samples"] == 4
    assert 0.0 <= result["gold_win_rate_se"] <= 0.5 / (4 - 1) ** 0.5  # outcomes in [0, 1]: sd ≤ ½·√(n/(n−1))
    if rounds > 1:  # figures after each round; the last round's are the result's
        assert len(result["rounds"]) == rounds and result["rounds"][-1]["gold_win_rate"] == result["gold_win_rate"]
        # the second round starts with β where the first left it (the KL stays under target: β shrinks)
        assert result["rounds"][1]["objective/kl_coef"] < result["rounds"][0]["objective/kl_coef"] < PPOConfig().init_kl_coef
    else:
        assert result["rounds"] is None
    if reward == "rm":
        assert 0.0 <= result["gold_win_rate_bon4"] <= 1.0 and "rm/accuracy" in result["metrics"]
        assert result["gold_win_rate_bon4_se"] >= 0.0
    else:  # NaN: no reward model
        assert result["gold_win_rate_bon4"] != result["gold_win_rate_bon4"]
        assert result["gold_win_rate_bon4_se"] != result["gold_win_rate_bon4_se"]
    # nothing published, no reward model saved
    assert sorted(p.name for p in DataDir(data).adapters.iterdir()) == before
    assert not DataDir(data).reward_models.exists()
    assert open_store(data).live_version() == 0


def test_replay_rejects_bad_input_with_a_message(run_dir, tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--data-dir", str(empty), "--model", str(tiny_model_dir), "--threads", "1"]) == 2
    assert "no database" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # the replay sets the seed itself
        main(["--data-dir", str(run_dir[0]), "--round.seed", "3"])
    assert exc.value.code == 2 and "--round.seed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--data-dir is required"):
        ReplayConfig()


def test_standard_error_of_a_win_rate():
    outcomes = [1.0, 0.5, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0]
    assert standard_error(outcomes) == pytest.approx(statistics.stdev(outcomes) / math.sqrt(len(outcomes)))
    assert standard_error([1.0] * 5) == 0.0  # all wins: no spread
    assert standard_error(outcomes * 4) < standard_error(outcomes)  # more prompts, smaller error
    assert math.isnan(standard_error([1.0])) and math.isnan(standard_error([]))


def test_replay_starts_from_a_fresh_adapter_unless_asked():
    # a round's own default continues the live adapter; a replay of one round starts from the SFT policy
    assert RoundConfig().init_policy == "live"
    assert ReplayConfig(data_dir="run").round.init_policy == "reference"
    assert ReplayConfig(data_dir="run", init_policy="live").round.init_policy == "live"
