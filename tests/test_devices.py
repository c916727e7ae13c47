"""``--device`` / ``--dtype`` / ``--quantize``: the selection rules (CUDA facts passed in, so the
GPU paths run here), the flags the app hands to its rounds, loading in another dtype, and a
QLoRA round (4-bit base, float32 LoRA and heads) on the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import add_votes
from training.devices import CudaInfo, PlacementError, resolve_placement

NO_GPU = CudaInfo(False)
H200 = CudaInfo(True, count=1, bf16=True, name="NVIDIA H200")
T4 = CudaInfo(True, count=2, bf16=False, name="Tesla T4")


@pytest.mark.parametrize("device, dtype, cuda, expected", [
    ("auto", "auto", NO_GPU, ("cpu", "float32")),
    ("auto", "auto", H200, ("cuda:0", "bfloat16")),
    ("auto", "auto", T4, ("cuda:0", "float16")),
    ("cuda", "auto", T4, ("cuda:0", "float16")),
    ("cuda:1", "float32", T4, ("cuda:1", "float32")),
    ("cpu", "auto", H200, ("cpu", "float32")),
    ("CPU", "bfloat16", NO_GPU, ("cpu", "bfloat16")),
])
def test_placement_rules(device, dtype, cuda, expected):
    placement = resolve_placement(device, dtype, "none", cuda=cuda)
    assert (placement.device, placement.dtype) == expected
    assert placement.reason  # the startup line says why


def test_each_rank_of_a_torchrun_round_takes_its_own_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_placement("auto", "auto", "none", cuda=T4).device == "cuda:1"
    assert resolve_placement("cuda", "auto", "none", cuda=T4).device == "cuda:1"
    assert resolve_placement("cuda:0", "auto", "none", cuda=T4).device == "cuda:0"  # as asked
    assert resolve_placement("auto", "auto", "none", cuda=NO_GPU).device == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the first GPU, whatever LOCAL_RANK says
    assert resolve_placement("auto", "auto", "none", cuda=T4).device == "cuda:0"


def test_auto_says_why_it_chose_what_it_chose():
    assert "CUDA is available (NVIDIA H200)" in resolve_placement(cuda=H200).describe()
    assert "bfloat16: the GPU supports it" in resolve_placement(cuda=H200).describe()
    assert "no CUDA device" in resolve_placement(cuda=NO_GPU).describe()
    four = resolve_placement("auto", "auto", "4bit", cuda=H200)
    assert four.quantize == "4bit" and "QLoRA" in four.describe()


@pytest.mark.parametrize("device, dtype, quantize, cuda, message", [
    ("cuda", "auto", "none", NO_GPU, "no CUDA device"),
    ("cuda:2", "auto", "none", T4, "only 2 CUDA device"),
    ("gpu", "auto", "none", H200, "--device must be"),
    ("cpu:1", "auto", "none", H200, "--device must be"),
    ("auto", "bfloat16", "none", T4, "does not support it"),
    ("auto", "float64", "none", H200, "--dtype must be"),
    ("auto", "auto", "3bit", H200, "--quantize must be"),
])
def test_placement_errors_name_the_flag(device, dtype, quantize, cuda, message):
    with pytest.raises(PlacementError, match=message):
        resolve_placement(device, dtype, quantize, cuda=cuda)


def test_the_app_refuses_an_unavailable_device_and_hands_its_load_settings_to_rounds(capsys):
    import app
    from training.flags import dataclass_from_args, parse_config
    from training.models import LoadConfig
    from training.round import RoundConfig

    with pytest.raises(SystemExit) as exc:
        app.main(["--device", "cuda:0"])  # this machine has no GPU
    assert exc.value.code == 2 and "--device cuda:0" in capsys.readouterr().err
    config = app.AppConfig(load=LoadConfig(device="cpu", dtype="bfloat16", quantize="4bit"))
    argv = config.round_argv("/data", "/model")
    assert "--quantize=4bit" in argv and "--dtype=bfloat16" in argv and "--device=cpu" in argv
    child = parse_config(RoundConfig, argv)
    assert child.load == config.load and child.model == "/model"
    assert "--round.device" not in " ".join(argv) and dataclass_from_args  # one flag each


def test_a_model_loads_in_the_dtype_asked_for(tiny_model_dir):
    from training.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.placement.dtype == "bfloat16" and model.placement.device == "cpu"


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    from training.starter.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny64"), hidden=64)


@pytest.mark.usefixtures("single_thread")
def test_a_qlora_round_trains_float32_lora_on_a_4bit_base(model64, tmp_path):
    import bitsandbytes as bnb

    from chatapp.engine import ChatEngine
    from storage.paths import DataDir
    from storage.registry import AdapterRegistry
    from storage.store import open_store
    from tests.test_jobs import _config
    from training.gate import GateConfig
    from training.models import LoadConfig, load_model_and_tokenizer
    from training.round import load_inputs, load_model, run_round

    data = tmp_path / "data"
    store = open_store(data)
    registry = AdapterRegistry(DataDir(data), store)
    ChatEngine(*load_model_and_tokenizer(model64, "4bit"), registry)  # version 0 on the 4-bit base
    add_votes(store, 12)
    config = _config(data, model64, load=LoadConfig(quantize="4bit"), gate=GateConfig(enabled=False))
    model, _, _, _ = load_model(config, load_inputs(config, store))
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)  # the round's base is 4-bit
    result = run_round(config, store, registry)
    assert result["status"] == "succeeded", result
    from safetensors.torch import load_file

    weights = load_file(str(registry.path(result["version"]) / "adapter_model.safetensors"))
    assert weights and {w.dtype for w in weights.values()} == {torch.float32}
    assert any(float(w.abs().max()) > 0 for k, w in weights.items() if "lora_B" in k)  # PPO moved it


@pytest.mark.usefixtures("single_thread")
def test_checkpointing_and_micro_batches_save_memory_but_train_the_same_adapter(tiny_model_dir):
    from training.models import add_lora, enable_gradient_checkpointing, load_model_and_tokenizer
    from training.ppo import PPOConfig, ppo_train

    prompts = [[{"role": "user", "content": f"question number {i}"}] for i in range(4)]

    def reward_fn(batch, answers):
        return torch.tensor([float(len(a)) for a in answers])

    trained, replays = {}, []
    for variant in ("plain", "checkpointed", "micro-batches"):
        torch.manual_seed(0)
        model, tok = load_model_and_tokenizer(tiny_model_dir)
        if variant == "checkpointed":
            enable_gradient_checkpointing(model)
            for layer in model.model.layers:  # count the recomputations transformers runs
                inner = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = lambda *a, inner=inner, **k: (replays.append(1), inner(*a, **k))[1]
        policy = add_lora(model, adapter_name="policy")
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        start = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
        config = PPOConfig(steps=2, rollout_batch_size=4, mini_batch_size=4, max_new_tokens=6, normalize_reward=False,
                           micro_batch_size=1 if variant == "micro-batches" else 0)
        metrics = ppo_train(policy, tok, reward_fn, prompts, config)
        trained[variant] = ({n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}, metrics)
    assert replays, "gradient checkpointing never ran"
    weights, metrics = trained["plain"]
    for variant in ("checkpointed", "micro-batches"):
        for name, weight in weights.items():
            assert torch.allclose(weight, trained[variant][0][name], atol=1e-5), (variant, name)
        for key in ("ppo/loss/policy", "ppo/loss/value", "ppo/clipfrac"):
            assert trained[variant][1][key] == pytest.approx(metrics[key], abs=1e-5), (variant, key)
    assert any(not torch.equal(w, start[n]) for n, w in trained["micro-batches"][0].items())  # PPO moved it


@pytest.mark.usefixtures("single_thread")
def test_a_checkpointed_reward_model_on_the_policys_base_trains_as_without(tiny_model_dir):
    # checkpointed layers are recomputed in the backward pass: under the reward model's adapter,
    # not the policy's that shares the base
    from training.models import add_lora, enable_gradient_checkpointing, load_model_and_tokenizer
    from training.reward_training import RewardConfig, train_reward_model

    pairs = [{"conversation_id": str(i % 4), "prompt": [{"role": "user", "content": f"question number {i}"}],
              "chosen": "ok", "rejected": f"a much longer answer {i}", "tie": False} for i in range(8)]
    trained = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model, tok = load_model_and_tokenizer(tiny_model_dir)
        if checkpointed:
            enable_gradient_checkpointing(model)
        policy = add_lora(model, adapter_name="policy")
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        rm, _ = train_reward_model(policy, tok, pairs, RewardConfig(epochs=2, batch_size=4, min_votes=2, lr=1e-2))
        trained[checkpointed] = {n: p.detach().clone() for n, p in policy.named_parameters() if ".reward." in n}
        trained[checkpointed]["head"] = rm.head.weight.detach().clone()
    assert any(float(w.abs().max()) > 0 for n, w in trained[False].items() if "lora_B" in n)  # it trained
    for name, weight in trained[False].items():
        assert torch.allclose(weight, trained[True][name], atol=1e-5), name
