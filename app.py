"""RLHF chat: a chat app that learns from its users' side-by-side votes.

    python app.py                      # offline starter model, UI at http://127.0.0.1:7860
    python app.py --model ORG/NAME     # any causal LM with a chat template (hub id or directory)

Composition root: config → storage → model → engine → scheduler → UI. Nothing else lives here.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from chatapp.service import LimitConfig, PairConfig
from training.flags import (
    add_dataclass_args,
    dataclass_from_args,
    flag_names,
    help_field,
    nested,
    to_argv,
)
from training.models import LoadConfig
from training.round import RoundConfig
from training.starter.build import StarterConfig
from training.user_gate import UserGateConfig

log = logging.getLogger("app")
MAX_UPLOAD = "64kb"  # the largest file Gradio's upload route accepts (the UI has no upload)


@dataclass
class AppConfig:
    """Every flag of ``python app.py``."""

    model: str = help_field("", help="hub id or local directory of a causal LM with a chat template; empty: build/use the offline starter model")
    data_dir: str = help_field("data", help="where the SQLite file, adapters, reward models and the starter live")
    host: str = help_field("127.0.0.1", help="address to bind; 0.0.0.0 opens the app to the network")
    port: int = help_field(7860, help="port of the web UI")
    auth: str = help_field("", help="USER:PASS: admin actions (Train now, rollback, export) need this login; chat stays open (other local users can read it in ps: prefer --auth-file)")
    auth_file: str = help_field("", help="file of USER:PASS lines, one admin each (with or instead of --auth)")
    concurrency: int = help_field(8, help="requests served at once: the Gradio queue's concurrency per action, and the most replies decoded together in one batch")
    train_every: float = help_field(10.0, help="minutes between checks for a scheduled training round")
    min_new_votes: int = help_field(20, help="new votes needed before a scheduled round starts")
    no_train: bool = help_field(False, help="serve only: no scheduler, no Train now")
    backend: str = help_field("transformers", choices=["transformers", "vllm"],
                              help="who decodes replies: this process (transformers) or a vLLM server (--vllm-url)")
    vllm_url: str = help_field("http://127.0.0.1:8000", help="the vLLM OpenAI-compatible server of --backend vllm "
                               "(scripts/vllm-cpu.sh MODEL PORT starts one on the CPU)")
    round_launcher: str = help_field(
        "", help='start each round\'s processes with this launcher for data-parallel training, e.g. '
        '"torchrun --nproc_per_node 2" or "accelerate launch --multi_gpu --num_processes 2" (empty: one process)')
    temperature: float = help_field(0.8, help="sampling temperature of plain chat replies (0: greedy)")
    compare_temperature: float = help_field(1.0, help="sampling temperature of the two answers of a comparison (1: the distribution PPO trains on)")
    distinct_redraws: int = help_field(2, help="a comparison's B answer that repeats A word for word is drawn again up to this many times (identical pairs teach the reward model nothing)")
    top_p: float = help_field(0.95, help="nucleus sampling mass of chat replies")
    max_new_tokens: int = help_field(128, help="reply length limit in tokens")
    threads: int = help_field(1, help="torch CPU threads for chat (the training child uses all cores but one by default)")
    load: LoadConfig = nested(LoadConfig, flat=True, help="how the base is loaded, for serving and for training rounds")
    pairs: PairConfig = nested(PairConfig, flat=True, help="which two answers a comparison shows")
    limits: LimitConfig = nested(LimitConfig, flat=True, help="message, system prompt and conversation sizes; vote rates")
    user_gate: UserGateConfig = nested(UserGateConfig, flat=True, help="users' votes decide whether a candidate goes live")
    round: RoundConfig = nested(
        RoundConfig, help="every training round (python -m training.jobs, run by the app in a child process); "
        "e.g. --round.min-votes 20 --round.gate.enabled false --round.rs.n 8",
        set_by_parent=("data_dir", "model", "load", "user_gate"))
    starter: StarterConfig = nested(
        StarterConfig, help="recipe of the offline starter model, built in DATA/starter when there is no --model and "
        "the data dir has no starter yet (one already built is kept); e.g. --starter.sft-steps 600")

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.train_every <= 0:
            raise ValueError(f"--train-every must be > 0 minutes, got {self.train_every}")
        if self.distinct_redraws < 0:
            raise ValueError(f"--distinct-redraws must be >= 0, got {self.distinct_redraws}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        from training.scheduler import launcher_command

        launcher_command(self.round_launcher)  # fail early: a launcher that cannot start a round
        if self.auth:
            from chatapp.auth import parse_credential

            parse_credential(self.auth)  # fail early: USER:PASS

    def round_argv(self, data_dir: str, model: str) -> list[str]:
        """The flags of ``python -m training.jobs`` for the app's rounds: ``self.round`` on
        ``data_dir`` and base ``model`` loaded as the app loads it (``self.load``; absolute
        paths: the child runs in the project directory); with ``--user-gate`` a passing candidate
        is published for users' votes."""
        return to_argv(replace(self.round, data_dir=data_dir, model=model, load=self.load,
                               user_gate=self.user_gate.user_gate))


