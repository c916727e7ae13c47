"""The reward model's ensemble and the pairs it picks (training.ensemble, ChatService.compare),
and PPO's value head carried over with the adapter; tiny real models, real SQLite."""

from __future__ import annotations

import random

import pytest
import torch

from chatapp.engine import ChatEngine, Sampling
from chatapp.service import ChatService, ChatSession, PairConfig
from storage.registry import RewardModelRegistry
from tests.conftest import add_votes
from tests.test_chat import _drain
from tests.test_jobs import _config
from training.ensemble import EnsembleConfig, conservative_scores, fit_heads, select_pair
from training.gate import GateConfig
from training.models import load_model_and_tokenizer
from training.ppo import ValueHead
from training.reward_model import RewardModel
from training.reward_training import RewardConfig, fit_ensemble, score
from training.round import run_round, starting_value_head


def _variance_by_hand(scores: torch.Tensor, i: int, j: int) -> float:
    probs = [1.0 / (1.0 + float(torch.exp(-(s[i] - s[j])))) for s in scores]
    mean = sum(probs) / len(probs)
    return sum((p - mean) ** 2 for p in probs) / len(probs)


def test_the_pair_chosen_is_the_one_the_toy_ensemble_is_least_sure_about():
    # two members agree on answers 0, 1 and 3; they disagree about answer 2
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, -5.0, 3.0]])
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    by_hand = max(pairs, key=lambda p: _variance_by_hand(scores, *p))
    assert by_hand == (0, 2)
    assert select_pair(scores, "variance", random.Random(0)) == by_hand
    allowed = [p for p in pairs if p != (0, 2)]  # e.g. answers 0 and 2 are the same text
    assert select_pair(scores, "variance", random.Random(0), allowed) == max(
        allowed, key=lambda p: _variance_by_hand(scores, *p))
    # members that agree completely: double Thompson sampling shows the best two answers
    same = torch.tensor([[0.0, 4.0, 1.0, 3.0]] * 3)
    assert all(select_pair(same, "dts", random.Random(s)) == (1, 3) for s in range(10))
    drawn = {select_pair(scores, "random", random.Random(s)) for s in range(60)}
    assert drawn == set(pairs)
    with pytest.raises(ValueError, match="pair rule"):
        select_pair(scores, "best", random.Random(0))


def test_conservative_scores_subtract_the_spread():
    members = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # answer 0: mean 2, std 1; answer 1: sure 0
    assert conservative_scores(members, 0.5).tolist() == pytest.approx([1.5, 0.0])
    assert conservative_scores(members, 3.0).argmax() == 1  # a large λ prefers the sure answer


def test_ensemble_heads_agree_more_with_more_votes():
    """Anchored bootstrap members pull together on a direction the votes cover (coordinate 1:
    it varies in every vote and the votes show it does not matter), the more so the more votes
    there are, and stay apart on one no vote covers (coordinate 5: it never varies)."""
    gen = torch.Generator().manual_seed(0)
    H = 6
    truth = torch.tensor([2.0, 0, 0, 0, 0, 0])

    def votes(n):
        hc, hr = torch.randn(n, H, generator=gen), torch.randn(n, H, generator=gen)
        hc[:, 5] = hr[:, 5] = 0.0  # coordinate 5 never varies in the votes
        # Bradley-Terry voters: the first answer is preferred with probability σ((hc − hr)·truth)
        flip = torch.rand(n, generator=gen) > torch.sigmoid((hc - hr) @ truth)
        hc[flip], hr[flip] = hr[flip].clone(), hc[flip].clone()
        return hc, hr

    config = EnsembleConfig(members=16, steps=300, lr=0.05, prior_scale=1.0, seed=1)
    spread = {}
    for n in (8, 400):
        hc, hr = votes(n)
        w = fit_heads(hc, hr, torch.zeros(n), torch.zeros(n, dtype=torch.bool), torch.zeros(H), config)
        assert w.shape == (16, H)
        if n == 400:
            assert float(torch.nn.functional.cosine_similarity(w.mean(0), truth, dim=0)) > 0.9  # the mean member found it
        spread[n] = (float(w[:, 1].std()), float(w[:, 5].std()))
    assert spread[400][0] < spread[8][0] / 2  # more votes: members agree more on what the votes decide
    assert spread[400][1] > 3 * spread[400][0]  # ... and still disagree where no vote looked


