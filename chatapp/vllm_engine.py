"""Serving through a running vLLM server (``--backend vllm --vllm-url URL``).

The app keeps what is its own — which policy version is live, the chat template, the prompt cut
to the context window, user text kept inert — and hands decoding to vLLM's OpenAI-compatible
server (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html):

- a prompt is rendered here (:meth:`ServedVersions.prompt_ids`, the model's chat template) and
  sent as token ids to ``POST /v1/completions`` with ``stream: true``, so a special token typed
  by a user stays text, exactly as with the in-process engine;
- each policy version is a LoRA adapter loaded at run time (``POST /v1/load_lora_adapter``)
  under a name of its own, ``policy-v7-<run>`` (``<run>``: random per app start); a version
  unloaded and needed again gets a new name (``policy-v7-<run>.1``): a reload under a used name
  can meet cached blocks of the old one. Adapters an earlier run left are unloaded at startup;
  the newest ``keep_loaded`` versions stay loaded (live, previous, …), older ones are unloaded
  (``POST /v1/unload_lora_adapter``) when no running reply uses them;
- a reply resolves its version once, when it starts, and names that adapter in its one request,
  so a version published or rolled back meanwhile serves the *next* reply (no torn replies);
- the answers of a comparison are separate requests sent at once: vLLM batches them.

A server that is absent, refuses a request or answers with an error raises :class:`VllmError`
with what to do; nothing waits without a timeout. The ensemble-based pair rules need the reward
model in process: with this backend :meth:`VllmEngine.member_scores` is None and comparisons
are chosen at random.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from chatapp.batching import Inbox
from chatapp.served import UNSERVABLE, Reply, Sampling, ServedVersions, ServingError
from chatapp.text import split_reasoning, template_special_ids
from storage.registry import AdapterRegistry
from training.chat_format import end_of_turn_ids, inert_text

log = logging.getLogger(__name__)

START_HINT = "start one with scripts/vllm-cpu.sh MODEL PORT (CPU) or python -m vllm.entrypoints.openai.api_server"
LORA_HINT = ("start the server with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment "
             "(scripts/vllm-cpu.sh does both)")


class VllmError(ServingError):
    """The vLLM server is unreachable, lacks runtime LoRA loading, or answered with an error."""


class VllmEngine(ServedVersions):
    """Streams chat replies of the live policy version from a vLLM server at ``url``.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        tokenizer: the base model's tokenizer (the server's model), with a chat template.
        registry: the adapter registry; its store says which version is live.
        keep_loaded: how many versions stay loaded on the server.
        timeout_s: seconds to wait for the server's next streamed piece (or any answer).

    Raises:
        VllmError: the server cannot be reached, serves no model, or cannot load adapters at
            run time (checked here, at startup).
    """

    def __init__(self, url: str, tokenizer, registry: AdapterRegistry, keep_loaded: int = 3,
                 timeout_s: float = 120.0):
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=5.0))
        models = self._models()
        self.served_model, window = models[0]["id"], int(models[0].get("max_model_len") or 2048)
        super().__init__(tokenizer, registry, window)
        self.stop_ids = sorted(set(end_of_turn_ids(None, tokenizer)) | set(template_special_ids(tokenizer)))
        self.keep_loaded = keep_loaded
        self._names: dict[int, str] = {}  # version → its adapter name on the server, while loaded
        self._reloads: dict[int, int] = {}  # version → times it was loaded
        self._in_use: dict[int, int] = {}  # version → replies running with it
        self._lock = threading.Lock()
        self._check_runtime_lora()
        self._nonce = secrets.token_hex(3)  # this app's adapter names never meet another run's
        self._unload_stale(models)

    # ---- the server ---------------------------------------------------------------------------
    def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            return self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise VllmError(f"vLLM server at {self.url} did not answer {path}: {exc.__class__.__name__}: {exc}; "
                            f"{START_HINT}") from None

    def _models(self) -> list[dict]:
        """What the server serves (``GET /v1/models``): the base model first, then its loaded
        adapters (``parent`` set)."""
        try:
            response = self.client.get("/v1/models")
            response.raise_for_status()
            models = response.json()["data"]
            if not models or "id" not in models[0]:
                raise ValueError("it lists no model")
        except (httpx.HTTPError, KeyError, ValueError, TypeError) as exc:
            raise VllmError(f"no vLLM server at {self.url} ({exc.__class__.__name__}: {exc}); {START_HINT}") from None
        return models

    def _check_runtime_lora(self) -> None:
        """Runtime adapter loading must be on: unloading a name never loaded answers with
        vLLM's own error, not with a route that does not exist."""
        response = self._post("/v1/unload_lora_adapter", {"lora_name": "policy-probe-never-loaded"})
        if response.status_code in (404, 405) and response.headers.get("content-type", "").startswith(
                "application/json") and response.json().get("detail") in ("Not Found", "Method Not Allowed"):
            raise VllmError(f"vLLM server at {self.url} cannot load adapters at run time: {LORA_HINT}")

    def _unload_stale(self, models: list[dict]) -> None:
        """Unload the ``policy-*`` adapters of ``models`` (:meth:`_models`) that an earlier run
        of the app left on the server (they hold slots; their names are never used again)."""
        for m in models:
            if m.get("parent") and str(m["id"]).startswith("policy-"):
                self._post("/v1/unload_lora_adapter", {"lora_name": m["id"]})
                log.info("unloaded %s, left on the vLLM server by an earlier run", m["id"])

    def adapter_name(self, version: int) -> str:
        """The server's name of version ``version``'s adapter (loading it first when needed).

        Raises:
            VllmError: the server refused to load it.
        """
        with self._lock:
            name = self._names.get(version)
            if name is not None:
                return name
            reloads = self._reloads.get(version, 0)
            name = f"policy-v{version}-{self._nonce}" + (f".{reloads}" if reloads else "")
            path = self.registry.path(version)
            response = self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())})
            if response.status_code != 200:
                hint = LORA_HINT if response.status_code in (404, 405) else "see the server's log"
                raise VllmError(f"vLLM server refused policy version {version} ({response.status_code}: "
                                f"{response.text[:300]}); {hint}")
            self._names[version], self._reloads[version] = name, reloads + 1
            log.info("policy version %s loaded on the vLLM server as %s", version, name)
            self._unload_old(keep={version})
            return name

    def _unload_old(self, keep: set[int]) -> None:
        """Unload the oldest versions beyond ``keep_loaded`` that no running reply uses (lock held)."""
        live = self.store.live_version()
        spare = [v for v in sorted(self._names) if v not in keep and v != live and not self._in_use.get(v)]
        for version in spare[: max(0, len(self._names) - self.keep_loaded)]:
            name = self._names.pop(version)
            response = self._post("/v1/unload_lora_adapter", {"lora_name": name})
            if response.status_code != 200:
                log.warning("vLLM server did not unload %s: %s %s", name, response.status_code, response.text[:200])

    def loaded(self) -> dict[int, str]:
        """The versions loaded on the server now, with their names."""
        with self._lock:
            return dict(self._names)

    # ---- generation ---------------------------------------------------------------------------
    def _request_body(self, name: str, ids: list[int], sampling: Sampling, seed: int | None) -> dict:
        body = {
            "model": name, "prompt": ids, "stream": True,
            "max_tokens": sampling.max_new_tokens, "min_tokens": sampling.min_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "stop_token_ids": self.stop_ids, "skip_special_tokens": True,
        }
        if seed is not None:
            body["seed"] = seed
        return body

    def _run(self, body: dict, out: queue.Queue, stop_event: threading.Event) -> None:
        """One streamed completion: ``("text", piece)`` events, then ``("done", finish)`` or
        ``("error", exc)`` on ``out``. Setting ``stop_event`` closes the stream (vLLM then
        aborts the request) and ends it ``"stopped"``."""
        finish = None
        try:
            with self.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise VllmError(f"vLLM server answered {response.status_code} to a completion with "
                                    f"{body['model']}: {response.read()[:300]!r}")
                for line in response.iter_lines():
                    if stop_event.is_set():
                        finish = "stopped"
                        break
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        raise VllmError(f"vLLM server failed a completion: {event['error']}")
                    choice = event["choices"][0]
                    if choice.get("text"):
                        out.put(("text", choice["text"]))
                    finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as exc:
            out.put(("error", VllmError(f"vLLM server at {self.url} broke off a reply: {exc.__class__.__name__}: "
                                        f"{exc}; {START_HINT}")))
            return
        except Exception as exc:  # noqa: BLE001 - handed to the reader, raised there
            out.put(("error", exc))
            return
        out.put(("done", {"stop": "eos", "length": "length"}.get(finish or "", finish or "eos")))

    def stream_many(
        self,
        messages: list[dict],
        versions: list[int],
        sampling: Sampling | None = None,
        stop_event: threading.Event | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[list[str]]:
        """As :meth:`chatapp.engine.ChatEngine.stream_many`: one reply per entry of
        ``versions``, all requested at once (vLLM batches them); yields the n answer texts so
        far each time one grows (at least once) and returns the n :class:`Reply`.

        Raises:
            ValueError: ``versions`` is empty.
            training.chat_format.ContextTooLongError: the newest message alone does not fit.
            VllmError: the server is unreachable, refused an adapter or failed a reply.
            TimeoutError: not finished within ``timeout_s`` (the requests are stopped).
        """
        sampling, stop_event, ids = self._begin(messages, versions, sampling, stop_event)
        with self._lock:
            for v in versions:
                self._in_use[v] = self._in_use.get(v, 0) + 1
        try:
            names = [self.adapter_name(v) for v in versions]  # fixed for the whole reply
            arrived, ended = threading.Event(), threading.Event()
            inboxes = [Inbox(arrived, ended) for _ in versions]
            seeds = [None if sampling.seed is None else sampling.seed + i for i in range(len(versions))]
            for name, inbox, seed in zip(names, inboxes, seeds, strict=True):
                threading.Thread(target=self._run, args=(self._request_body(name, ids, sampling, seed), inbox,
                                                         stop_event), daemon=True, name="vllm-reply").start()
            raws, finishes = yield from self._merge(inboxes, arrived, stop_event, timeout_s)
        finally:
            with self._lock:
                for v in versions:
                    self._in_use[v] -= 1
        replies = [self._reply(raw, finish, sampling, v) for raw, finish, v in zip(raws, finishes, versions, strict=True)]
        if not any(raws):  # a stream yields at least once
            yield [r.text for r in replies]
        return replies

    def _merge(self, inboxes: list[Inbox], arrived: threading.Event, stop_event: threading.Event,
               timeout_s: float | None):
        """Yield the answers so far whenever one grows; return ``(raw texts, finishes)``."""
        raws, finishes = [""] * len(inboxes), [None] * len(inboxes)
        shown = [""] * len(inboxes)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while any(f is None for f in finishes):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{len(inboxes)} answers not finished within {timeout_s:.0f} s")
                arrived.wait(1.0)
                arrived.clear()
                for i, inbox in enumerate(inboxes):
                    for kind, value in inbox.drain():
                        if kind == "error":
                            raise value
                        if kind == "done":
                            finishes[i] = value
                        else:
                            raws[i] += value
                answers = [split_reasoning(r)[0] for r in raws]
                if answers != shown:
                    shown = answers
                    yield list(shown)
        finally:
            if any(f is None for f in finishes):  # the reader went away, an error or a timeout
                stop_event.set()
        return raws, finishes

    def _reply(self, raw: str, finish: str, sampling: Sampling, version: int) -> Reply:
        answer, reasoning = split_reasoning(raw, partial=False)
        return Reply(text=inert_text(self.tokenizer, answer.strip()), version=version, stopped=finish == "stopped",
                     sampling=sampling.as_dict(), finish=finish, reasoning=reasoning)

    def member_scores(self, messages: list[dict], answers: list[str]):
        """None: the reward model's ensemble is not served through vLLM (pairs are drawn at random)."""
        return None

    def close(self) -> None:
        """Close the HTTP client (the server and its adapters stay)."""
        self.client.close()


CPU_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "vllm-cpu.sh"


def start_cpu_server(model: str, port: int, log_path: str | Path, *flags: str,
                     timeout_s: float = 300.0) -> subprocess.Popen:
    """Start ``scripts/vllm-cpu.sh MODEL PORT FLAGS`` (a vllm-cpu server, its output to
    ``log_path``) in a session of its own and wait until it lists its model; stop it with
    :func:`stop_server`. For tests and benchmarks on this machine.

    Raises:
        VllmError: it exited or did not answer within ``timeout_s`` (its log says why).
    """
    log_file = open(log_path, "w")  # noqa: SIM115 - the child holds it; closed with stop_server
    proc = subprocess.Popen(["bash", str(CPU_SCRIPT), str(model), str(port), *flags],
                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_file = log_file
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log_file.close()
            raise VllmError(f"the vLLM server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise VllmError(f"the vLLM server did not start within {timeout_s:.0f} s; see {log_path}")
        time.sleep(1.0)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server of :func:`start_cpu_server` (SIGTERM to its session) and close its log."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log_file = getattr(proc, "log_file", None)
    if log_file is not None:
        log_file.close()


__all__ = ["UNSERVABLE", "VllmEngine", "VllmError", "start_cpu_server", "stop_server"]
