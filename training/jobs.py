"""One training round: votes → reward model → KL-regularized PPO on the LoRA adapter → publish.

Run it by hand (the app's scheduler runs exactly this, in a child process):

    python -m training.jobs --data-dir data --model data/starter

Steps, each recorded in the ``training_rounds`` table:
  1. read the votes; fewer A/B votes than ``min_votes`` → the round is skipped, reason recorded;
  2. train the reward model (warm-started from the previous round's, and one from the base
     weights: the more accurate on the held-out votes is the candidate) on all votes; it
     replaces the previous one only if at least as accurate;
  3. from the live adapter (``--init-policy reference``: a fresh adapter on the reference
     policy): rejection-sampling fine-tuning on the reward model's best of ``--rs.n`` answers
     per prompt (training.rejection; ``--rs.n 1``: off), then PPO against its normalised score
     (with ``--ppo.ptx-coef``: PPO-ptx on demonstrations, the starter's SFT corpus or ``--ptx-data``);
  4. write the new adapter to a staging directory, then rename it into place as version N+1
     and make it live (the serving engine picks it up at its next reply).
A round that raises is recorded as failed with the reason; nothing half-written is published.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from storage.db import Store, open_store
from storage.registry import AdapterRegistry
from training.cli import add_dataclass_args, dataclass_from_args, help_field
from training.gate import GateConfig, rm_accuracy_check, run_gate
from training.models import (
    add_lora,
    context_window,
    fit_prompts,
    load_lora,
    load_model_and_tokenizer,
    quiet_optional_kernel_notice,
    save_adapter,
)
from training.ppo import PPOConfig, ppo_train
from training.rejection import RejectionConfig, rejection_sampling_finetune
from training.reward import (
    NotEnoughVotesError,
    RewardConfig,
    RewardModel,
    make_reward_fn,
    train_reward_model,
)

log = logging.getLogger(__name__)

ADAPTERS_DIRNAME = "adapters"
REWARD_DIRNAME = "reward"


@dataclass
class RoundConfig:
    """Settings of one training round (flags of ``python -m training.jobs``)."""

    data_dir: str = help_field("data", help="directory holding chat.db, adapters/ and reward/")
    model: str = help_field("", help="base model: hub id or local directory (the policy's base)")
    min_votes: int = help_field(10, help="fewest A/B votes (ties excluded) needed to train")
    max_prompts: int = help_field(256, help="most prompts from stored conversations used for PPO")
    threads: int = help_field(0, help="torch CPU threads for training (0: all but one core)")
    seed: int = help_field(0, help="random seed of the round")
    gate_enabled: bool = help_field(True, help="promote only candidates that pass the gate (training.gate)")
    rm_fresh_candidate: bool = help_field(
        True, help="also train a reward model from the base weights each round; the more accurate of "
        "it and the warm-started one (same held-out votes) is the round's candidate")
    init_policy: str = help_field(
        "live", choices=["reference", "live"],
        help="where PPO starts each round: the live adapter (rounds compound; version 0 is a fresh one), "
        "or a fresh adapter on the reference (SFT) policy",
    )
    ptx_data: str = help_field(
        "", help="JSONL of demonstration conversations (python -m training.sft's format) for PPO-ptx "
        "(--ppo.ptx-coef); empty: the starter's own SFT corpus when the model is the starter, else none")
    ptx_examples: int = help_field(2000, help="most demonstration conversations used for PPO-ptx")
    reward: RewardConfig = field(default_factory=RewardConfig)
    rs: RejectionConfig = field(default_factory=RejectionConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self):
        if self.min_votes < 1:
            raise ValueError(f"min_votes must be >= 1, got {self.min_votes}")
        if self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.ptx_examples < 1:
            raise ValueError(f"ptx_examples must be >= 1, got {self.ptx_examples}")
        if self.init_policy not in ("reference", "live"):
            raise ValueError(f"init_policy must be 'reference' or 'live', got {self.init_policy!r}")
        self.reward.min_votes = self.min_votes  # one knob: --min-votes


def ptx_demonstrations(config: RoundConfig, tokenizer, max_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Demonstrations for PPO-ptx as ``(ids, labels)`` (loss on assistant tokens only): the
    conversations of ``config.ptx_data``, or, without it, the starter's SFT corpus when
    ``config.model`` is a starter directory (regenerated from its recipe, not stored); else
    none. At most ``config.ptx_examples``; none when ``config.ppo.ptx_coef`` is 0. Conversations
    longer than ``max_tokens`` (the model's context window) are left out, with a log line.

    Raises:
        training.sft.SftDataError: ``ptx_data`` is missing, empty or holds no valid conversation.
    """
    if config.ppo.ptx_coef <= 0:
        return []
    from training.starter.build import STARTER_JSON
    from training.starter.loop import encode_conversation

    if config.ptx_data:
        from training.sft import read_conversations

        conversations, _bad = read_conversations(config.ptx_data)
    elif (Path(config.model) / STARTER_JSON).is_file():
        from training.starter.corpus import generate_conversations

        conversations = [c["messages"] for c in generate_conversations(config.seed + 1_000, config.ptx_examples)]
    else:
        log.info("PPO-ptx off: no --ptx-data and the model is not the starter")
        return []
    out, too_long = [], 0
    for messages in conversations[: config.ptx_examples]:
        try:
            ids, labels = encode_conversation(tokenizer, messages)
        except ValueError:
            continue  # no assistant tokens under this template: nothing to learn from
        if max_tokens is not None and len(ids) > max_tokens:
            too_long += 1
            continue
        out.append((ids, labels))
    if too_long:
        log.warning("PPO-ptx: %d demonstration(s) longer than the %d-token context window left out", too_long, max_tokens)
    return out


