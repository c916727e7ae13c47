"""Benchmark of the online RLHF loop: simulated users vote through the running app (HTTP), rounds
train, and a gold judgement scores the result (Ziegler et al. 2019; AlpacaFarm, Dubois et al. 2023).

    python -m bench.online_loop --votes 300 --noise 0.1 --annotator bench.annotators:prefers_correct
    python -m bench.online_loop --annotator bench.annotators:prefers_correct=0.5 \
        --annotator bench.annotators:prefers_concise=0.5      # a population of two tastes

What it does:
  1. launches ``python app.py`` on 127.0.0.1 (a temporary data dir unless ``--data-dir``; the
     offline starter model, built once and cached in ``data/starter``, unless ``--model``);
  2. simulated users (one ``gradio_client.Client`` — one browser session — each) take prompts in
     turn: earlier user turns are sent as plain chat, the last one as a side-by-side comparison,
     and the annotator votes (with probability ``--noise`` the vote is flipped: A↔B, a tie becomes
     A or B at random); ``--annotator`` given several times (``MODULE:FUNCTION=WEIGHT``) is a
     population: each vote is cast by one member drawn by weight, and the gold judgement is the
     members' judgements averaged by weight (``bench.annotators.Population``); with
     ``--spam-voter F`` a share F of the turns is taken by one more session that always votes
     against the annotator (``vote_tally["spam"]``), which the rounds' vote hygiene must withstand
     (:mod:`training.voters`);
  3. every ``--round-every`` votes a round is started with "Train now" and awaited (the app
     trains in its child process: reward model → PPO → gate → publish);
  4. the app is stopped and the result evaluated in-process on held-out prompts that no user
     sent: ``gold_win_rate`` (live vs version 0, judged by the annotator without noise: wins + ½
     ties over n), ``gold_win_rate_bon4`` (best of 4 samples of version 0 picked by the final
     reward model vs version 0, judged the same way), ``kl_nats`` (mean per answer, k1, live vs
     reference). Answers are sampled with pure temperature-1 sampling (the distribution PPO
     optimises and whose KL is measured). Each win rate comes with its standard error
     (``gold_win_rate_se``, ``gold_win_rate_bon4_se``; ``bench.gold``). Also: ``gold_win_rate_at``
     (the version live when the vote count reached each of ``--checkpoints``, against version 0),
     ``regressions_promoted`` (promoted versions that the gold judgement finds worse than the
     version they replaced, with every promotion's figure in ``promotions``), ``candidate_votes``
     (votes spent on candidate-vs-live comparisons) and ``selection_share`` (the share of votes
     by the rule that chose the pair).

Prints progress, then one JSON object (also written to ``--json``). Every wait is bounded and
the app (with any training child) is always stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.annotators import Population, join_annotator_flags
from bench.gold import gold_figures
from bench.users import user_turn
from training.flags import add_dataclass_args, dataclass_from_args, help_field, nested, to_argv
from training.round import RoundConfig
from training.scheduler import PROJECT_ROOT
from training.seeds import derive_seed

# simulated users vote as fast as the app answers, all from 127.0.0.1: no human rate applies
UNLIMITED_VOTES = ("--session-vote-rate", "1000000/minute", "--client-vote-rate", "1000000/minute")


@dataclass
class BenchConfig:
    """Flags of ``python -m bench.online_loop``."""

    annotator: str = help_field("bench.annotators:prefers_correct", help="MODULE:FUNCTION[=WEIGHT], (messages, a, b) -> 'a'|'b'|'tie'; "
                                "give it several times for a population (kept here comma-joined)")
    checkpoints: str = help_field("150,300", help="vote counts at which the live version is kept for a gold evaluation (comma-separated)")
    votes: int = help_field(300, help="comparisons voted through the app")
    round_every: int = help_field(100, help="votes between training rounds (Train now, then wait for the round)")
    noise: float = help_field(0.0, help="probability that a vote is flipped")
    prompts: str = help_field("", help="JSONL, one {\"messages\": [...]} a line (default: the starter's held-out prompts)")
    model: str = help_field("", help="base model dir or hub id (default: the offline starter, cached in data/starter)")
    seed: int = help_field(0, help="prompt order, noise, evaluation sampling")
    json: str = help_field("", help="also write the result JSON here")
    port: int = help_field(0, help="app port (0: a free one)")
    data_dir: str = help_field("", help="app data dir (default: a new temporary dir)")
    users: int = help_field(4, help="simulated users (browser sessions), taking prompts in turn")
    spam_voter: float = help_field(0.0, help="share of the votes cast by one more session that always votes against "
                                   "the annotator (an adversarial voter; 0: none)")
    eval_prompts: int = help_field(240, help="held-out prompts for the gold evaluation (the win rate's standard error shrinks as 1/sqrt(n))")
    eval_max_new_tokens: int = help_field(48, help="answer length limit in the evaluation, tokens")
    max_new_tokens: int = help_field(48, help="the app's --max-new-tokens (reply limit)")
    temperature: float = help_field(1.0, help="the app's --temperature for replies and comparisons")
    round_timeout_s: float = help_field(900.0, help="longest wait for one round")
    startup_timeout_s: float = help_field(600.0, help="longest wait for the app to come up")
    threads: int = help_field(1, help="torch threads of the evaluation (0: all cores; on shared cores 1 is fastest)")
    app_threads: int = help_field(1, help="OMP_NUM_THREADS of the app process (0: torch's default, all cores)")
    round_threads: int = help_field(0, help="torch threads of each training round (0: all cores, since the simulated "
                                    "users wait for the round; the app's own default leaves one core to chat; --round.threads wins)")
    round: RoundConfig = nested(RoundConfig, help="the app's --round.* settings of every training round (its seed is --seed)",
                                set_by_parent=("data_dir", "model", "seed"))

    def __post_init__(self):
        if ":" not in self.annotator:
            raise ValueError(f"--annotator must be MODULE:FUNCTION, got {self.annotator!r}")
        try:
            points = [int(c) for c in self.checkpoints.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--checkpoints must be comma-separated vote counts, got {self.checkpoints!r}") from None
        if any(c < 1 for c in points):
            raise ValueError(f"--checkpoints must be >= 1, got {self.checkpoints!r}")
        if self.round_threads < 0:
            raise ValueError(f"--round-threads must be >= 0, got {self.round_threads}")
        for name in ("votes", "round_every", "users", "eval_prompts", "eval_max_new_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("noise", "spam_voter"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")


def load_annotator(spec: str):
    """``"module:function[=weight],..."`` → a :class:`bench.annotators.Population`.

    Raises:
        ValueError: a malformed spec or a missing function.
    """
    return Population([s for s in spec.split(",") if s.strip()])


def load_prompts(config: BenchConfig) -> tuple[list[list[dict]], list[list[dict]]]:
    """``(user prompts, evaluation prompts)``, disjoint. Default: the starter's held-out prompts
    (held-out phrasings and values), users and evaluation drawn with different seeds."""
    if config.prompts:
        with open(config.prompts, encoding="utf-8") as f:
            rows = [json.loads(line)["messages"] for line in f if line.strip()]
        random.Random(config.seed).shuffle(rows)
        n_eval = min(config.eval_prompts, len(rows) // 2)
        if n_eval < 1:
            raise ValueError(f"{config.prompts}: need at least 2 prompts")
        return rows[n_eval:], rows[:n_eval]
    from training.starter.corpus import heldout_prompts

    users = [p["messages"] for p in heldout_prompts(config.seed, max(config.votes, 60))]
    seen = {json.dumps(m) for m in users}
    evals = [p["messages"] for p in heldout_prompts(derive_seed(config.seed, "bench/eval-prompts"), 3 * config.eval_prompts)
             if json.dumps(p["messages"]) not in seen][: config.eval_prompts]
    return users, evals


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the app ---------------------
class App:
    """``python app.py`` in its own process group (so its training child is stopped with it)."""

    def __init__(self, config: BenchConfig, model_ref: str, data_dir: Path, port: int):
        self.url = f"http://127.0.0.1:{port}/"
        from storage.paths import DataDir

        self.data_dir = data_dir
        self.log_path = DataDir(data_dir).app_log
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # the users wait for each round, so it may use every core (a --round.threads given wins)
        round_config = replace(config.round, seed=config.seed,
                               threads=config.round.threads or config.round_threads or os.cpu_count() or 1)
        cmd = [sys.executable, "app.py", "--data-dir", str(data_dir), "--model", model_ref,
               "--host", "127.0.0.1", "--port", str(port), "--train-every", "100000",
               "--min-new-votes", "1000000", "--max-new-tokens", str(config.max_new_tokens),
               "--temperature", str(config.temperature), *UNLIMITED_VOTES,
               *to_argv(round_config, "round.", ("data_dir", "model"))]  # fmt: skip
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
        if config.app_threads:
            env["OMP_NUM_THREADS"] = str(config.app_threads)
        self.proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def wait_up(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"the app did not come up within {timeout_s:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)
        self._log.close()


def wait_for_round(client, before: int, timeout_s: float) -> list | None:
    """Poll /training_status until a round newer than the first ``before`` has finished; its row."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        _, table, _ = client.predict(api_name="/training_status")
        rows = table["data"] if isinstance(table, dict) else table
        if len(rows) > before and rows[0][2] != "running":
            return rows[0]
        time.sleep(3.0)
    return None