def torch_threads(n: int) -> None:
    """Set the number of torch intra-op CPU threads used for serving."""
    import torch

    torch.set_num_threads(max(1, n))


def serving_engine(config: AppConfig, model_ref: str, registry):
    """The engine that serves replies: in process (``--backend transformers``: the base loaded
    as ``config.load`` says, at most ``config.concurrency`` replies decoded in one batch) or a
    vLLM server (``--backend vllm --vllm-url``: only the tokenizer here; the base is loaded
    once, on the CPU, when version 0 must be published). Either publishes version 0 when none
    exists.

    Raises:
        training.models.ModelLoadError: the model cannot be loaded.
        chatapp.vllm_engine.VllmError: no usable vLLM server at ``config.vllm_url``.
    """
    if config.backend == "vllm":
        from chatapp.engine import publish_fresh_adapter
        from chatapp.vllm_engine import VllmEngine
        from training.models import load_model_and_tokenizer, load_tokenizer

        tokenizer = load_tokenizer(model_ref, config.load.chat_template)
        engine = VllmEngine(config.vllm_url, tokenizer, registry)  # the server first: fail before loading anything
        if registry.store.live_version() is None:
            base, _ = load_model_and_tokenizer(model_ref, device="cpu")
            publish_fresh_adapter(base, registry)
            del base
        if Path(engine.served_model).name != Path(model_ref).name:
            log.warning("the vLLM server serves %s, the app's base model is %s: adapters fit only their own base",
                        engine.served_model, model_ref)
        return engine
    from chatapp.engine import ChatEngine

    model, tokenizer = config.load.load(model_ref)
    return ChatEngine(model, tokenizer, registry, max_batch=config.concurrency)


def chat_service(config: AppConfig, engine, store):
    """The chat service over ``engine`` (:func:`serving_engine`), with the app's sampling
    settings for plain replies and for comparisons."""
    from chatapp.engine import Sampling
    from chatapp.service import ChatService

    sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens)
    compare_sampling = Sampling(config.compare_temperature, 1.0, config.max_new_tokens)
    return ChatService(engine, store, sampling, compare_sampling=compare_sampling,
                       distinct_redraws=config.distinct_redraws, user_gate=config.user_gate, pairs=config.pairs,
                       limits=config.limits)


