"""Vote hygiene: a voter who floods the votes is capped, one who votes against everyone else is
excluded from the reward model's data (binomial test against the reward model in use), and a
round trains on exactly what is left."""

from __future__ import annotations

import pytest
import torch

from training.gate import GateConfig
from training.models import LoraSettings, add_lora, load_model_and_tokenizer
from training.reward_training import NotEnoughVotesError, RewardConfig, train_reward_model
from training.voters import (
    VoterConfig,
    cap_votes,
    clean_round_votes,
    clean_votes,
    out_of_voter_judge,
    outlier_voters,
    voter_folds,
)


def _pairs(voter, n, start=0):
    return [{"voter": voter, "tie": False, "conversation_id": f"{voter}-{start + i}", "i": start + i,
             "prompt": [{"role": "user", "content": "say something"}], "chosen": f"c{i}", "rejected": f"r{i}"}
            for i in range(n)]


# ---- caps ------------------------------------------------------------------------------------------
def test_a_flooding_voter_is_capped_to_its_share_next_to_the_others():
    flood, a, b = _pairs("flood", 100), _pairs("a", 10), _pairs("b", 10)
    config = VoterConfig(max_share=0.3, min_cap=5)
    kept = cap_votes(flood[:40] + a + flood[40:] + b, config)
    kept_flood = [p["i"] for p in kept if p["voter"] == "flood"]
    # at most 0.3 of the data next to 20 other pairs: 0.3 / 0.7 · 20 = 8.57 → 8 pairs
    assert len(kept_flood) == 8
    assert [p for p in kept if p["voter"] != "flood"] == a + b  # the others untouched, in order
    assert kept_flood == sorted(kept_flood) and kept_flood[0] < 15 and kept_flood[-1] > 85  # spread over time
    assert len(cap_votes(flood + a + b, VoterConfig(max_share=0.3, min_cap=30))) == 30 + 20  # never below min_cap
    assert cap_votes(flood, config) == flood  # a sole voter outvotes no one
    assert cap_votes(flood + a, VoterConfig(max_share=1.0)) == flood + a  # 1: no cap
    unknown = [{**p, "voter": None} for p in _pairs("x", 50)]
    assert cap_votes(unknown + a, config) == unknown + a  # pairs from a file: no voter to cap


# ---- the outlier test --------------------------------------------------------------------------------
def _judged(voter, n, agreeing):
    return _pairs(voter, n), [i < agreeing for i in range(n)]


def test_a_voter_voting_against_everyone_else_is_excluded():
    groups = [_judged(f"honest{k}", 30, 24) for k in range(4)]  # 80 % agreement with the reference
    groups.append(_judged("contrarian", 30, 6))  # 20 %
    groups.append(_judged("lukewarm", 30, 13))  # 43 %: p ≈ 0.011, not beyond chance after 6 tests
    groups.append(_judged("newcomer", 6, 0))  # too few votes to judge
    pairs = [p for ps, _ in groups for p in ps]
    agrees = [a for _, ag in groups for a in ag]
    excluded = outlier_voters(pairs, agrees, VoterConfig(outlier_alpha=0.01, outlier_min_votes=10))
    assert set(excluded) == {"contrarian"} and excluded["contrarian"] < 0.01 / 6
    assert set(outlier_voters(pairs, agrees, VoterConfig(outlier_alpha=0.05))) == {"contrarian"}  # 0.05 / 6 < p
    assert set(outlier_voters(pairs, agrees, VoterConfig(outlier_alpha=0.2))) == {"contrarian", "lukewarm"}
    assert outlier_voters(pairs, agrees, VoterConfig(outlier_alpha=0.0)) == {}  # 0: no test
    # a reference at chance with everyone else says nothing about anyone
    at_chance = [_judged(f"honest{k}", 30, 15) for k in range(4)] + [_judged("contrarian", 30, 6)]
    assert outlier_voters([p for ps, _ in at_chance for p in ps], [a for _, ag in at_chance for a in ag],
                          VoterConfig()) == {}
    # ties and unjudged pairs carry no evidence
    tied = [{**p, "tie": True} if p["voter"] == "contrarian" else p for p in pairs]
    assert "contrarian" not in outlier_voters(tied, agrees, VoterConfig())
    with pytest.raises(ValueError, match="judgements"):
        outlier_voters(pairs, agrees[:-1], VoterConfig())

    kept, metrics = clean_votes(pairs, VoterConfig(max_share=1.0), lambda ps: agrees)
    assert {p["voter"] for p in kept} == {p["voter"] for p in pairs} - {"contrarian"}
    assert metrics["voters/excluded"] == 1 and metrics["voters/excluded_pairs"] == 30
    assert metrics["voters/count"] == 7
    assert clean_votes(pairs, VoterConfig(max_share=1.0), None)[0] == pairs  # no reference yet: no test