def preference_pairs(store: Store) -> list[dict]:
    """The votes as reward-model pairs: ``{"conversation_id", "prompt", "chosen", "rejected",
    "tie"}``. A/B votes give chosen/rejected; ties give ``tie=True`` (order irrelevant);
    "both bad" votes are stored but left out of the loss."""
    pairs = []
    for c in store.voted_comparisons():
        if c["choice"] == "both_bad":
            continue
        a, b = c["answer_a"], c["answer_b"]
        chosen, rejected = (b, a) if c["choice"] == "b" else (a, b)
        pairs.append(
            {
                "conversation_id": c["conversation_id"],
                "prompt": c["context"],
                "chosen": chosen,
                "rejected": rejected,
                "tie": c["choice"] == "tie",
            }
        )
    return pairs


def split_prompts(prompts: list[dict], heldout_fraction: float, seed: int) -> tuple[list, list]:
    """Split ``{"conversation_id", "messages"}`` prompts by conversation (never by row) into
    PPO prompts and held-out gate prompts; both are lists of message lists. When a side would
    be empty, both use all prompts."""
    from training.reward import split_by_conversation

    train, heldout = split_by_conversation(prompts, heldout_fraction, seed)
    train_msgs = [p["messages"] for p in train]
    heldout_msgs = [p["messages"] for p in heldout]
    if not train_msgs or not heldout_msgs:
        everything = [p["messages"] for p in prompts]
        return everything, everything
    return train_msgs, heldout_msgs


def _last_kl_coef(store: Store) -> float | None:
    """β at the end of the newest round that trained (succeeded or rejected), if any."""
    for r in store.rounds(limit=20):
        beta = (r.get("metrics") or {}).get("objective/kl_coef")
        if r["status"] in ("succeeded", "rejected") and isinstance(beta, (int, float)) and beta > 0:
            return float(beta)
    return None


