"""Data-parallel rounds (training.distributed): two gloo processes take the reward model's
one-process steps, and a round under torchrun — started the way the app's scheduler starts it —
ends with the same adapter on both ranks and one published version. Real processes, a tiny
model, real SQLite."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from storage.paths import DataDir
from tests.conftest import add_votes
from tests.test_jobs import _jobs_argv
from training import distributed
from training.scheduler import launcher_command, subprocess_round


def _pairs(n: int) -> list[dict]:
    return [{"conversation_id": i // 3, "prompt": [{"role": "user", "content": f"question {i}"}],
             "chosen": f"ok {i}", "rejected": f"a much longer answer {i} " * 3, "tie": i % 4 == 3}
            for i in range(n)]


def _steps(rank: int, world: int, model_dir: str, out: str, init_file: str) -> None:
    """The reward model's and PPO's training steps (:func:`_reward_epochs`, :func:`_ppo_iterations`)
    in a process group of ``world`` gloo processes (1: none), what they trained saved to
    ``out/rank{rank}.pt``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save({"reward": _reward_epochs(model_dir, rank), **_ppo_iterations(model_dir)}, f"{out}/rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def _reward_epochs(model_dir: str, rank: int) -> list[torch.Tensor]:
    """Two SGD epochs of the reward model's loop (``_train_epochs``); its trainable tensors.
    SGD, not AdamW, and no clipping: the step is the gradient itself, so a gradient twice too
    large shows."""
    from training.models import load_model_and_tokenizer
    from training.preferences import encode_pairs
    from training.reward_model import RewardModel
    from training.reward_training import RewardConfig, _train_epochs

    torch.manual_seed(0)  # the same start in this process and in a fresh one
    model, tok = load_model_and_tokenizer(model_dir)
    rm = RewardModel.from_base(model, seed=0)
    params = rm.trainable_parameters()
    with torch.no_grad():
        for p in params:
            p.requires_grad_(True)
            if rank > 0:  # another start: the loop must begin from rank 0's weights
                p.add_(torch.randn_like(p))
    encoded = encode_pairs(tok, _pairs(9))  # batches of 4, 4 and 1: one rank's shard of the last is empty
    config = RewardConfig(epochs=2, batch_size=4, max_grad_norm=1e9)
    rm.eval()
    _train_epochs(rm, tok, encoded, config, torch.optim.SGD(params, lr=0.5), params)
    return [p.detach().clone() for p in params]


def _start_weights(model_dir) -> list[torch.Tensor]:
    from training.models import load_model_and_tokenizer
    from training.reward_model import RewardModel

    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(model_dir)
    return [p.detach().clone() for p in RewardModel.from_base(model, seed=0).trainable_parameters()]


def _length_reward(prompts: list[list[dict]], answers: list[str]) -> torch.Tensor:
    return torch.tensor([float(len(a)) for a in answers])


def _ppo_iterations(model_dir: str) -> dict:
    """Two PPO iterations (``ppo_train``, 4 prompts × 2 answers each, two epochs of two
    minibatches); the adapter's LoRA tensors (``lora``) and the metrics."""
    from training.models import active_lora_params, add_lora, load_model_and_tokenizer
    from training.ppo import PPOConfig, ppo_train

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(model_dir)
    policy = add_lora(model, adapter_name="policy")
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]
    config = PPOConfig(steps=2, rollout_batch_size=8, samples_per_prompt=2, mini_batch_size=4, ppo_epochs=2,
                       max_new_tokens=6, normalize_samples=4, lr=1e-2)
    metrics = ppo_train(policy, tok, _length_reward, prompts, config)
    return {"lora": [p.detach().clone() for _, p in active_lora_params(policy)], "metrics": metrics}