def build_app(config: AppConfig):
    """Wire storage, model, engine, scheduler and UI; returns ``(demo, scheduler)``.

    The scheduler is not started; :meth:`TrainingScheduler.start` makes it the one scheduler
    of ``config.data_dir`` (a second app on the same directory stays on standby).

    Raises:
        training.models.ModelLoadError: the model cannot be loaded.
        ValueError, OSError: a malformed or unreadable ``--auth-file``.
    """
    from chatapp.auth import AdminAuth
    from chatapp.ui import UIParts, build_ui
    from storage.paths import DataDir, DataDirError
    from storage.registry import AdapterRegistry, clean_staging
    from storage.store import open_store
    from training.models import load_tokenizer
    from training.round_start import skip_reason
    from training.scheduler import TrainingScheduler, subprocess_round

    admin = AdminAuth.from_options(config.auth, config.auth_file)
    data_dir = DataDir(config.data_dir).create()  # absolute: the training child runs in the project directory
    if config.model:
        model_ref = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
    else:
        from training.starter.build import ensure_starter

        model_ref = str(ensure_starter(data_dir.starter, config.starter, progress=True))
    load_tokenizer(model_ref, config.load.chat_template)  # a bad --model fails here, before anything is written
    try:
        data_dir.check_model(model_ref)
    except DataDirError as exc:
        raise SystemExit(f"error: {exc}") from None
    data_dir.record_model(model_ref)
    store = open_store(data_dir)
    store.fail_stale_rounds("the app stopped while this round was running")  # not one a live process runs
    registry = AdapterRegistry(data_dir, store)
    if store.running_round() is None:  # what a live round is writing stays
        clean_staging(data_dir)
    service = chat_service(config, serving_engine(config, model_ref, registry), store)
    scheduler = None
    if not config.no_train:
        round_fn = subprocess_round(config.round_argv(str(data_dir.root), model_ref), data_dir, store,
                                    launcher=config.round_launcher)
        scheduler = TrainingScheduler(round_fn, store, config.train_every, config.min_new_votes,
                                      lock_path=data_dir.scheduler_lock,
                                      preflight=partial(skip_reason, store, config.round.min_votes))
    demo = build_ui(UIParts(service=service, registry=registry, scheduler=scheduler, admin=admin,
                            **starter_hints(model_ref)))
    demo.rlhf_store = store  # closed by main() on shutdown: chat.db then holds everything (no WAL left)
    return demo, scheduler


def starter_hints(model_ref: str) -> dict:
    """The Chat tab's example prompts and one-line note when ``model_ref`` is a starter build
    (a directory with ``starter.json``): what it was trained to do, and that it is a demo.
    Empty for any other model (the app cannot know what it handles)."""
    from training.starter.build import STARTER_JSON

    if not (Path(model_ref) / STARTER_JSON).is_file():
        return {}
    from training.starter.vocab import EXAMPLE_PROMPTS

    return {
        "examples": tuple(EXAMPLE_PROMPTS),
        "model_note": "The offline starter is a tiny demo model: small sums, capitals and units, word games, "
                      "remembering what you tell it, and a system prompt that gives it a name, a persona or "
                      "an answer style; start the app with `--model` for a real one.",
    }


def launch(demo, config: AppConfig, block: bool = True, warn: bool = True):
    """Serve ``demo`` on ``config.host:config.port`` with the app's queue settings; with
    ``block=False`` return once it serves (tests; ``main`` then prints the address and waits).
    With ``warn``, warns when the app is reachable from the network while admin actions are open.

    Raises:
        OSError: the port is taken.
    """
    loopback = config.host in ("127.0.0.1", "localhost", "::1")
    if warn and not loopback and not (config.auth or config.auth_file):
        log.warning(
            "serving on %s without --auth: anyone who can reach it can train, roll back and "
            "export every vote; pass --auth USER:PASS", config.host,
        )  # fmt: skip
    demo.queue(default_concurrency_limit=config.concurrency)
    return demo.launch(
        server_name=config.host,
        server_port=config.port,
        # the app's own routes (the one-time vote export) come before Gradio's
        app_kwargs={"routes": list(getattr(demo, "rlhf_routes", []))},
        max_file_size=MAX_UPLOAD,  # no component takes uploads: Gradio's upload route gets nothing big
        show_error=False,  # unexpected errors: a generic message to users, details in the log
        prevent_thread_lock=not block,
        quiet=True,  # main() prints the one line with the address
        **getattr(demo, "rlhf_launch_kwargs", {}),
    )


READY_STAGE = "starting the chat"  # the starting page's last stage: the built model is being loaded