def starting_policy(model, config: RoundConfig, registry: AdapterRegistry, live: int):
    """The model with the adapter ``"policy"`` that a round trains, active: a fresh LoRA on the
    reference policy (``config.init_policy == "reference"``, B = 0 so it starts as the SFT
    model) or a trainable copy of version ``live``'s adapter (``"live"``).

    Raises:
        storage.registry.UnknownVersion (a ``KeyError``) / FileNotFoundError: ``"live"``, and
            version ``live`` is not registered / has no adapter files (``AdapterRegistry.path``).
    """
    if config.init_policy == "reference":
        return add_lora(model, adapter_name="policy")
    return load_lora(model, registry.path(live), adapter_name="policy", trainable=True)


def improve_policy(policy, tokenizer, reward_fn, prompts: list[list[dict]], config: RoundConfig,
                   window: int | None = None) -> dict:
    """Step 3 of a round: rejection-sampling fine-tuning (when ``config.rs.n`` > 1), then PPO
    against ``reward_fn``, both on the active adapter of ``policy`` (trained in place).

    Args:
        prompts: conversations ending with a user turn (already fitted to the context window).
        window: the model's context window in tokens (longer PPO-ptx demonstrations are left out).

    Returns:
        the ``rs/*`` metrics (if any) and :func:`training.ppo.ppo_train`'s metrics.
    """
    rs_metrics, ppo_config = {}, config.ppo
    if config.rs.enabled:  # best-of-n distillation first (Llama 2's rejection sampling)
        rs_metrics = rejection_sampling_finetune(policy, tokenizer, reward_fn, prompts, config.rs)
        if "rs/kl" in rs_metrics and ppo_config.adaptive_kl:
            # PPO's KL target counts from where rejection sampling left the policy: without
            # this the controller reads that drift as PPO overshooting and β climbs round
            # after round (measured: 0.26 → 0.9 over five rounds, against 0.10-0.14 without it)
            ppo_config = replace(ppo_config, kl_target=ppo_config.kl_target + max(0.0, rs_metrics["rs/kl"]))
            rs_metrics["rs/ppo_kl_target"] = ppo_config.kl_target
    ppo_metrics = ppo_train(policy, tokenizer, reward_fn, prompts, ppo_config,
                            ptx_examples=ptx_demonstrations(config, tokenizer, max_tokens=window))
    return {**rs_metrics, **ppo_metrics}