def test_two_processes_take_the_one_process_steps(tiny_model_dir, tmp_path):
    """Two gloo processes, each with half of every batch, end where one process ends: the
    reward model's epochs (one rank's part of the last batch empty) and PPO's iterations."""
    import torch.multiprocessing as mp

    assert distributed.world_size() == 1  # the test process itself is no rank
    single, split = tmp_path / "single", tmp_path / "split"
    single.mkdir()
    split.mkdir()
    _steps(0, 1, str(tiny_model_dir), str(single), "")
    mp.spawn(_steps, args=(2, str(tiny_model_dir), str(split), str(tmp_path / "rendezvous")), nprocs=2)
    one = torch.load(single / "rank0.pt")
    ranks = [torch.load(split / f"rank{r}.pt") for r in (0, 1)]
    # the reward model
    start = _start_weights(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(one["reward"], start, strict=True))  # the steps moved it
    for a, b in zip(ranks[0]["reward"], ranks[1]["reward"], strict=True):
        assert torch.equal(a, b)  # both ranks hold the same weights, bit for bit
    for a, b in zip(ranks[0]["reward"], one["reward"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # ... and they are the one-process steps'
    # PPO
    assert any(float(t.abs().max()) > 0 for t in one["lora"][1::2])  # LoRA B left zero: PPO moved them
    for a, b in zip(ranks[0]["lora"], ranks[1]["lora"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0]["lora"], one["lora"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    for key in ("objective/kl", "objective/reward", "objective/kl_coef", "ppo/grad_norm", "answer/length_tokens"):
        assert ranks[0]["metrics"][key] == ranks[1]["metrics"][key]  # every rank reports the whole batch
        assert ranks[0]["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-3, abs=1e-5), key


def test_minibatches_split_over_ranks_are_the_one_process_minibatches():
    from training.ppo_math import minibatch_rows

    whole = minibatch_rows(10, 4, torch.Generator().manual_seed(3))
    assert [len(mb) for mb in whole] == [4, 4, 2]
    assert sorted(torch.cat(whole).tolist()) == list(range(10))  # every row once per epoch
    # two ranks holding rows 0-5 and 6-9: the same minibatches, each row on the rank that holds it
    low = minibatch_rows(10, 4, torch.Generator().manual_seed(3), first=0, held=6)
    high = minibatch_rows(10, 4, torch.Generator().manual_seed(3), first=6, held=4)
    for mb, a, b in zip(whole, low, high, strict=True):
        assert sorted(mb.tolist()) == sorted(a.tolist() + (b + 6).tolist())
        assert all(0 <= i < 6 for i in a.tolist()) and all(0 <= i < 4 for i in b.tolist())


def test_shard_parts_cover_the_items_in_order(monkeypatch):
    items = list(range(7))
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        parts.append(distributed.shard(items))
    assert [x for part in parts for x in part] == items
    assert sorted(len(p) for p in parts) == [2, 2, 3]


def test_launcher_command_runs_the_launcher_module_of_this_interpreter():
    assert launcher_command("") == [sys.executable, "-m", "training.jobs"]
    assert launcher_command("torchrun --nproc_per_node 2") == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "training.jobs"]
    assert launcher_command("accelerate launch --num_processes 2")[:3] == [
        sys.executable, "-m", "accelerate.commands.launch"]
    for bad in ("rm -rf /", "python -c 1", "torchrun 'unclosed"):
        with pytest.raises(ValueError):
            launcher_command(bad)
    from app import AppConfig

    with pytest.raises(ValueError, match="--round-launcher"):  # the app refuses it before starting
        AppConfig(round_launcher="bash -c 'echo hi'")


@pytest.mark.slow
def test_a_torchrun_round_trains_identical_adapters_and_publishes_once(world, tiny_model_dir):
    store, registry, data = world
    add_votes(store, 12)
    argv = _jobs_argv(data, tiny_model_dir, "--ppo.rollout-batch-size", "8", "--ppo.samples-per-prompt", "4",
                      "--ppo.steps", "2", "--threads", "1")
    round_fn = subprocess_round(argv, DataDir(data), store, launcher="torchrun --standalone --nproc_per_node 2")
    result = round_fn("manual")
    log = DataDir(data).training_log.read_text()
    assert result["status"] == "succeeded", (result, log[-3000:])
    digests = dict(re.findall(r"rank (\d) adapter sha256=([0-9a-f]{64})", log))
    assert set(digests) == {"0", "1"}, log[-3000:]
    assert digests["0"] == digests["1"]  # the ranks trained the same adapter
    rounds = store.rounds()
    assert [r["status"] for r in rounds] == ["succeeded"] and rounds[0]["version"] == 1
    assert sorted(v["version"] for v in store.versions()) == [0, 1]
    assert store.live_version() == 1 and registry.path(1).is_dir()
    assert rounds[0]["metrics"]["ppo/samples"] == 16.0  # two iterations of 8 answers, 4 on each rank