@pytest.mark.parametrize("bad", [dict(max_share=0.0), dict(max_share=1.5), dict(min_cap=0),
                                 dict(outlier_alpha=1.0), dict(outlier_min_votes=0), dict(reference_folds=1)])
def test_config_is_checked(bad):
    with pytest.raises(ValueError):
        VoterConfig(**bad)


# ---- with a real reward model -----------------------------------------------------------------------
def test_the_reward_model_in_use_finds_the_contrarian(tiny_model_dir, tmp_path):
    from tests.test_reward import _toy_pairs

    _, tok = load_model_and_tokenizer(tiny_model_dir)
    settings = RewardConfig(lr=3e-3, epochs=4, batch_size=8, heldout_fraction=0.25, seed=0, min_votes=10,
                            lora=LoraSettings(r=4))
    rm, _ = train_reward_model(str(tiny_model_dir), tok, _toy_pairs(), settings)
    rm.save(tmp_path / "rm")
    honest = [{**p, "voter": f"user{i % 4}"} for i, p in enumerate(_toy_pairs(n_conv=24, per_conv=2)) if not p["tie"]]
    contrarian = [{**p, "voter": "contrarian", "chosen": p["rejected"], "rejected": p["chosen"]}
                  for p in _toy_pairs(n_conv=12, per_conv=1) if not p["tie"]]  # always the other one
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    policy = add_lora(model)
    adapters_before = set(policy.peft_config)
    kept, metrics = clean_round_votes(honest + contrarian, VoterConfig(), policy, tok, tmp_path / "rm", settings)
    assert metrics["voters/excluded"] == 1 and {p["voter"] for p in kept} == {"user0", "user1", "user2", "user3"}
    assert set(policy.peft_config) == adapters_before  # the judge's adapter was deleted again
    # the first round: no reward model yet, so the votes judge each other, out of voter
    kept, metrics = clean_round_votes(honest + contrarian, VoterConfig(), policy, tok, None, settings)
    assert metrics["voters/excluded"] == 1 and "contrarian" not in {p["voter"] for p in kept}
    assert set(policy.peft_config) == adapters_before
    too_few = RewardConfig(min_votes=1000)
    assert clean_round_votes(honest + contrarian, VoterConfig(), policy, tok, None, too_few)[1]["voters/excluded"] == 0


def test_voters_are_dealt_whole_into_balanced_folds():
    pairs = _pairs("big", 9) + _pairs("a", 4) + _pairs("b", 4) + _pairs("c", 3) + _pairs("d", 2)
    pairs += [{**p, "voter": None} for p in _pairs("file", 3)]  # no voter: one group per conversation
    fold_of = voter_folds(pairs, 3)
    by_voter = {}
    for p, f in zip(pairs, fold_of, strict=True):
        by_voter.setdefault(p["voter"] or p["conversation_id"], set()).add(f)
    assert all(len(fs) == 1 for fs in by_voter.values())  # never split
    sizes = sorted(fold_of.count(f) for f in range(3))
    assert sizes == [8, 8, 9]  # 25 pairs: big alone, the rest dealt to the smallest fold
    assert fold_of == voter_folds(pairs, 3)  # deterministic
    assert len({f for p, f in zip(pairs, fold_of, strict=True) if p["voter"] is None}) > 1  # files' pairs spread
    with pytest.raises(ValueError, match="folds"):
        voter_folds(pairs, 1)


