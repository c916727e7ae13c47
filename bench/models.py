"""What real model sizes cost: serving speed, PPO time and memory, per architecture and device.

    python -m bench.models [--models smollm2-135m,starter] [--device auto] [--quantize none]
                           [--json OUT]

Models are random-weight, built in-process from the public architecture values of each family's
``config.json`` (written below; nothing is downloaded), with a word-level tokenizer of the same
vocabulary size and the family's chat template and special tokens (``training.starter.tiny``),
saved once and loaded through the app's own path (``training.models.load_model_and_tokenizer``
with ``--device/--dtype/--quantize``). Random weights decide nothing about speed or memory; the
shapes do. Each measurement runs in a child process of its own, so one's memory is not another's:

* ``chat_tokens_per_s``: decoding speed of one streamed reply of ``--new-tokens`` tokens (end of
  turn suppressed) through ``ChatEngine.stream``, after its first token; median of ``--repeats``.
* ``ttft_s``: time from ``stream`` to the first text; median.
* ``serving_memory_over_base``: resident memory (CUDA: allocated) of the serving process with 3
  policy versions loaded and each having replied, minus before the model was loaded, ÷ the bytes
  of one base copy. Target ≤ 1.1.
* ``s_per_64_ppo_answers``: ``training.ppo.ppo_train`` for one iteration of the round's default
  shape (64 answers: 16 prompts × 4 samples, minibatches of 16, ``--new-tokens`` per answer),
  the reward model a LoRA adapter on the same base trained on 16 pairs first, as in a round.
* ``round_peak_over_base``: the peak of the same measure over that reward model + PPO work ÷ one
  base copy, with the round's ``--round.gradient-checkpointing`` and
  ``--round.ppo.micro-batch-size`` as given here (default: on, 4). Target ≤ 1.5 (CPU float32,
  CUDA 4-bit). On the CPU, children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
  tensors leave the resident size (glibc's heap would otherwise keep the high-water mark).
* ``base_mb``: one base copy (parameters and buffers as loaded; 4-bit weights at their packed size).

Prints one line per row as it finishes and one JSON object (also to ``--json``). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from training.flags import add_dataclass_args, dataclass_from_args, help_field

# Public config.json values of each family's model (hub: HuggingFaceTB/SmolLM2-135M-Instruct,
# Qwen/Qwen2.5-0.5B-Instruct, meta-llama/Llama-3.2-1B-Instruct); "starter" is StarterConfig's.
ARCHITECTURES: dict[str, dict] = {
    "smollm2-135m": dict(family="chatml", model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(family="chatml", model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(family="llama3", model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                       "rope_theta": 500000.0}),
}
PROMPTS = ["hello there , how are you today ?", "what is 12 plus 30 ?", "spell cat backwards",
           "what is the capital of France ?", "my name is Ada . what is my name ?",
           "tell me a short story about a cat .", "what is 7 times 6 ?", "say something nice ."]


@dataclass
class ModelsBenchConfig:
    """Flags of ``python -m bench.models``."""

    models: str = help_field("smollm2-135m,starter", help=f"comma-separated rows: {', '.join([*ARCHITECTURES, 'starter'])}")
    device: str = help_field("auto", help="--device of the rows (auto: CUDA when available)")
    dtype: str = help_field("auto", help="--dtype of the rows")
    quantize: str = help_field("none", help="--quantize of the rows: none, 8bit or 4bit")
    new_tokens: int = help_field(32, help="tokens per reply and per PPO answer")
    repeats: int = help_field(3, help="timed replies per serving figure (median)")
    threads: int = help_field(0, help="torch threads (0: all cores)")
    gradient_checkpointing: bool = help_field(True, help="the round's --round.gradient-checkpointing")
    micro_batch_size: int = help_field(4, help="the round's --round.ppo.micro-batch-size (0: the whole minibatch)")
    json: str = help_field("", help="also write the JSON result to this file")
    workdir: str = help_field("", help="where the random models are saved (default: a temporary dir, removed)")

    def __post_init__(self):
        unknown = [m for m in self.names() if m not in ARCHITECTURES and m != "starter"]
        if unknown or not self.names():
            raise ValueError(f"--models takes {', '.join([*ARCHITECTURES, 'starter'])}; got {self.models!r}")
        if self.new_tokens < 2 or self.repeats < 1:
            raise ValueError("--new-tokens must be >= 2 and --repeats >= 1")

    def names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]


def architecture(name: str) -> dict:
    """The architecture values of row ``name`` (the starter's from ``StarterConfig``)."""
    if name != "starter":
        return dict(ARCHITECTURES[name])
    from training.starter.build import StarterConfig

    s = StarterConfig()
    return dict(family="starter", model_type="llama", hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads,
                vocab_size=s.vocab_size, max_position_embeddings=s.max_position_embeddings, tie_word_embeddings=True)


def word_tokenizer(family: str, vocab_size: int):
    """A word-level tokenizer of exactly ``vocab_size`` ids (every id decodes to a word, so a
    random model's replies stream text) with ``family``'s chat template and special tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from training.starter.tiny import FAMILIES
    from training.starter.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

    template, (bos, eos, pad), turn_tokens = FAMILIES[family]
    if template is None:  # the starter's own
        template, named = CHAT_TEMPLATE, SPECIAL_TOKENS
        bos, eos, pad, turn_tokens = "<|bos|>", "<|end|>", "<|pad|>", SPECIAL_TOKENS[3:]
    else:
        named = [t for t in (bos, eos, pad) if t is not None]
    specials = list(dict.fromkeys([*named, *turn_tokens, "<unk>"]))
    words = list(dict.fromkeys(w for p in PROMPTS for w in p.split()))
    vocab = {w: i for i, w in enumerate(words)}
    for i in range(len(vocab), vocab_size - len(specials)):
        vocab[f"w{i}"] = i
    for t in specials:
        vocab[t] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, pad
    tok.chat_template = template
    return tok


def build(name: str, out: Path) -> Path:
    """Save row ``name``'s random-weight model (bfloat16 on disk: half the bytes; loading casts
    to the row's dtype) and tokenizer to ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = architecture(name)
    family = arch.pop("family")
    tok = word_tokenizer(family, arch["vocab_size"])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ------------------------------------------------------------------ measurements (children) ----
class Memory:
    """Resident bytes of this process (CUDA: bytes allocated by torch), sampled every 20 ms
    between :meth:`start` and :meth:`stop` for the peak."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def now(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.memory_allocated())
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.peak = self.now()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        if self.cuda:
            import torch

            self.peak = max(self.peak, int(torch.cuda.max_memory_allocated()))
        return max(self.peak, self.now())


def base_bytes(model) -> int:
    """Bytes of one base copy: every parameter and buffer as stored (4-bit packed)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def warm_up(model_dir: str) -> None:
    """Import everything loading and training will (peft, bitsandbytes, the model's modeling
    code, instantiated on the meta device: no memory) before the baseline is read, so library
    code is not counted as model memory."""
    import peft  # noqa: F401
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - optional
        pass
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def _load(config: ModelsBenchConfig, model_dir: str):
    """``(memory, bytes before loading, model, tokenizer, bytes of one base copy)``: the model
    loaded the row's way, after :func:`warm_up`, with a :class:`Memory` of the row's device."""
    import torch

    from training.models import load_model_and_tokenizer

    cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    memory = Memory(cuda=cuda)
    warm_up(model_dir)
    before = memory.now()
    model, tok = load_model_and_tokenizer(model_dir, config.quantize, config.device, config.dtype)
    return memory, before, model, tok, base_bytes(model)


def measure_serving(config: ModelsBenchConfig, model_dir: str) -> dict:
    """Serving figures of one row (run in a child process)."""
    import torch

    from chatapp.engine import ChatEngine, Sampling
    from storage.paths import DataDir
    from storage.registry import AdapterRegistry
    from storage.store import open_store
    from training.models import add_lora, lora_params, save_adapter

    memory, before, model, tok, base = _load(config, model_dir)
    data = Path(tempfile.mkdtemp(prefix="bench-models-"))
    store = open_store(data)
    registry = AdapterRegistry(DataDir(data), store)
    engine = ChatEngine(model, tok, registry)
    for version in (1, 2):  # two more versions, each a changed adapter, as rounds publish them
        add_lora(engine.model, adapter_name="new")
        with torch.no_grad():
            for n, p in lora_params(engine.model, "new"):
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        staging = registry.staging_dir()
        save_adapter(engine.model, "new", staging)
        engine.model.delete_adapter("new")
        registry.publish(staging, parent=version - 1, round_id=None, metrics={}, live=True)
    sampling = Sampling(temperature=0.0, max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    ttft, speed = [], []
    for i in range(config.repeats + 1):
        for version in ((2, 1, 0) if i == 0 else (2,)):
            t0 = time.perf_counter()
            first = None
            gen = engine.stream(messages, sampling=sampling, version=version)
            while True:
                try:
                    next(gen)
                    first = first or time.perf_counter()
                except StopIteration as done:
                    reply = done.value
                    break
            end = time.perf_counter()
            if i:  # the first pass loads the adapters (and warms up)
                ttft.append(first - t0)
                speed.append((len(reply.tokens) - 1) / max(end - first, 1e-9))
    loaded = len(engine._loaded)
    return {"chat_tokens_per_s": round(statistics.median(speed), 2), "ttft_s": round(statistics.median(ttft), 4),
            "serving_memory_over_base": round((memory.now() - before) / base, 3), "versions_loaded": loaded,
            "base_mb": round(base / 2**20, 1), "placement": model.placement.describe()}


def measure_round(config: ModelsBenchConfig, model_dir: str) -> dict:
    """A round's reward model + one default-shape PPO iteration on one base (a child process)."""

    from training.models import add_lora, enable_gradient_checkpointing
    from training.ppo import PPOConfig, ppo_train
    from training.reward_training import RewardConfig, make_reward_fn, train_reward_model

    memory, before, model, tok, base = _load(config, model_dir)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    memory.start()
    policy = add_lora(model, adapter_name="policy")
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] * 2  # 16 prompts
    words = PROMPTS[0].split()
    pairs = [{"conversation_id": str(i % 8), "prompt": prompts[i], "chosen": " ".join(words[: 2 + i % 5]),
              "rejected": " ".join(reversed(words))[: 20 + i], "tie": False} for i in range(16)]
    t0 = time.perf_counter()
    rm, _ = train_reward_model(policy, tok, pairs, RewardConfig(epochs=1, min_votes=4))
    rm_s = time.perf_counter() - t0
    ppo = PPOConfig(steps=1, rollout_batch_size=64, samples_per_prompt=4, mini_batch_size=16, ppo_epochs=1,
                    micro_batch_size=config.micro_batch_size, max_new_tokens=config.new_tokens, normalize_reward=False)
    metrics = ppo_train(policy, tok, make_reward_fn(rm, tok), prompts, ppo)
    peak = memory.stop()
    return {"s_per_64_ppo_answers": round(metrics["time/ppo_s"], 2), "rm_train_s_16_pairs": round(rm_s, 2),
            "round_peak_over_base": round((peak - before) / base, 3), "ppo_answer_tokens": metrics["answer/length_tokens"],
            "base_mb": round(base / 2**20, 1)}


def _child(config: ModelsBenchConfig, what: str, model_dir: str) -> dict:
    argv = [sys.executable, "-m", "bench.models", "--child", what, "--model-dir", model_dir,
            *[f"--{k.replace('_', '-')}={v}" for k, v in asdict(config).items() if k not in ("json", "workdir")]]
    # glibc keeps freed heap memory mapped: with big blocks mmapped (and unmapped when freed) the
    # resident size follows the live tensors, which is what the code under test controls
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit code " + str(out.returncode)])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(config: ModelsBenchConfig) -> dict:
    """Every row of ``config`` (builds the models, measures each in child processes)."""
    workdir = Path(config.workdir) if config.workdir else Path(tempfile.mkdtemp(prefix="bench-models-"))
    rows = []
    for name in config.names():
        model_dir = workdir / name
        if not (model_dir / "config.json").is_file():
            build(name, model_dir)
        row = {"model": name, "device": config.device, "dtype": config.dtype, "quantize": config.quantize}
        for what in ("serving", "round"):
            row.update(_child(config, what, str(model_dir)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not config.workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return {"rows": rows, "settings": asdict(config), "threads": config.threads or os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.split("\n")[0])
    add_dataclass_args(parser, ModelsBenchConfig)
    parser.add_argument("--child", choices=["serving", "round"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_args(ModelsBenchConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    import torch

    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    if args.child:
        result = (measure_serving if args.child == "serving" else measure_round)(config, args.model_dir)
        print(json.dumps(result), flush=True)
        sys.stderr.flush()
        os._exit(0)  # no interpreter teardown under the engine's decode thread (it can abort there)
    result = run(config)
    print(json.dumps(result))
    if config.json:
        Path(config.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
