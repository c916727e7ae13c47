"""Reward model: tie-aware Bradley-Terry loss, padding-invariant scoring, split by conversation,
training on a toy preference, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from training.models import LoraSettings, load_tokenizer
from training.preferences import (
    answer_span,
    conversation_folds,
    encode_pairs,
    split_by_conversation,
    split_heldout,
)
from training.reward_model import RewardModel
from training.reward_training import (
    NotEnoughVotesError,
    RewardConfig,
    RewardNormalizer,
    cross_validated_accuracy,
    pairwise_loss,
    score,
    train_reward_model,
)


def test_pairwise_loss_hand_computed():
    # d = 1, preference: −log σ(1) = log(1 + e^−1) = 0.3132617
    # d = 0, preference: log 2 = 0.6931472
    # d = 2, tie: −(½ log σ(2) + ½ log σ(−2)) = ½(0.1269280 + 2.1269280) = 1.1269280
    rc = torch.tensor([1.0, 0.0, 2.0])
    rr = torch.tensor([0.0, 0.0, 0.0])
    tie = torch.tensor([False, False, True])
    expected = (math.log1p(math.exp(-1)) + math.log(2) + 0.5 * (math.log1p(math.exp(-2)) + math.log1p(math.exp(2)))) / 3
    assert pairwise_loss(rc, rr, tie).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx((0.3132617 + 0.6931472 + 1.1269280) / 3, rel=1e-6)


def test_tie_target_is_half():
    d = torch.tensor([0.0], requires_grad=True)
    loss = pairwise_loss(d, torch.zeros(1), torch.tensor([True]))
    loss.backward()
    assert d.grad.abs().item() < 1e-7  # a tie is minimised at equal scores
    for start in (1.5, -1.5):
        d = torch.tensor([start], requires_grad=True)
        pairwise_loss(d, torch.zeros(1), torch.tensor([True])).backward()
        assert d.grad.item() * start > 0  # gradient descent pulls d back towards 0
    # a preference keeps pushing r_chosen up at d = 0
    d = torch.tensor([0.0], requires_grad=True)
    pairwise_loss(d, torch.zeros(1), torch.tensor([False])).backward()
    assert d.grad.item() < 0


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def rm(tiny_model_dir):
    model = RewardModel.from_base(str(tiny_model_dir), LoraSettings(r=4))
    assert model.uses_reference_features
    with torch.no_grad():  # a non-zero adapter and head, so LoRA and head are part of what is checked
        for n, p in model.backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        model.head.weight.normal_(0, 0.2)
        model.feature_weight.copy_(torch.tensor([1.0, 0.5]))
    return model


def _rows(seqs, answer_lens, width, pad, left):
    """(ids, attention mask, answer mask), each (B, width), padded on the left or right."""
    ids, mask, ans = [], [], []
    for seq, n in zip(seqs, answer_lens, strict=True):
        k = width - len(seq)
        row_mask = [1] * len(seq)
        row_ans = [0] * (len(seq) - n) + [1] * n
        if left:
            ids.append([pad] * k + seq), mask.append([0] * k + row_mask), ans.append([0] * k + row_ans)
        else:
            ids.append(seq + [pad] * k), mask.append(row_mask + [0] * k), ans.append(row_ans + [0] * k)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(ans)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_score_padding_invariant(rm, tok, pad_is_eos):
    # The prompt holds end-of-turn tokens (system and user turns, a previous assistant turn).
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello there"},
              {"role": "assistant", "content": "hi"}, {"role": "user", "content": "what is 12 plus 30?"}]
    short = [{"role": "user", "content": "hi"}]
    seq, n_seq = answer_span(tok, prompt, "it is 42.")
    other, n_other = answer_span(tok, short, "tac")
    longer, n_longer = answer_span(tok, short + [{"role": "assistant", "content": "x"}] + prompt[1:], "it is 42 or so.")
    assert seq.count(tok.eos_token_id) >= 4 and seq[-1] == tok.eos_token_id
    pad = tok.eos_token_id if pad_is_eos else tok.pad_token_id
    n, m, k = len(seq), len(other), len(longer)
    assert m < n < k
    with torch.no_grad():
        alone = rm(*_rows([seq], [n_seq], n, pad, left=False))
        other_alone = rm(*_rows([other], [n_other], m, pad, left=False))
        # the short row padded both ways; then the long one padded too (a third, longer row)
        batched = [rm(*_rows([seq, other], [n_seq, n_other], n, pad, left)) for left in (False, True)]
        padded = [rm(*_rows([seq, longer], [n_seq, n_longer], k, pad, left)) for left in (False, True)]
        features_alone = rm.reference_features(*_rows([seq], [n_seq], n, pad, left=False))
        features_left = rm.reference_features(*_rows([seq, longer], [n_seq, n_longer], k, pad, left=True))
    for value in [b[0] for b in batched] + [p[0] for p in padded]:
        assert abs(value.item() - alone.item()) < 1e-4
    for value in [b[1] for b in batched]:
        assert abs(value.item() - other_alone.item()) < 1e-4
    torch.testing.assert_close(features_left[0], features_alone[0], atol=1e-4, rtol=0)
    assert abs(alone.item() - other_alone.item()) > 1e-3  # scores do depend on the text


def test_reference_features_are_the_base_models_answer_log_probs(rm, tok, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    prompt = [{"role": "user", "content": "what is the capital of France?"}]
    seq, n = answer_span(tok, prompt, "Paris, I think.")
    assert tok.decode(seq[-n:], skip_special_tokens=True).strip() == "Paris, I think."
    with torch.no_grad():
        logp = torch.log_softmax(base(torch.tensor([seq])).logits[0, :-1].float(), dim=-1)
        token_logp = logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])][-n:]  # the answer's tokens
        feats = rm.reference_features(*_rows([seq], [n], len(seq), tok.pad_token_id, left=False))[0]
        with_lora = rm.backbone(torch.tensor([seq])).logits  # the adapter is on outside the reference pass
    torch.testing.assert_close(feats, torch.stack([token_logp.mean(), token_logp.min()]), atol=1e-4, rtol=0)
    assert not torch.allclose(with_lora[0, :-1].float().log_softmax(-1), logp, atol=1e-3)  # LoRA is non-zero
    assert all(p.requires_grad == ("lora_" in name) for name, p in rm.backbone.named_parameters())
    with pytest.raises(ValueError, match="answer_mask"):
        rm(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))


def test_reference_features_follow_the_models_own_logit_soft_capping(tok, tmp_path):
    # Gemma 2 soft-caps its logits (cap · tanh(logits / cap)) after the LM head; the reference
    # features must be the log-probs of the model's own forward, cap included.
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                          final_logit_softcapping=0.5, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    reward_model = RewardModel.from_base(str(tmp_path), LoraSettings(r=4))
    seq, n = answer_span(tok, [{"role": "user", "content": "what is 12 plus 30?"}], "it is 42.")
    with torch.no_grad():
        logits = base(torch.tensor([seq])).logits[0, :-1].float()
        assert logits.abs().max() <= 0.5 + 1e-5  # the cap is on
        logp = torch.log_softmax(logits, dim=-1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])][-n:]
        feats = reward_model.reference_features(*_rows([seq], [n], len(seq), tok.pad_token_id, left=False))[0]
    torch.testing.assert_close(feats, torch.stack([logp.mean(), logp.min()]), atol=1e-4, rtol=0)


def test_answer_span_marks_the_answer(tok):
    prompt = [{"role": "user", "content": "hi " * 30}]
    ids, n = answer_span(tok, prompt, "hello there")
    assert tok.decode(ids[-n:], skip_special_tokens=True).strip() == "hello there" and ids[-1] == tok.eos_token_id
    cut, n_cut = answer_span(tok, prompt, "hello there", max_length=n + 3)
    assert cut == ids[-(n + 3):] and n_cut == n
    tiny, n_tiny = answer_span(tok, prompt, "hello there", max_length=n)  # one token before the answer kept
    assert len(tiny) == n and n_tiny == n - 1


def test_score_function_matches_forward(rm, tok):
    prompts = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "the capital of France?"}]]
    answers = ["hi!", "Paris, the capital of France."]
    batched = score(rm, tok, prompts, answers, batch_size=2)
    singles = torch.cat([score(rm, tok, [p], [a]) for p, a in zip(prompts, answers, strict=True)])
    assert batched.shape == (2,)
    torch.testing.assert_close(batched, singles, atol=1e-4, rtol=0)


def test_answer_span_ends_with_end_of_turn(tok):
    ids = answer_span(tok, [{"role": "user", "content": "hi"}], "hello")[0]
    assert ids[-1] == tok.eos_token_id
    assert ids[-3:-1] != [] and tok.decode(ids[:-1]).endswith("hello")
    cut = answer_span(tok, [{"role": "user", "content": "hi " * 50}], "hello", max_length=8)[0]
    assert len(cut) == 8 and cut[-1] == tok.eos_token_id


def _pair(conv, chosen, rejected, tie=False):
    return {"conversation_id": conv, "prompt": [{"role": "user", "content": "say something"}],
            "chosen": chosen, "rejected": rejected, "tie": tie}


def test_identical_texts_and_both_bad_dropped(tok):
    pairs = [_pair("a", "same", "same"), _pair("a", "x", "y"), _pair("b", "p ", "p"),
             {**_pair("c", "u", "v"), "both_bad": True}]
    enc = encode_pairs(tok, pairs)
    assert len(enc) == 1 and enc[0]["conversation_id"] == "a"


def test_split_by_conversation_never_by_row():
    pairs = [_pair(f"c{i % 10}", f"x{i}", f"y{i}") for i in range(60)]
    train, held = split_by_conversation(pairs, 0.3, seed=1)
    train_ids = {p["conversation_id"] for p in train}
    held_ids = {p["conversation_id"] for p in held}
    assert held and train and not train_ids & held_ids
    assert len(train) + len(held) == 60
    again_train, again_held = split_by_conversation(list(reversed(pairs)), 0.3, seed=1)
    assert {p["conversation_id"] for p in again_held} == held_ids  # deterministic, order-free
    # a conversation keeps its side when more conversations arrive
    more = pairs + [_pair(f"new{i}", "a", "b") for i in range(20)]
    train_more, held_more = split_by_conversation(more, 0.3, seed=1)
    side = {p["conversation_id"]: "held" for p in held_more} | {p["conversation_id"]: "train" for p in train_more}
    # membership never changes as data grows, in either direction (no side is ever filled up)
    for n in (1, 2, 3, 12, 60):
        small_train, small_held = split_by_conversation(pairs[:n], 0.3, seed=1)
        assert all(side[p["conversation_id"]] == "train" for p in small_train)
        assert all(side[p["conversation_id"]] == "held" for p in small_held)
    t2, h2 = split_by_conversation([_pair("a", "x", "y"), _pair("b", "x", "y")], 0.01, seed=0)
    assert len(t2) == 2 and h2 == []  # neither hashes below 0.01: none is forced out
    # the held-out pairs split again, stably, into the half that selects and the half that judges
    select, judge = split_heldout(held_more, 0.3, seed=1)
    assert select and judge and len(select) + len(judge) == len(held_more)
    assert not {p["conversation_id"] for p in select} & {p["conversation_id"] for p in judge}
    assert split_heldout(held, 0.3, seed=1)[1] == [p for p in judge if p in held]


def test_too_few_votes_raises(tiny_model_dir, tok):
    pairs = [_pair("a", "x", "y"), _pair("b", "same", "same")]
    with pytest.raises(NotEnoughVotesError, match="min_votes"):
        train_reward_model(str(tiny_model_dir), tok, pairs, RewardConfig(min_votes=2))


def test_config_validation():
    with pytest.raises(ValueError, match="heldout_fraction"):
        RewardConfig(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="lr"):
        RewardConfig(lr=0)
    with pytest.raises(ValueError, match="max_length"):
        RewardConfig(max_length=1)
    with pytest.raises(ValueError, match="feature_lr"):
        RewardConfig(feature_lr=0)


def test_normalizer():
    norm = RewardNormalizer.fit(torch.tensor([1.0, 2.0, 3.0]), clip=0.5)
    assert norm.mean == pytest.approx(2.0) and norm.std == pytest.approx(1.0)
    torch.testing.assert_close(norm(torch.tensor([2.0, 2.5, 10.0, -10.0])),
                               torch.tensor([0.0, 0.5, 0.5, -0.5]))
    assert RewardNormalizer.fit(torch.tensor([3.0, 3.0])).std > 0  # constant scores: no division by 0


WORDS = ["hello", "Paris", "Tokyo", "cat", "sorry", "today", "nice", "name"]


def _toy_pairs(n_conv=24, per_conv=2):
    """Chosen always contains 'Paris'; rejected never does."""
    pairs = []
    for c in range(n_conv):
        for j in range(per_conv):
            a, b = WORDS[(c + j) % len(WORDS)], WORDS[(c * 3 + j + 1) % len(WORDS)]
            a = a if a != "Paris" else "cat"
            b = b if b != "Paris" else "sorry"
            pairs.append(_pair(f"conv{c}", f"{a} Paris {b}", f"{b} {a} today", tie=False))
    pairs.append(_pair("conv0", "nice", "name", tie=True))
    return pairs


def test_train_reward_model_learns_toy_preference(tiny_model_dir, tok, tmp_path):
    pairs = _toy_pairs()
    cfg = RewardConfig(lr=3e-3, epochs=4, batch_size=8, heldout_fraction=0.25, seed=0,
                       min_votes=10, lora=LoraSettings(r=4))
    rm, metrics = train_reward_model(str(tiny_model_dir), tok, pairs, cfg)
    assert metrics["rm/heldout_pairs"] > 0 and metrics["rm/train_pairs"] > 0
    assert metrics["rm/train_pairs"] + metrics["rm/heldout_pairs"] == len(pairs)
    assert metrics["rm/ties"] == 1
    assert metrics["rm/accuracy"] > 0.5, metrics
    # an untrained model scores ~log 2 = 0.69 on held-out pairs; trained, far below
    assert metrics["rm/heldout_loss"] < 0.3, metrics
    # base weights frozen and unchanged; LoRA moved
    fresh = RewardModel.from_base(str(tiny_model_dir), LoraSettings(r=4))
    base_now = {n: p for n, p in rm.backbone.named_parameters() if "lora_" not in n}
    base_ref = dict(fresh.backbone.named_parameters())
    assert all(torch.equal(p, base_ref[n]) for n, p in base_now.items())
    assert any(p.abs().sum() > 0 for n, p in rm.backbone.named_parameters() if "lora_B" in n)
    # save → load gives the same scores; warm start continues from it
    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(str(tiny_model_dir), tmp_path / "rm")
    prompts = [p["prompt"] for p in pairs[:4]]
    answers = [p["chosen"] for p in pairs[:4]]
    torch.testing.assert_close(score(rm, tok, prompts, answers), score(loaded, tok, prompts, answers))
    rm2, m2 = train_reward_model(str(tiny_model_dir), tok, pairs, RewardConfig(
        lr=3e-3, epochs=1, heldout_fraction=0.25, min_votes=10, lora=LoraSettings(r=4)),
        init_dir=tmp_path / "rm")
    assert m2["rm/heldout_pairs"] == metrics["rm/heldout_pairs"]  # the same split
    assert m2["rm/accuracy"] > 0.5


def test_cross_validated_accuracy_judges_every_vote_outside_the_select_half_on_unseen_votes(tiny_model_dir, tok):
    cfg = RewardConfig(lr=3e-3, epochs=4, batch_size=8, heldout_fraction=0.25, seed=0, min_votes=10,
                       lora=LoraSettings(r=4), cv_folds=3)
    # each fold has its own rule, and the three rules make a cycle: Paris > Tokyo in fold 0,
    # Tokyo > cat in fold 1, cat > Paris in fold 2. A model trained on the other two folds learns
    # the opposite of a fold's rule (e.g. Tokyo > cat > Paris), so votes it never saw come out
    # wrong; had it seen them (a leak across folds), or were the scores read the wrong way round,
    # they would come out mostly right
    convs = [f"c{i}" for i in range(48)]
    folds = conversation_folds([{"conversation_id": c} for c in convs], 3, cfg.seed)
    words = ["Paris", "Tokyo", "cat"]
    pairs = [_pair(c, f"{filler} {words[f]}", f"{filler} {words[(f + 1) % 3]}")
             for c, f in zip(convs, folds, strict=True) for filler in ("well", "so")]
    cv = cross_validated_accuracy(str(tiny_model_dir), tok, pairs, cfg)
    assert cv["rm/cv_accuracy"] < 0.3, cv
    # every non-tie pair outside the select half is judged: several times the judge half
    train, held = split_by_conversation(encode_pairs(tok, pairs), 0.25, 0)
    select, judge = split_heldout(held, 0.25, 0)
    assert cv["rm/cv_decisive"] == len(train) + len(judge) > 3 * len(judge)
    assert cv["rm/cv_folds"] == 3 and set(folds) == {0, 1, 2}
    with pytest.raises(ValueError, match="cv_folds"):
        RewardConfig(cv_folds=1)


def test_cli_trains_and_saves_from_exported_pairs(tiny_model_dir, tmp_path, capsys):
    import json

    from training.ppo import main as ppo_main
    from training.preferences import load_pairs_jsonl
    from training.reward_training import main

    path = tmp_path / "votes.jsonl"
    rows = [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in _toy_pairs(8, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_pairs_jsonl(path)
    assert len(loaded) == len(rows) and loaded[0]["chosen"] == rows[0]["chosen"][0]["content"]
    assert main(["--model", str(tiny_model_dir), "--pairs", str(path), "--out", str(tmp_path / "rm"),
                 "--epochs", "1", "--min-votes", "4", "--lora.r", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["rm/train_pairs"] + metrics["rm/heldout_pairs"] == len(rows)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["prompt"]}) + "\n" for r in rows[:4]))
    assert ppo_main(["--model", str(tiny_model_dir), "--rm", str(tmp_path / "rm"), "--prompts", str(prompts),
                     "--out", str(tmp_path / "adapter"), "--steps", "1", "--rollout-batch-size", "4",
                     "--mini-batch-size", "4", "--max-new-tokens", "4", "--normalize-samples", "4"]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_pairs_jsonl(bad)


def test_feature_weights_follow_the_votes_and_stay_non_negative(tiny_model_dir, tok, tmp_path):
    # Votes that prefer the answer the reference finds more likely raise the feature weights;
    # votes that prefer the less likely one drive them towards 0, never below.
    probe = RewardModel.from_base(str(tiny_model_dir), LoraSettings(r=4))
    words = ["cat", "dog", "Paris", "blue", "seven", "hello", "today", "sorry", "name", "nice"]
    pairs = []
    for i in range(40):
        prompt = [{"role": "user", "content": f"say something about {words[i % 10]}"}]
        x, y = f"{words[i % 10]} {words[(i * 3 + 1) % 10]}", f"{words[(i * 7 + 2) % 10]} {words[(i + 5) % 10]} {words[i % 10]}"
        sx, sy = score(probe, tok, [prompt, prompt], [x, y])  # zero head: the features alone
        chosen, rejected = (x, y) if sx > sy else (y, x)
        pairs.append({"conversation_id": f"c{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected, "tie": False})
    start = probe.feature_weights()
    assert all(w == pytest.approx(0.1, rel=1e-4) for w in start.values())
    cfg = RewardConfig(lr=1e-9, feature_lr=0.05, epochs=3, batch_size=8, heldout_fraction=0.25, min_votes=10,
                       lora=LoraSettings(r=4))
    agree, m_agree = train_reward_model(str(tiny_model_dir), tok, pairs, cfg)
    flipped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    against, m_against = train_reward_model(str(tiny_model_dir), tok, flipped, cfg)
    assert m_agree["rm/accuracy"] == 1.0 and m_against["rm/accuracy"] < 0.5
    assert sum(agree.feature_weights().values()) > sum(start.values())
    assert all(0.0 <= w < 0.1 for w in against.feature_weights().values())
    assert m_against["rm/w_ref_mean_logp"] == pytest.approx(against.feature_weights()["ref_mean_logp"])
    # saved and loaded with the model; an old model without features loads without them
    off = RewardModel.from_base(str(tiny_model_dir), LoraSettings(r=4), reference_features=False)
    assert not off.uses_reference_features and off.head.weight.abs().sum() > 0
    off.save(tmp_path / "off")
    assert not RewardModel.load(str(tiny_model_dir), tmp_path / "off").uses_reference_features
    agree.save(tmp_path / "on")
    assert RewardModel.load(str(tiny_model_dir), tmp_path / "on").feature_weights() == pytest.approx(agree.feature_weights())