def build_starter_first(config: AppConfig):
    """On a data dir's first run without ``--model`` (no complete starter in ``DATA/starter``):
    serve :class:`chatapp.starting.StartingPage` on the app's address, print the address once
    it answers, and build the starter there (``config.starter``) in this thread, its progress
    shown on the page. Returns the page, still serving at its last stage (:data:`READY_STAGE`):
    the caller closes it right before launching the app on the same port. Returns ``None``,
    starting nothing, when no build is needed or ``--model`` is given.

    Ctrl-C (or SIGTERM, see :func:`main`) during the build closes the page and re-raises;
    the build leaves nothing half-written (:func:`training.starter.build.build_starter`).

    Raises:
        SystemExit: the data dir was made for another base model (said before building).
        OSError: the port is taken.
    """
    if config.model:
        return None
    from storage.paths import DataDir, DataDirError
    from training.starter.build import STAGES, ensure_starter, starter_problem

    data_dir = DataDir(config.data_dir).create()
    if starter_problem(data_dir.starter) is None:
        return None
    try:
        data_dir.check_model(str(data_dir.starter))
    except DataDirError as exc:
        raise SystemExit(f"error: {exc}") from None
    from chatapp.starting import StartingPage

    page = StartingPage((*STAGES, READY_STAGE))
    try:
        launch(page.demo, config, block=False)
        print(f"RLHF chat on http://{config.host}:{config.port}", flush=True)  # once it answers
        ensure_starter(data_dir.starter, config.starter, progress=True, on_progress=page.report)
        page.report(READY_STAGE, 0, 1)
    except BaseException:
        page.demo.close(verbose=False)
        raise
    return page


def main(argv: list[str] | None = None) -> int:
    """Parse flags, build the app and serve it until interrupted; exit code 2 on bad input."""
    parser = argparse.ArgumentParser(usage="%(prog)s [options]",
                                     description="RLHF chat: chat, compare, vote; the model learns online.")
    add_dataclass_args(parser, AppConfig)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = set(flag_names(AppConfig))
        rounds = [u for u in unknown if "--round." + u.split("=", 1)[0][2:] in known]
        hint = (f"; settings of the training rounds are --round.*: {', '.join('--round.' + u[2:] for u in rounds)}"
                if rounds else "; settings of the training rounds are --round.* (see --help)")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    try:
        config = dataclass_from_args(AppConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    from chatapp.auth import AdminAuth

    try:
        AdminAuth.from_options(config.auth, config.auth_file)  # a bad --auth-file fails here
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from chatapp.vllm_engine import VllmError
    from training.console import quiet_library_noise
    from training.models import ModelLoadError

    quiet_library_noise()
    # SIGTERM (systemd, docker stop, kill) shuts down like Ctrl-C: during a first run's starter
    # build, the build stops with nothing half-written; while serving, the server closes, a
    # running training child is stopped (its round recorded as failed) and the data-dir lock released
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    starting = None
    try:
        torch_threads(config.threads)
        starting = build_starter_first(config)  # a first run: the UI answers while the starter is built
        demo, scheduler = build_app(config)
    except (ModelLoadError, VllmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped before the chat was ready", flush=True)  # an unfinished starter build left nothing
        return 0
    finally:
        if starting is not None:
            starting.demo.close(verbose=False)  # the app takes the port over
    if scheduler is not None:
        scheduler.start()
    try:
        launch(demo, config, block=False, warn=starting is None)  # the starting page warned already
        if starting is None:
            print(f"RLHF chat on http://{config.host}:{config.port}", flush=True)  # once it answers
        else:
            print(f"the starter model is ready: chat on http://{config.host}:{config.port} "
                  "(an open page reloads into it)", flush=True)
        demo.block_thread()
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM while Gradio was still starting up (before its
        demo.close()  # own wait loop, which handles it, took over): the same clean shutdown
    finally:
        if scheduler is not None:
            scheduler.shutdown()
        demo.rlhf_store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