def run_round(config: RoundConfig, store: Store, registry: AdapterRegistry, trigger: str = "manual") -> dict:
    """Run one training round and record it; never raises for a failed round.

    Returns:
        the round's row as recorded: ``{"id", "status", "reason", "metrics", "settings",
        "version", …}`` (``settings``: this ``config`` as a dict) with status ``succeeded``,
        ``rejected`` (the gate said no), ``skipped`` or ``failed``.

    Raises:
        storage.RoundAlreadyRunning: another round is recorded as running.
    """
    settings = asdict(config)  # as configured; β at the start carries over from the last round
    round_id = store.start_round(trigger, settings=settings)
    log.info("round %s settings: %s", round_id, json.dumps(settings, sort_keys=True))
    staging: Path | None = None
    rm_staging: Path | None = None
    try:
        # 1. votes and prompts
        pairs = preference_pairs(store)
        n_ab = sum(1 for p in pairs if not p["tie"])
        if n_ab < config.min_votes:
            reason = f"too few votes: {n_ab} A/B votes, need at least {config.min_votes} (--min-votes)"
            store.finish_round(round_id, "skipped", reason=reason, votes_used=len(pairs))
            return store.round(round_id)
        stored = store.prompts(limit=config.max_prompts)
        if not stored:
            store.finish_round(round_id, "skipped", reason="no stored conversations to take prompts from")
            return store.round(round_id)
        ppo_prompts, gate_prompts = split_prompts(stored, config.reward.heldout_fraction, config.seed)
        live = store.live_version()
        if live is None:
            raise RuntimeError("no live policy version to train from")
        torch.manual_seed(config.seed)

        # 2. reward model from the base weights, warm-started from the last one; it replaces
        #    the last one only if at least as accurate on the same held-out split
        model, tokenizer = load_model_and_tokenizer(config.model)
        # the serving rule for long conversations: oldest whole turns dropped until it fits
        window = context_window(model)
        ppo_prompts = fit_prompts(tokenizer, ppo_prompts, window, config.ppo.max_new_tokens)
        gate_prompts = fit_prompts(tokenizer, gate_prompts, window, config.gate.max_new_tokens)
        if not ppo_prompts or not gate_prompts:
            reason = "no stored prompt fits the context window"
            store.finish_round(round_id, "skipped", reason=reason, votes_used=len(pairs))
            return store.round(round_id)
        rm_root = Path(config.data_dir) / REWARD_DIRNAME
        latest = rm_root / "latest"
        init_dir = latest if (latest / "reward_model.json").is_file() else None
        try:
            rm, rm_metrics = train_reward_model(config.model, tokenizer, pairs, config.reward, init_dir=init_dir)
        except NotEnoughVotesError as exc:
            store.finish_round(round_id, "skipped", reason=f"too few votes: {exc}", votes_used=len(pairs))
            return store.round(round_id)
        if init_dir is not None and config.rm_fresh_candidate:
            # a warm start keeps fitting the earliest votes round after round; a model trained
            # from the base on all votes competes with it on the same held-out votes
            fresh, fresh_metrics = train_reward_model(config.model, tokenizer, pairs, config.reward)
            warm_acc, fresh_acc = rm_metrics.get("rm/accuracy"), fresh_metrics.get("rm/accuracy")
            rm_metrics["rm/warm_accuracy"], rm_metrics["rm/fresh_accuracy"] = warm_acc, fresh_acc
            if fresh_acc is not None and warm_acc is not None and fresh_acc > warm_acc:
                fresh_metrics["rm/prev_accuracy"] = rm_metrics["rm/prev_accuracy"]  # same split
                fresh_metrics.update({k: rm_metrics[k] for k in ("rm/warm_accuracy", "rm/fresh_accuracy")})
                rm, rm_metrics = fresh, fresh_metrics
            rm_metrics["rm/from_scratch"] = float(rm is fresh)
            del fresh  # a losing model (a whole copy of the base) is freed now, not after PPO
        prev_acc, new_acc = rm_metrics.get("rm/prev_accuracy"), rm_metrics.get("rm/accuracy")
        keep_new = init_dir is None or not (new_acc is not None and prev_acc is not None and new_acc < prev_acc)
        rm_metrics["rm/replaced"] = float(keep_new)
        if keep_new:
            rm_staging = rm_root / f".staging-{round_id}"
            shutil.rmtree(rm_staging, ignore_errors=True)
            rm.save(rm_staging)
        else:
            rm = RewardModel.load(config.model, init_dir)
        reward_fn = make_reward_fn(rm, tokenizer)

        # 3. rejection sampling (if on), then PPO, against the newest reward model; reference =
        #    adapter disabled. By default the policy continues the live adapter, so rounds
        #    compound and each round's votes are sampled from the policy the last round made
        #    (bench.online_loop, correctness annotator, 300 votes: 0.77 and 0.79 against
        #    0.72-0.76 when every round started afresh from the reference). The KL to the
        #    reference stays bounded: β carries over from the last round that trained, so the KL
        #    controller keeps adapting across rounds, and the gate bounds the candidate's KL.
        previous_beta = _last_kl_coef(store)
        if previous_beta is not None and config.ppo.adaptive_kl:  # the caller's config is left as it is
            config = replace(config, ppo=replace(config.ppo, init_kl_coef=previous_beta))
        policy = starting_policy(model, config, registry, live)
        metrics = {**rm_metrics, **improve_policy(policy, tokenizer, reward_fn, ppo_prompts, config, window),
                   "objective/kl_coef_start": config.ppo.init_kl_coef}

        # 4. gate: candidate vs live on held-out prompts, judged by the reward model
        passed, reason = True, ""
        if config.gate_enabled:
            load_lora(policy, registry.path(live), adapter_name="live")
            result = run_gate(policy, tokenizer, reward_fn, gate_prompts, config.gate, "policy", "live")
            metrics.update(result.metrics)
            passed, reason = result.passed, result.reason
            rm_acc = new_acc if keep_new else prev_acc  # both on the same held-out votes
            weak = rm_accuracy_check(rm_acc, int(rm_metrics.get("rm/heldout_decisive", 0)), config.gate)
            if weak:
                passed = False
                reason = f"{reason}; {weak}" if reason else weak

        # 5. publish: staging dir → renamed into place as version N+1
        staging = registry.staging_dir()
        save_adapter(policy, "policy", staging)
        version = registry.publish(staging, parent=live, round_id=round_id, metrics=metrics, live=passed)
        staging = None
        if not passed:
            store.set_version_status(version, "rejected")
        if rm_staging is not None:
            if latest.exists():
                shutil.rmtree(latest)
            rm_staging.rename(latest)
            rm_staging = None
        store.finish_round(
            round_id,
            "succeeded" if passed else "rejected",
            reason=reason,
            metrics=metrics,
            version=version,
            votes_used=len(pairs),
        )
    except Exception as exc:  # noqa: BLE001 - recorded; the scheduler keeps running
        log.error("training round %s failed:\n%s", round_id, traceback.format_exc())
        if staging is not None:
            registry.discard(staging)
        if rm_staging is not None:
            shutil.rmtree(rm_staging, ignore_errors=True)
        store.finish_round(round_id, "failed", reason=f"{exc.__class__.__name__}: {exc}")
    return store.round(round_id)


