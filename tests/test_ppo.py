"""PPO on a tiny real model: pure-sampling rollouts, batched == single, reference isolation,
KL = 0 at a fresh adapter, and a short ppo_train run that moves a toy reward."""

from __future__ import annotations

import math

import pytest
import torch

from training.chat_format import end_of_turn_ids
from training.models import LoraSettings, add_lora, load_model_and_tokenizer
from training.ppo import PPOConfig, ValueHead, ppo_train
from training.ppo_math import per_token_kl
from training.rollout import (
    forward_response,
    generate_rollouts,
    position_ids_from_mask,
    reference_model,
)

PROMPTS = [[{"role": "user", "content": t}] for t in (
    "hello there", "what is 12 plus 30?", "the capital of France?", "spell cat backwards",
    "my name is Ada", "how are you today?", "I don't know", "the capital of Japan?")]


pytestmark = pytest.mark.usefixtures("single_thread")


def make_policy(model_dir, sharpen: float = 1.0, seed: int = 0):
    """The tiny base + a fresh LoRA adapter. ``sharpen`` scales the (tied) embeddings: a random
    tiny model's logits span well under 1 nat, too flat for a short RL run to move."""
    model, tok = load_model_and_tokenizer(model_dir)
    if sharpen != 1.0:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(sharpen)
    torch.manual_seed(seed)
    return add_lora(model, LoraSettings(r=8)), tok


def test_rollouts_are_pure_sampling(tiny_model_dir):
    policy, tok = make_policy(tiny_model_dir, sharpen=10.0)
    gc = policy.generation_config  # everything that could bend the distribution, set adversarially
    gc.do_sample, gc.top_k, gc.top_p, gc.temperature = False, 1, 0.05, 0.05
    gc.repetition_penalty, gc.min_new_tokens, gc.no_repeat_ngram_size = 5.0, 5, 1
    prompt = PROMPTS[0]
    from training.chat_format import render_prompt

    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([render_prompt(tok, prompt)])).logits[0, -1]
    probs = torch.softmax(logits.float(), dim=-1)  # what pure temperature-1 sampling draws from
    top = torch.topk(probs, 3).indices.tolist()
    n = 600
    ro = generate_rollouts(policy, tok, [prompt] * n, max_new_tokens=1, eos_ids=[top[0]], seed=0)
    first = ro.response_ids[:, 0]
    assert len(set(first.tolist())) > 3  # neither greedy nor top-k = 1
    for t in top:
        p = probs[t].item()
        freq = (first == t).float().mean().item()
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n), (t, freq, p)
    # the most likely token was the end-of-turn: it may come first (no min_new_tokens)
    assert ro.ended.float().mean().item() == pytest.approx(probs[top[0]].item(), abs=0.1)


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model_dir):
    policy, tok = make_policy(tiny_model_dir, sharpen=5.0)
    with torch.no_grad():  # a non-zero adapter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    eos = end_of_turn_ids(policy, tok)
    prompts = [PROMPTS[0], PROMPTS[1], [{"role": "system", "content": "be brief"}] + PROMPTS[6]]
    seeds = [11, 12, 13]
    batch = generate_rollouts(policy, tok, prompts, 12, eos, seed=seeds)
    assert batch.query_mask[:, 0].tolist().count(0) >= 1  # left-padded: shorter prompts start with pads
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        alone = generate_rollouts(policy, tok, [prompt], 12, eos, seed=[seed])
        n = int(alone.response_mask.sum())
        assert batch.response_ids[i, :n].tolist() == alone.response_ids[0, :n].tolist()
        assert int(batch.response_mask[i].sum()) == n
        assert batch.answers[i] == alone.answers[0]


def test_response_mask_stops_at_first_end_of_turn(tiny_model_dir):
    policy, tok = make_policy(tiny_model_dir)
    eos = list(range(0, 320, 7))  # many "end-of-turn" ids, so some rows end early
    ro = generate_rollouts(policy, tok, PROMPTS, 10, eos, seed=3)
    assert ro.ended.any() and ro.response_ids.shape[1] <= 10
    for ids, mask, ended in zip(ro.response_ids.tolist(), ro.response_mask.tolist(), ro.ended.tolist(), strict=True):
        hits = [j for j, t in enumerate(ids) if t in eos and mask[j]]
        if ended:
            k = hits[0]
            assert mask == [1] * (k + 1) + [0] * (len(ids) - k - 1)
            assert all(t == tok.pad_token_id for t in ids[k + 1:])
        else:
            assert not hits and sum(mask) == len(ids)


def _snapshot(policy):
    return ({n: p.requires_grad for n, p in policy.named_parameters()},
            {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n})