def _train_now(client) -> None:
    """Press "Train now" (no admin login: the bench launches the app without ``--auth``)."""
    try:
        client.predict("", "", api_name="/train_now")  # (admin user, password) when the app has them
    except TypeError:
        client.predict(api_name="/train_now")


def drive(config: BenchConfig, app: App, annotator, prompts: list[list[dict]], log) -> dict:
    """Simulated users chat, compare and vote through HTTP, ``config.users`` of them at once
    (each its own browser session); after every ``round_every`` votes a round is started and
    awaited."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    clients = [Client(app.url, verbose=False) for _ in range(config.users)]
    spammer, spam_lock = Client(app.url, verbose=False), threading.Lock()  # one session: one turn at a time
    free = list(range(config.users))
    lock = threading.Lock()
    state = {"votes": 0, "errors": 0, "flipped": 0, "attempts": 0}
    tally = {"a": 0, "b": 0, "tie": 0, "spam": 0}
    rounds: list[dict] = []
    live_at: dict[int, int] = {}
    checkpoints = sorted(int(c) for c in config.checkpoints.split(",") if c.strip())
    t0 = time.time()

    def keep_checkpoints() -> None:  # the version live once the vote count reached each checkpoint
        from storage.store import open_store

        with open_store(app.data_dir) as store:
            for c in checkpoints:
                if c not in live_at and state["votes"] >= c:
                    live_at[c] = store.live_version()

    def task(i: int) -> None:
        with lock:
            k = free.pop()
        rng = random.Random(derive_seed(config.seed, "bench/user", i))
        spam = random.Random(derive_seed(config.seed, "bench/spam", i)).random() < config.spam_voter
        try:
            if spam:
                with spam_lock:
                    user_turn(spammer, prompts[i % len(prompts)], annotator.draw(rng), 1.0, rng)
                choice, flipped = "spam", False
            else:
                choice, flipped = user_turn(clients[k], prompts[i % len(prompts)], annotator.draw(rng),
                                            config.noise, rng)
        except Exception as exc:  # noqa: BLE001 - a failed turn is counted and skipped
            with lock:
                state["errors"] += 1
            log(f"  turn {i} failed: {exc.__class__.__name__}: {str(exc)[:200]}")
            return
        finally:
            with lock:
                free.append(k)
        with lock:
            state["votes"] += 1
            state["flipped"] += int(flipped)
            tally[choice] += 1
            if state["votes"] % 25 == 0:
                log(f"votes {state['votes']}/{config.votes} (a {tally['a']}, b {tally['b']}, "
                    f"tie {tally['tie']}, spam {tally['spam']}, flipped {state['flipped']}) {time.time() - t0:.0f}s")

    with ThreadPoolExecutor(max_workers=config.users) as pool:
        while state["votes"] < config.votes and state["attempts"] < 2 * config.votes:
            if app.proc.poll() is not None:
                raise RuntimeError(f"the app died; see {app.log_path}")
            target = min(config.votes, (state["votes"] // config.round_every + 1) * config.round_every)
            while state["votes"] < target and state["attempts"] < 2 * config.votes:
                n = target - state["votes"]
                first = state["attempts"]
                state["attempts"] += n
                list(pool.map(task, range(first, first + n)))
            since = state["votes"] - sum(r.get("new_votes", 0) for r in rounds)
            if state["votes"] < target or since < config.round.min_votes:
                keep_checkpoints()
                continue
            rec = train_round(clients[0], config.round_timeout_s)
            rec.update({"votes": state["votes"], "new_votes": since})
            rounds.append(rec)
            log(f"round {rec.get('round')} after {state['votes']} votes: {rec['status']} {rec.get('reason') or ''} "
                f"rm_acc={rec.get('rm_accuracy')} reward={rec.get('reward')} kl={rec.get('kl')} "
                f"version={rec.get('version')} ({rec['seconds']}s)")
            keep_checkpoints()
    keep_checkpoints()
    return {"votes": state["votes"], "errors": state["errors"], "flipped": state["flipped"],
            "tally": tally, "rounds": rounds, "drive_s": time.time() - t0, "live_at": live_at}


def train_round(client, timeout_s: float) -> dict:
    """Press "Train now" and wait for the round to finish; its row of the rounds table."""
    t = time.time()
    _, table, _ = client.predict(api_name="/training_status")
    before = len(table["data"] if isinstance(table, dict) else table)
    _train_now(client)
    row = wait_for_round(client, before, timeout_s)
    if row is None:
        return {"status": "timeout", "seconds": round(time.time() - t, 1)}
    return {"round": row[0], "status": row[2], "reason": row[3], "rm_accuracy": row[4],
            "reward": row[5], "kl": row[6], "version": row[7], "seconds": round(time.time() - t, 1)}


# ------------------------------------------------------------------ gold evaluation -------------
def evaluate(config: BenchConfig, model_ref: str, data_dir: Path, annotator, prompts: list[list[dict]], log,
             live_at: dict[int, int] | None = None) -> dict:
    """Gold figures of the live version against version 0 (see the module docstring), of the
    version live at each checkpoint (``live_at``: vote count → version) against version 0, and
    of every promoted version against the version it replaced (its parent; half the prompts)."""
    import torch

    from storage.paths import DataDir
    from storage.registry import AdapterRegistry, RewardModelRegistry
    from storage.store import open_store
    from training.models import load_lora, load_model_and_tokenizer
    from training.reward_model import RewardModel

    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    store = open_store(data_dir)
    registry = AdapterRegistry(DataDir(data_dir), store)
    live = store.live_version()
    model, tokenizer = load_model_and_tokenizer(model_ref)
    policy = load_lora(model, registry.path(0), adapter_name="v0")
    loaded = {0}

    def adapter(version: int) -> str:
        if version not in loaded:
            load_lora(policy, registry.path(version), adapter_name=f"v{version}")
            loaded.add(version)
        return f"v{version}"

    rm_dir = RewardModelRegistry(DataDir(data_dir)).latest()
    rm = RewardModel.load(model_ref, rm_dir) if rm_dir is not None else None
    result = gold_figures(policy, tokenizer, annotator, prompts, adapter(live), "v0", rm=rm, seed=config.seed,
                          max_new_tokens=config.eval_max_new_tokens)
    result["live_version"] = live
    at = {}
    for votes, version in sorted((live_at or {}).items()):
        if version == live:
            fig = result
        elif version == 0:
            fig = {"gold_win_rate": 0.5, "gold_win_rate_se": 0.0, "kl_nats": 0.0}
        else:
            fig = gold_figures(policy, tokenizer, annotator, prompts, adapter(version), "v0", seed=config.seed,
                               max_new_tokens=config.eval_max_new_tokens)
        at[str(votes)] = {"version": version, "gold_win_rate": fig["gold_win_rate"],
                          "gold_win_rate_se": fig["gold_win_rate_se"], "kl_nats": fig["kl_nats"]}
        log(f"after {votes} votes: version {version}, gold {fig['gold_win_rate']:.3f} ± {fig['gold_win_rate_se']:.3f}")
    result["gold_win_rate_at"] = at
    promotions = []
    half = prompts[: max(1, len(prompts) // 2)]
    for v in store.versions():
        if v["version"] == 0 or v["status"] not in ("live", "retired") or v.get("parent") is None:
            continue
        fig = gold_figures(policy, tokenizer, annotator, half, adapter(v["version"]), adapter(v["parent"]),
                           seed=config.seed, max_new_tokens=config.eval_max_new_tokens)
        promotions.append({"version": v["version"], "replaced": v["parent"], "note": v.get("note"),
                           "gold_win_rate": fig["gold_win_rate"], "gold_win_rate_se": fig["gold_win_rate_se"]})
        log(f"promotion of version {v['version']} over {v['parent']}: gold {fig['gold_win_rate']:.3f} "
            f"± {fig['gold_win_rate_se']:.3f}")
    result["promotions"] = promotions
    result["regressions_promoted"] = sum(p["gold_win_rate"] < 0.5 for p in promotions)
    counts = store.selection_counts()
    total = sum(counts.values()) or 1
    result["candidate_votes"] = counts.get("candidate", 0)
    result["selection_share"] = {str(k): n / total for k, n in counts.items()}
    return result


def _round_summary(data_dir: Path) -> dict:
    from storage.rounds import TRAINED_STATUSES
    from storage.store import open_store

    store = open_store(data_dir)
    rounds = store.rounds(limit=1000)
    trained = [r for r in rounds if r["status"] in TRAINED_STATUSES]
    last_acc = next(((r.get("metrics") or {}).get("rm/accuracy") for r in trained), None)
    promoted = [v for v in store.versions() if v["version"] > 0 and v.get("status") in ("live", "retired")]
    return {"rounds": len(trained), "rounds_all": len(rounds), "promoted": len(promoted),
            "rm_accuracy": last_acc,
            "rejections": [r.get("reason") for r in rounds if r["status"] == "rejected"]}


def resolve_model(config, log) -> str:
    """``config.model``, or else the offline starter (built once into data/starter)."""
    if config.model:
        return config.model
    from storage.paths import DataDir
    from training.starter.build import ensure_starter

    path = ensure_starter(DataDir(PROJECT_ROOT / "data").starter, progress=True)
    log(f"starter model: {path}")
    return str(Path(path).resolve())


def _exit_on_sigterm(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")  # runs the finally blocks: the app is stopped


def run(config: BenchConfig) -> dict:
    t_start = time.time()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    annotator = load_annotator(config.annotator)
    user_prompts, eval_prompts = load_prompts(config)
    model_ref = resolve_model(config, log)
    t_setup = time.time() - t_start
    t0 = time.time()
    data_dir = Path(config.data_dir or tempfile.mkdtemp(prefix="bench-online-"))
    port = config.port or _free_port()
    log(f"app on port {port}, data dir {data_dir}; {len(user_prompts)} user prompts, "
        f"{len(eval_prompts)} evaluation prompts; annotator {config.annotator}, noise {config.noise}")
    app = App(config, model_ref, data_dir, port)
    try:
        app.wait_up(config.startup_timeout_s)
        log("app is up")
        driven = drive(config, app, annotator, user_prompts, log)
    finally:
        app.stop()
        log("app stopped")
    summary = _round_summary(data_dir)
    log(f"evaluating on {len(eval_prompts)} held-out prompts")
    gold = evaluate(config, model_ref, data_dir, annotator, eval_prompts, log, driven["live_at"])
    log(f"gold win rate {gold['gold_win_rate']:.3f} ± {gold['gold_win_rate_se']:.3f} (best of 4: "
        f"{gold['gold_win_rate_bon4']:.3f} ± {gold['gold_win_rate_bon4_se']:.3f}), KL {gold['kl_nats']:.2f} nats")
    result = {
        "annotator": str(annotator), "noise": config.noise, "spam_voter": config.spam_voter,
        "votes": driven["votes"], "rounds": summary["rounds"], "promoted": summary["promoted"],
        "gold_win_rate": gold["gold_win_rate"], "gold_win_rate_bon4": gold["gold_win_rate_bon4"],
        "kl_nats": gold["kl_nats"], "rm_accuracy": summary["rm_accuracy"],
        "wall_s": time.time() - t0, "setup_s": t_setup,
        **{k: v for k, v in gold.items() if k not in ("gold_win_rate", "gold_win_rate_bon4", "kl_nats", "examples")},
        "drive_s": driven["drive_s"], "turn_errors": driven["errors"], "flipped_votes": driven["flipped"],
        "vote_tally": driven["tally"], "rounds_detail": driven["rounds"],
        "rejections": summary["rejections"], "examples": gold["examples"],
        "data_dir": str(data_dir), "config": asdict(config),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataclass_args(parser, BenchConfig)
    args = parser.parse_args(join_annotator_flags(list(sys.argv[1:] if argv is None else argv)))
    try:
        config = dataclass_from_args(BenchConfig, args)
        load_annotator(config.annotator)
    except (ValueError, ImportError) as exc:
        parser.error(str(exc))
    result = run(config)
    text = json.dumps(result, default=str)
    if config.json:
        Path(config.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