def _parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    # no abbreviations: "--data x" among the app's extra flags must not pass for --data-dir
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], exit_on_error=exit_on_error,
                                     allow_abbrev=False)
    add_dataclass_args(parser, RoundConfig)
    parser.add_argument("--trigger", default="manual", help="recorded with the round")
    return parser


# set by the app for every round (--reward.min-votes is overwritten by --min-votes)
APP_ROUND_FLAGS = ("--data-dir", "--model", "--min-votes", "--reward.min-votes", "--seed", "--gate-enabled", "--trigger")


def parse_round_flags(flags: list[str]) -> RoundConfig:
    """Check extra flags the app passes to every round (``python app.py --round-args``) the way
    ``python -m training.jobs`` will read them, so a typo fails at startup, not in every round.

    Returns:
        the :class:`RoundConfig` they give (with the app's own flags at their defaults).

    Raises:
        ValueError: an unknown flag, a bad value, a flag the app sets itself, help flags, or a
            ``--ptx-data`` file that does not exist (the message names the flag).
    """
    taken = [f for f in flags if f.split("=", 1)[0] in APP_ROUND_FLAGS]
    if taken:
        raise ValueError(f"{', '.join(taken)}: the app sets this for every round; use the app's own flag")
    if any(f in ("-h", "--help") for f in flags):
        raise ValueError("for the list of training flags run: python -m training.jobs --help")
    parser = _parser(exit_on_error=False)
    try:
        args, unknown = parser.parse_known_args(flags)
    except argparse.ArgumentError as exc:
        raise ValueError(f"training flag {exc}") from None
    if unknown:
        raise ValueError(f"unknown training flag(s) {' '.join(unknown)}; see python -m training.jobs --help")
    config = dataclass_from_args(RoundConfig, args)
    if config.ptx_data and not Path(config.ptx_data).is_file():
        raise ValueError(f"--ptx-data {config.ptx_data}: no such file")
    return config


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 0 unless the round failed."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_args(RoundConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    if not config.model:
        parser.error("--model is required (a hub id or a local model directory)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quiet_optional_kernel_notice()
    threads = config.threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    store = open_store(config.data_dir)
    registry = AdapterRegistry(Path(config.data_dir) / ADAPTERS_DIRNAME, store)
    result = run_round(config, store, registry, trigger=args.trigger)
    summary = {k: result.get(k) for k in ("id", "status", "reason", "version")}
    print(f"round {summary['id']}: {summary['status']} {summary['reason'] or ''} version={summary['version']}")
    return 1 if result.get("status") == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())