def test_reference_isolation(tiny_model_dir):
    policy, tok = make_policy(tiny_model_dir)
    policy.add_adapter("other", LoraSettings(r=4).peft_config())
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    # some adapter weights frozen, as when an adapter is loaded with is_trainable=False
    for name, p in policy.named_parameters():
        if "lora_A.default" in name and "layers.0." in name:
            p.requires_grad_(False)
    flags, weights = _snapshot(policy)
    ids = torch.tensor([[1, 4, 77, 78, 2, 5, 60, 61]])
    with torch.no_grad():
        with_adapter = policy(input_ids=ids).logits
        with reference_model(policy):
            ref = policy(input_ids=ids).logits
        after = policy(input_ids=ids).logits
    base, _ = load_model_and_tokenizer(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    torch.testing.assert_close(ref, base_logits)  # the reference is the base
    assert (with_adapter - ref).abs().max() > 1e-3  # and the adapter does matter
    torch.testing.assert_close(after, with_adapter)
    flags_after, weights_after = _snapshot(policy)
    assert flags_after == flags
    assert all(torch.equal(weights[n], weights_after[n]) for n in weights)
    with pytest.raises(TypeError, match="PeftModel"), reference_model(base):
        pass


def test_kl_is_zero_when_policy_equals_reference(tiny_model_dir):
    policy, tok = make_policy(tiny_model_dir)  # fresh LoRA: B = 0
    ro = generate_rollouts(policy, tok, PROMPTS, 8, end_of_turn_ids(policy, tok), seed=0)
    Tr = ro.response_ids.shape[1]
    with torch.no_grad():
        logprobs, _ = forward_response(policy, ro.input_ids, ro.attention_mask, Tr)
        with reference_model(policy):
            ref_logprobs, _ = forward_response(policy, ro.input_ids, ro.attention_mask, Tr)
    kl = per_token_kl(logprobs, ref_logprobs) * ro.response_mask
    assert kl.abs().max().item() < 1e-6
    assert logprobs.shape == ro.response_ids.shape and (logprobs <= 0).all()


def test_forward_response_matches_a_full_forward(tiny_model_dir):
    """The answer log-probs and hidden states equal those read off a plain forward over the
    whole sequence (forward_response asks the model for the answer positions' logits only)."""
    policy, tok = make_policy(tiny_model_dir, sharpen=3.0)
    ro = generate_rollouts(policy, tok, PROMPTS, 8, end_of_turn_ids(policy, tok), seed=1)
    Tr, T = ro.response_ids.shape[1], ro.input_ids.shape[1]
    with torch.no_grad():
        logprobs, hidden = forward_response(policy, ro.input_ids, ro.attention_mask, Tr, output_hidden=True)
        full = policy(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                      position_ids=position_ids_from_mask(ro.attention_mask), output_hidden_states=True)
    assert full.logits.shape[1] == T
    expected = torch.log_softmax(full.logits[:, T - Tr - 1:T - 1].float(), dim=-1)
    expected = expected.gather(-1, ro.input_ids[:, T - Tr:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, full.hidden_states[-1][:, T - Tr - 1:T - 1])


def e_reward(prompts, answers):
    """Toy reward: occurrences of the letter 'e' in the answer."""
    return torch.tensor([a.count("e") / 4.0 for a in answers])


def test_ppo_train_moves_reward_and_only_lora(tiny_model_dir):
    policy, tok = make_policy(tiny_model_dir, sharpen=10.0)
    policy.add_adapter("other", LoraSettings(r=4).peft_config())  # not active: must not change
    policy.set_adapter("default")
    eos = end_of_turn_ids(policy, tok)
    before_base = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    flags, before_lora = _snapshot(policy)

    def mean_reward():
        ro = generate_rollouts(policy, tok, PROMPTS * 8, 8, eos, seed=999)
        return e_reward(None, ro.answers).mean().item()

    start = mean_reward()
    value_head = ValueHead(32)
    config = PPOConfig(lr=5e-2, steps=12, rollout_batch_size=16, mini_batch_size=8, ppo_epochs=2,
                       max_new_tokens=8, init_kl_coef=0.01, normalize_samples=16, seed=0)
    metrics = ppo_train(policy, tok, e_reward, PROMPTS, config, value_head=value_head)
    end = mean_reward()
    assert end > start + 0.1, (start, end)
    for key in ("objective/kl", "objective/reward", "objective/rlhf_reward", "objective/kl_coef",
                "ppo/clipfrac", "ppo/approx_kl", "ppo/loss/policy", "ppo/loss/value",
                "answer/length_tokens", "answer/no_eos_rate"):
        assert math.isfinite(metrics[key]), key
    assert metrics["objective/kl"] > 0 and metrics["answer/length_tokens"] <= 8
    assert metrics["objective/kl_coef"] != 0.01  # the adaptive controller moved β
    after_base = {n: p for n, p in policy.named_parameters() if "lora_" not in n}
    assert all(torch.equal(before_base[n], after_base[n]) for n in before_base)  # bit-identical
    flags_after, after_lora = _snapshot(policy)
    assert flags_after == flags
    changed = {n for n in before_lora if not torch.equal(before_lora[n], after_lora[n])}
    assert changed and all(".default." in n for n in changed)  # only the active adapter
    assert value_head.summary.weight.abs().sum() > 0  # the value head trained too


def test_rollout_batches_hold_each_prompt_k_times(tiny_model_dir):
    policy, tok = make_policy(tiny_model_dir)
    seen: list[list[str]] = []

    def recording_reward(prompts, answers):
        seen.append([p[-1]["content"] for p in prompts])
        return e_reward(prompts, answers)

    config = PPOConfig(steps=2, rollout_batch_size=8, mini_batch_size=8, samples_per_prompt=4, ppo_epochs=1,
                       max_new_tokens=4, normalize_reward=False, seed=3)
    ppo_train(policy, tok, recording_reward, PROMPTS, config)
    assert len(seen) == 2
    for batch in seen:  # two prompts a batch, each four times in a row
        assert len(batch) == 8 and len(set(batch)) == 2
        assert batch[:4] == [batch[0]] * 4 and batch[4:] == [batch[4]] * 4
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        PPOConfig(rollout_batch_size=6, mini_batch_size=6, samples_per_prompt=4)


def _demo_nll(policy, examples) -> float:
    from training.sft import DemonstrationBatches

    with torch.no_grad():
        return float(DemonstrationBatches(examples, len(examples), 0, 0, "cpu").loss(policy))


def test_ppo_ptx_holds_the_demonstrations(tiny_model_dir):
    # PPO-ptx: the same PPO run, with and without γ × the demonstrations' NLL; with it, the
    # policy ends up assigning them more likelihood (and logs the term).
    from training.sft import encode_conversation

    tok = load_model_and_tokenizer(tiny_model_dir)[1]
    demos = [encode_conversation(tok, [{"role": "user", "content": p[0]["content"]},
                                       {"role": "assistant", "content": "the cat sat on the mat."}])
             for p in PROMPTS]
    nll = {}
    for coef in (0.0, 2.0):
        policy, _ = make_policy(tiny_model_dir, sharpen=10.0)
        config = PPOConfig(lr=5e-2, steps=4, rollout_batch_size=8, mini_batch_size=8, ppo_epochs=2,
                           max_new_tokens=6, normalize_reward=False, ptx_coef=coef, seed=0)
        metrics = ppo_train(policy, tok, e_reward, PROMPTS, config, ptx_examples=demos)
        assert ("ppo/loss/ptx" in metrics) == (coef > 0)
        nll[coef] = _demo_nll(policy, demos)
    assert nll[2.0] < nll[0.0] - 0.1, nll


def test_ptx_demonstrations_sources(tiny_model_dir, tmp_path):
    import json

    from training.round import RoundConfig
    from training.sft import ptx_demonstrations

    def config(**kw):
        return RoundConfig(ppo=PPOConfig(ptx_coef=0.1), **kw)

    tok = load_model_and_tokenizer(tiny_model_dir)[1]
    assert ptx_demonstrations(config(model=str(tiny_model_dir)), tok) == []  # not the starter, no file
    starter_like = tmp_path / "starter"
    starter_like.mkdir()
    (starter_like / "starter.json").write_text("{}")
    from_corpus = ptx_demonstrations(config(model=str(starter_like), ptx_examples=5), tok)
    assert len(from_corpus) == 5 and all(any(t != -100 for t in labels) for _, labels in from_corpus)
    data = tmp_path / "demos.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello there"}]}) + "\n")
    (ids, labels), = ptx_demonstrations(config(model=str(tiny_model_dir), ptx_data=str(data)), tok)
    assert tok.decode([t for t in labels if t != -100], skip_special_tokens=True).strip() == "hello there"
    with data.open("a") as f:  # one conversation far longer than a 64-token window: left out
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi " * 200},
                                         {"role": "assistant", "content": "ok"}]}) + "\n")
    both = ptx_demonstrations(config(model=str(tiny_model_dir), ptx_data=str(data)), tok)
    fitting = ptx_demonstrations(config(model=str(tiny_model_dir), ptx_data=str(data)), tok, max_tokens=64)
    assert len(both) == 2 and fitting == [(ids, labels)]
    assert ptx_demonstrations(RoundConfig(model=str(starter_like)), tok) == []  # off by default


def test_ppo_train_input_errors(tiny_model_dir):
    policy, tok = make_policy(tiny_model_dir)
    with pytest.raises(ValueError, match="prompt"):
        ppo_train(policy, tok, e_reward, [], PPOConfig())
    base, _ = load_model_and_tokenizer(tiny_model_dir)
    with pytest.raises((TypeError, ValueError, AttributeError)):
        ppo_train(base, tok, e_reward, PROMPTS, PPOConfig(steps=1))