def test_the_first_rounds_reference_never_judges_a_vote_with_a_model_that_saw_its_voter(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    policy = add_lora(model)
    settings = RewardConfig(lr=3e-3, epochs=4, batch_size=8, seed=0, min_votes=10, lora=LoraSettings(r=4))
    # each voter has its own rule, and the three rules make a cycle (Paris > Tokyo, Tokyo > cat,
    # cat > Paris): a model trained on the other two voters learns the opposite of a voter's
    # rule, so its votes come out wrong. Had the model seen that voter's votes, or were the
    # judgements mapped back to the wrong pairs, they would come out mostly right
    words = ["Paris", "Tokyo", "cat"]
    pairs = [{"voter": f"v{k}", "tie": False, "conversation_id": f"v{k}-{i}", "prompt": [{"role": "user", "content": "hi"}],
              "chosen": f"{filler} {words[k]}", "rejected": f"{filler} {words[(k + 1) % 3]}"}
             for k in range(3) for i, filler in enumerate(("well", "so", "yes", "now", "then", "ok"))]
    tie = {**pairs[0], "tie": True, "conversation_id": "tied"}
    same = {**pairs[1], "rejected": pairs[1]["chosen"], "conversation_id": "same"}  # cannot be encoded
    adapters_before = set(policy.peft_config)
    judged = out_of_voter_judge(policy, tok, settings, 3)([tie, *pairs, same])
    assert judged[0] is None and judged[-1] is None
    assert all(j is not None for j in judged[1:-1])
    for k in range(3):
        mine = [j for p, j in zip(pairs, judged[1:-1], strict=True) if p["voter"] == f"v{k}"]
        assert sum(mine) / len(mine) < 0.3, (k, mine)
    assert set(policy.peft_config) == adapters_before  # every fold's adapter deleted again
    with pytest.raises(NotEnoughVotesError):  # one voter: no one to judge it by
        out_of_voter_judge(policy, tok, settings, 3)([{**p, "voter": "v0"} for p in pairs])


def test_a_round_trains_on_the_capped_votes(world, tiny_model_dir):
    from tests.test_jobs import _config
    from training.round import run_round

    store, registry, data = world

    def votes(session, n, choice):
        conv = store.new_conversation(session)
        for i in range(n):
            question = f"{session} asks question {i}"
            store.add_message(conv, "user", question)
            cid = store.add_comparison(conv, session, [{"role": "user", "content": question}], f"ok {i}",
                                       f"a much longer answer {i}", 0, 0, {}, {})
            store.vote(cid, choice)
            store.add_message(conv, "assistant", f"ok {i}", policy_version=0)

    votes("flood", 30, "a")  # agrees with the others: only the cap applies
    for s in range(3):
        votes(f"user{s}", 3, "a")
    assert {p["voter"] for p in store.vote_pairs()} == {"flood", "user0", "user1", "user2"}  # the sessions
    config = _config(data, tiny_model_dir, gate=GateConfig(enabled=False), voters=VoterConfig(max_share=0.5, min_cap=5, outlier_alpha=0.0))
    result = run_round(config, store, registry)
    assert result["status"] == "succeeded", result
    m = result["metrics"]
    # 0.5 / 0.5 · 9 others = 9 of the flood's 30 votes stay
    assert m["voters/capped_pairs"] == 21 and result["votes_used"] == 18
    assert m["rm/train_pairs"] + m["rm/heldout_pairs"] == 18
    assert torch.isfinite(torch.tensor(m["rm/loss"]))