@pytest.fixture
def rm_world(world, tiny_model_dir):
    """The world with 12 votes and a published reward model that has an ensemble."""
    store, registry, data = world
    add_votes(store, 12)
    result = run_round(_config(data, tiny_model_dir, gate=GateConfig(enabled=False)), store, registry)
    assert result["status"] == "succeeded"
    latest = RewardModelRegistry(registry.data_dir).latest()
    assert latest is not None
    return store, registry, data, latest


def test_the_ensemble_is_saved_and_loaded_with_the_reward_model(rm_world, tiny_model_dir):
    _, _, _, latest = rm_world
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    rm = RewardModel.load(model, latest)
    assert rm.members == 8  # the default
    prompts = [[{"role": "user", "content": "question number 1"}]] * 3
    answers = ["ok 1", "a much longer answer", "no"]
    members = score(rm, tok, prompts, answers, members=True)  # (K, n)
    assert members.shape == (8, 3) and float(members.std(dim=0).min()) > 0
    again = RewardModel.load(load_model_and_tokenizer(tiny_model_dir)[0], latest)
    assert torch.equal(score(again, tok, prompts, answers, members=True), members)
    fit_ensemble(rm, tok, [], EnsembleConfig(members=0))
    assert rm.members == 0 and RewardConfig().ensemble.members == 8


def test_comparisons_show_the_pair_the_ensemble_is_least_sure_about(rm_world, tiny_model_dir, monkeypatch):
    store, registry, _, _ = rm_world
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    engine = ChatEngine(model, tok, registry)
    service = ChatService(engine, store, Sampling(max_new_tokens=6), seed=0,
                          compare_sampling=Sampling(temperature=1.0, top_p=1.0, max_new_tokens=6),
                          pairs=PairConfig(compare_samples=4, pair_rule="variance", pair_random_share=0.0))
    sampled = []
    real = engine.sample_many

    def recorded(*args, **kwargs):  # the real engine, its answers kept for the check below
        replies = real(*args, **kwargs)
        sampled.append(replies)
        return replies

    monkeypatch.setattr(engine, "sample_many", recorded)
    checked = 0
    for i in range(6):
        session = ChatSession()
        _drain(service.compare(session, f"question number {i}"))
        row = store.comparison(session.pending.comparison_id)
        texts = [r.text for r in sampled[-1]]
        assert len(texts) == 4 and row["selection"] == "variance"
        allowed = [(a, b) for a in range(4) for b in range(a + 1, 4) if texts[a] != texts[b]]
        if len(allowed) < 2:
            continue
        scores = engine.member_scores(session.context(), texts)
        best = max(allowed, key=lambda p: _variance_by_hand(scores, *p))
        assert {row["answer_a"], row["answer_b"]} == {texts[best[0]], texts[best[1]]}
        checked += 1
        service.vote(session, "a")
    assert checked >= 3
    assert store.selection_counts()["variance"] == checked
    # the reward model scores on the serving base: the live adapter still serves chat
    assert _drain(service.chat(ChatSession(), "hello")).version == store.live_version()


def test_the_value_head_is_saved_with_the_adapter_and_continues_from_it(rm_world, tiny_model_dir):
    store, registry, data, _ = rm_world
    live = store.live_version()
    saved = ValueHead.load(registry.path(live), hidden_size=_hidden(tiny_model_dir))
    assert saved is not None and float(saved.summary.weight.abs().sum()) > 0  # PPO trained it
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    config = _config(data, tiny_model_dir)
    start = starting_value_head(config, registry, live, model)
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), saved.state_dict().values(), strict=True))
    fresh = starting_value_head(_config(data, tiny_model_dir, carry_value_head=False), registry, live, model)
    assert float(fresh.summary.weight.abs().sum()) == 0.0
    assert ValueHead.load(registry.path(live), hidden_size=_hidden(tiny_model_dir) + 1) is None  # another model


def _hidden(model_dir) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).hidden_size)

