"""One training round: votes → reward model → policy → gate → publish.

:func:`run_round` is these steps in order, each a function below with its own docstring:

  1. :func:`load_inputs`        the votes as training pairs (``Store.vote_pairs``) and PPO / gate
                                prompts from stored conversations, split by conversation; too
                                few A/B votes or no prompts → the round is skipped, reason recorded;
  2. :func:`load_model`         the base model, once (``--device``, ``--dtype``, ``--quantize``:
                                the app's); prompts cut to its context window; the starting
                                adapter (:func:`starting_policy`: the live one, or
                                ``--init-policy reference``: a fresh one). The policy, the
                                reference (adapters disabled), the reward models (their own
                                adapters and heads) and the value head share these base weights;
  3. :func:`reward_model_step`  the reward model on the votes (outlier voters excluded, floods
                                capped: :mod:`training.voters`), warm-started from the one in use
                                and (``--rm-fresh-candidate``) one from the base weights: the
                                more accurate on the held-out votes is the candidate; it replaces
                                the one in use only if at least as accurate;
  4. :func:`policy_step`        β and the value head carried over from the live version, then
                                rejection sampling (``--rs.n`` > 1) and PPO against the reward
                                model (with ``--ppo.ptx-coef``: PPO-ptx on demonstrations);
  5. :func:`gate_step`          the candidate against live on held-out prompts, and the reward
                                model's held-out accuracy (:mod:`training.gate`);
  6. :func:`publish_step`       the adapter (and beside it PPO's value head and what changed: the
                                gate's answers of both versions on a few held-out prompts,
                                :func:`storage.versions.write_changes`) renamed into place as
                                version N+1 (live; a candidate for users' votes with
                                ``--user-gate``, :mod:`training.user_gate`; or rejected), the new
                                reward model (with its ensemble) as the one in use.

A round that raises is recorded as failed with the reason; nothing half-written is published.
Run one with ``python -m training.jobs`` (:mod:`training.jobs`).
"""

from __future__ import annotations

import json
import logging
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from storage.registry import AdapterRegistry, RewardModelRegistry
from storage.rounds import TRAINED_STATUSES
from storage.store import Store
from storage.versions import write_changes
from training import distributed
from training.chat_format import fit_prompts
from training.flags import help_field, nested
from training.gate import GateConfig, GateResult, rm_accuracy_check, run_gate
from training.models import (
    LoadConfig,
    active_lora_params,
    add_lora,
    context_window,
    enable_gradient_checkpointing,
    load_lora,
    save_adapter,
    text_config,
    unused_adapter_name,
)
from training.ppo import PPOConfig, ValueHead, ppo_train
from training.preferences import split_prompts
from training.progress import RoundProgress
from training.rejection_sampling import RejectionConfig, rejection_sampling_finetune
from training.reward_model import RewardModel
from training.reward_training import (
    NotEnoughVotesError,
    RewardConfig,
    cross_validated_accuracy,
    make_reward_fn,
    train_reward_model,
)
from training.round_start import SkipRound, check_startable
from training.seeds import derive_seed
from training.sft import ptx_demonstrations
from training.voters import VoterConfig, clean_round_votes

log = logging.getLogger(__name__)


@dataclass
class RoundConfig:
    """Settings of one training round (the flags of ``python -m training.jobs``; the app's ``--round.*``)."""

    data_dir: str = help_field("data", help="the app's data dir (chat.db, adapters/, reward/)")
    model: str = help_field("", help="base model: hub id or local directory (the data dir's base model)")
    min_votes: int = help_field(10, help="fewest A/B votes (ties excluded) needed to train")
    max_prompts: int = help_field(256, help="most prompts from stored conversations used for PPO")
    threads: int = help_field(0, help="torch CPU threads for training (0: all but one core)")
    seed: int = help_field(0, help="the round's seed; every seeded part (split, reward model, sampling, gate) derives its own")
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
    gradient_checkpointing: bool = help_field(
        False, help="recompute activations in the backward pass: less memory for bigger models, about one more "
        "forward pass of compute")
    max_minutes: float = help_field(
        0.0, help="time budget of the round in minutes (0: none): PPO ends at the iteration boundary where the "
        "next iteration would overrun it, and the round gates and publishes what was trained")
    user_gate: bool = help_field(
        False, help="a candidate that passes the gate is published as a candidate, not live: users' votes "
        "against live decide (the app sets this from its --user-gate)")
    carry_value_head: bool = help_field(
        True, help="PPO's value head continues from the one saved with the starting adapter (false: a fresh "
        "zero head every round)")
    conservative_reward: float = help_field(
        0.0, help="λ: PPO's reward is the reward-model ensemble's mean − λ·std (0: the main head's score)")
    load: LoadConfig = nested(LoadConfig, flat=True, help="how the base is loaded (the app passes its own)")
    reward: RewardConfig = nested(RewardConfig, set_by_parent=("min_votes", "seed"))
    voters: VoterConfig = nested(VoterConfig, help="per-voter caps and the outlier test on the reward model's votes")
    rs: RejectionConfig = nested(RejectionConfig, set_by_parent=("seed",))
    ppo: PPOConfig = nested(PPOConfig, set_by_parent=("seed",))
    gate: GateConfig = nested(GateConfig, set_by_parent=("seed",))

    def __post_init__(self):
        if self.min_votes < 1:
            raise ValueError(f"min_votes must be >= 1, got {self.min_votes}")
        if self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.ptx_examples < 1:
            raise ValueError(f"ptx_examples must be >= 1, got {self.ptx_examples}")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0 (0: no budget), got {self.max_minutes}")
        if self.conservative_reward < 0:
            raise ValueError(f"conservative_reward must be >= 0, got {self.conservative_reward}")
        if self.init_policy not in ("reference", "live"):
            raise ValueError(f"init_policy must be 'reference' or 'live', got {self.init_policy!r}")
        if self.ptx_data:
            self.ptx_data = str(Path(self.ptx_data).expanduser().resolve())  # the child runs elsewhere
            if not Path(self.ptx_data).is_file():
                raise ValueError(f"--ptx-data {self.ptx_data}: no such file")
        # one knob each: --min-votes, and --seed for every seeded part of the round
        self.reward = replace(self.reward, min_votes=self.min_votes, seed=derive_seed(self.seed, "reward"))
        self.rs = replace(self.rs, seed=derive_seed(self.seed, "rs"))
        self.ppo = replace(self.ppo, seed=derive_seed(self.seed, "ppo"))
        self.gate = replace(self.gate, seed=derive_seed(self.seed, "gate"))


@dataclass
class RoundInputs:
    """What a round trains on: vote pairs (``Store.vote_pairs``), PPO and held-out gate prompts
    (lists of messages ending with a user turn) and the live version it starts from."""

    pairs: list[dict]
    ppo_prompts: list[list[dict]]
    gate_prompts: list[list[dict]]
    live: int


@dataclass
class RewardStep:
    """The reward model a round uses, and what became of it."""

    rm: RewardModel
    reward_fn: object  # (prompts, answers) -> (B,) raw scores
    metrics: dict  # rm/* figures
    accuracy: float | None  # the gate's figure: cross-validated, or the kept model on the judge half (NaN: none)
    decisive: int  # A/B votes that accuracy is over
    staging: Path | None = field(default=None)  # a new model to publish with the round; None: keep the one in use


def run_round(config: RoundConfig, store: Store, registry: AdapterRegistry, trigger: str = "manual",
              progress_bar: bool = False) -> dict:
    """Run one training round and record it; never raises for a failed round. ``progress_bar``:
    also show PPO's iterations as a tqdm bar on stderr (:class:`training.progress.RoundProgress`;
    ``python -m training.jobs`` turns it on when stderr is a terminal).

    Returns:
        the round's row as recorded: ``{"id", "status", "reason", "metrics", "settings",
        "version", …}`` (``settings``: this ``config`` as a dict) with status ``succeeded``,
        ``rejected`` (the gate said no), ``skipped`` or ``failed``.

    Under ``torchrun`` (:mod:`training.distributed`) every rank runs this; rank 0 alone writes
    ``store``, gates and publishes, and the others return its row, with ``adapter_digest`` (the
    trained adapter's :func:`training.distributed.tensor_digest`, this rank's) added on each.
    A failure on a rank other than 0 raises there (its launcher then stops the round).

    Raises:
        storage.errors.RoundAlreadyRunning: another round is recorded as running.
    """
    main = distributed.is_main()
    round_id = distributed.on_main(store.start_round, trigger, settings=asdict(config))
    log.info("round %s settings: %s", round_id, json.dumps(asdict(config), sort_keys=True))
    progress = RoundProgress(store if main else None, round_id, config.max_minutes, bar=progress_bar and main)
    reward_models = RewardModelRegistry(registry.data_dir)
    reward = None
    try:
        progress.stage("loading")
        inputs = distributed.on_main(load_inputs, config, store)  # every rank trains on the same votes
        model, tokenizer, window, inputs = load_model(config, inputs)
        policy = starting_policy(model, config, registry, inputs.live)  # every adapter goes on this one base
        progress.stage("reward model")
        pairs, voter_metrics = distributed.agree(clean_round_votes(inputs.pairs, config.voters, policy, tokenizer,
                                                                   reward_models.latest(), config.reward))
        reward = reward_model_step(config, policy, tokenizer, pairs, reward_models)
        value_head = starting_value_head(config, registry, inputs.live, policy)
        metrics = policy_step(config, store, policy, tokenizer, reward, inputs, window, progress, value_head)
        digest = distributed.tensor_digest(active_lora_params(policy)) if distributed.world_size() > 1 else None
        if not main:  # rank 0 gates and publishes
            return {**distributed.agree(None), "adapter_digest": digest}
        progress.stage("gate")
        verdict = gate_step(config, registry, policy, tokenizer, reward, inputs)
        passed, reason = verdict.passed, verdict.reason
        metrics = {**voter_metrics, **reward.metrics, **metrics, **verdict.metrics}
        progress.stage("publish")
        as_candidate = passed and config.user_gate
        version = publish_step(registry, reward_models, policy, reward, round_id, inputs.live, metrics, passed,
                               value_head, as_candidate, changes=verdict.samples)
        reason = f"version {version} is a candidate: users' votes against live decide" if as_candidate else reason
        store.finish_round(round_id, "succeeded" if passed else "rejected", reason=reason, metrics=metrics,
                           version=version, votes_used=len(pairs))
    except SkipRound as skip:  # on every rank alike (the same votes, prompts and model)
        if not main:
            return {"id": round_id, "status": "skipped", "reason": str(skip), "version": None}
        store.finish_round(round_id, "skipped", reason=str(skip), votes_used=skip.votes)
    except Exception as exc:  # noqa: BLE001 - recorded; the scheduler keeps running
        if not main:
            raise
        log.error("training round %s failed:\n%s", round_id, traceback.format_exc())
        if reward is not None and reward.staging is not None:
            reward_models.discard(reward.staging)
        store.finish_round(round_id, "failed", reason=f"{exc.__class__.__name__}: {exc}")
    finally:
        progress.close()
    row = store.round(round_id)
    if distributed.world_size() > 1 and row["status"] in TRAINED_STATUSES:  # the others wait for it
        row = {**distributed.agree(row), "adapter_digest": digest}
    return row


# ------------------------------------------------------------------ 1-2 inputs and model -------
def load_inputs(config: RoundConfig, store: Store) -> RoundInputs:
    """Step 1: the votes as pairs and the prompts, split by conversation with the reward
    model's held-out fraction and seed (so prompts and votes of a conversation stay together).

    Raises:
        SkipRound: fewer A/B votes than ``config.min_votes``, or no stored conversation.
        RuntimeError: no live version to train from.
    """
    pairs = check_startable(store, config.min_votes)
    stored = store.prompts(limit=config.max_prompts)
    ppo_prompts, gate_prompts = split_prompts(stored, config.reward.heldout_fraction, config.reward.seed)
    live = store.live_version()
    if live is None:
        raise RuntimeError("no live policy version to train from")
    return RoundInputs(pairs, ppo_prompts, gate_prompts, live)


def load_model(config: RoundConfig, inputs: RoundInputs):
    """Step 2: the base model (seeded: a fresh adapter's initialisation follows ``--seed``) and
    the prompts cut to its context window as serving cuts long conversations (oldest whole turns
    dropped). Returns ``(model, tokenizer, window in tokens, inputs)``.

    Raises:
        SkipRound: no prompt fits the window.
        training.models.ModelLoadError: the model cannot be loaded.
    """
    torch.manual_seed(config.seed)
    model, tokenizer = config.load.load(config.model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    window = context_window(model)
    ppo_prompts = fit_prompts(tokenizer, inputs.ppo_prompts, window, config.ppo.max_new_tokens)
    gate_prompts = fit_prompts(tokenizer, inputs.gate_prompts, window, config.gate.max_new_tokens)
    if not ppo_prompts or not gate_prompts:
        raise SkipRound("no stored prompt fits the context window", len(inputs.pairs))
    return model, tokenizer, window, replace(inputs, ppo_prompts=ppo_prompts, gate_prompts=gate_prompts)


# ------------------------------------------------------------------ 3 reward model -------------
def reward_model_step(config: RoundConfig, base, tokenizer, pairs: list[dict],
                      reward_models: RewardModelRegistry) -> RewardStep:
    """Step 3: train the reward model on all votes and decide which one the round uses.

    ``base`` is the round's policy (a peft model): every reward model here is an adapter of its
    own on the same base weights (``reward``, ``reward_fresh``, ``reward_prev``); the ones not
    kept are deleted from it.

    Warm-started from the reward model in use (a fresh one when there is none). With
    ``config.rm_fresh_candidate``, one trained from the base weights competes with it on the
    same held-out votes, since a warm start keeps fitting the earliest votes round after round;
    the more accurate is the candidate. The candidate replaces the model in use only if at least
    as accurate on those votes (``rm/replaced``); it is then saved to staging, published with the
    round's adapter. These choices are made on the *select* half of the held-out votes. The
    gate's reward-model check (:class:`RewardStep` ``accuracy``) uses votes none of them was
    selected on: with ``config.reward.cv_folds`` (default) the cross-validated accuracy over
    every other vote (:func:`training.reward_training.cross_validated_accuracy`), else the
    kept model's accuracy on the *judge* half.

    Raises:
        SkipRound: fewer usable pairs than ``config.reward.min_votes``.
    """
    init_dir = reward_models.latest()
    try:
        rm, metrics = train_reward_model(base, tokenizer, pairs, config.reward, init_dir=init_dir,
                                         adapter=unused_adapter_name(base, "reward"))
        metrics = distributed.agree(metrics)  # the choices below: rank 0's, on every rank
        if init_dir is not None and config.rm_fresh_candidate:
            fresh, fresh_metrics = train_reward_model(base, tokenizer, pairs, config.reward,
                                                      adapter=unused_adapter_name(base, "reward_fresh"))
            rm, metrics = _more_accurate(rm, metrics, fresh, distributed.agree(fresh_metrics))
    except NotEnoughVotesError as exc:
        raise SkipRound(f"too few votes: {exc}", len(pairs)) from None
    prev, new = metrics.get("rm/prev_accuracy"), metrics.get("rm/accuracy")
    keep_new = init_dir is None or not (new is not None and prev is not None and new < prev)
    metrics["rm/replaced"] = float(keep_new)
    staging = None
    if keep_new:
        if distributed.is_main():  # rank 0 publishes
            staging = reward_models.staging_dir()
            try:
                rm.save(staging)
            except BaseException:
                reward_models.discard(staging)
                raise
    else:
        rm.release()
        rm = RewardModel.load(base, init_dir, adapter=unused_adapter_name(base, "reward_prev"))
    judged = metrics.get("rm/judge_accuracy") if keep_new else metrics.get("rm/prev_judge_accuracy")
    decisive = int(metrics.get("rm/judge_decisive", 0))
    if config.reward.cv_folds >= 2:  # the gate's check on every vote outside the select half
        metrics.update(distributed.agree(cross_validated_accuracy(base, tokenizer, pairs, config.reward,
                                                                  adapter=unused_adapter_name(base, "reward_cv"))))
        judged, decisive = metrics["rm/cv_accuracy"], int(metrics["rm/cv_decisive"])
    return RewardStep(rm, make_reward_fn(rm, tokenizer, conservative=config.conservative_reward), metrics,
                      judged, decisive, staging)


def _more_accurate(warm: RewardModel, warm_metrics: dict, fresh: RewardModel, fresh_metrics: dict):
    """The warm-started or the fresh reward model, whichever is more accurate on the same held-out
    votes (the warm one on a tie), with both accuracies and ``rm/from_scratch`` in its metrics."""
    warm_acc, fresh_acc = warm_metrics.get("rm/accuracy"), fresh_metrics.get("rm/accuracy")
    both = {"rm/warm_accuracy": warm_acc, "rm/fresh_accuracy": fresh_acc}
    if fresh_acc is not None and warm_acc is not None and fresh_acc > warm_acc:
        warm.release()
        # the previous model's accuracy was measured on the same split before the warm start
        return fresh, {**fresh_metrics, **both, "rm/prev_accuracy": warm_metrics["rm/prev_accuracy"],
                       "rm/prev_judge_accuracy": warm_metrics["rm/prev_judge_accuracy"], "rm/from_scratch": 1.0}
    fresh.release()
    return warm, {**warm_metrics, **both, "rm/from_scratch": 0.0}


# ------------------------------------------------------------------ 4 policy -------------------
def policy_step(config: RoundConfig, store: Store, policy, tokenizer, reward: RewardStep,
                inputs: RoundInputs, window: int, progress: RoundProgress | None = None,
                value_head: ValueHead | None = None) -> dict:
    """Step 4: the round's policy (:func:`starting_policy`, adapter ``"policy"`` active)
    improved in place against the reward model (:func:`improve_policy`). β starts where the
    last round that trained left it (when the KL controller adapts), so across rounds the KL to
    the reference stays near its target; the caller's ``config`` is left as it is. ``progress``
    hears of each stage and PPO iteration, and ends PPO at the round's time budget; ``value_head``
    (:func:`starting_value_head`) is trained in place. Returns the metrics."""
    previous_beta = distributed.on_main(last_kl_coef, store)
    if previous_beta is not None and config.ppo.adaptive_kl:
        config = replace(config, ppo=replace(config.ppo, init_kl_coef=previous_beta))
    metrics = improve_policy(policy, tokenizer, reward.reward_fn, inputs.ppo_prompts, config, window, progress,
                             value_head)
    return {**metrics, "objective/kl_coef_start": config.ppo.init_kl_coef}


def starting_value_head(config: RoundConfig, registry: AdapterRegistry, live: int, policy) -> ValueHead:
    """PPO's value head: the one saved with version ``live``'s adapter when the round continues
    it (``init_policy == "live"``, ``carry_value_head``), else (none saved, another hidden size) a zero head."""
    hidden = int(text_config(policy).hidden_size)
    if config.carry_value_head and config.init_policy == "live":
        carried = ValueHead.load(registry.path(live), hidden)
        if carried is not None:
            log.info("value head carried over from version %s", live)
            return carried
    return ValueHead(hidden)


def last_kl_coef(store: Store) -> float | None:
    """β at the end of the newest round that trained (succeeded or rejected), if any."""
    for r in store.rounds(limit=20):
        beta = (r.get("metrics") or {}).get("objective/kl_coef")
        if r["status"] in TRAINED_STATUSES and isinstance(beta, (int, float)) and beta > 0:
            return float(beta)
    return None


def starting_policy(model, config: RoundConfig, registry: AdapterRegistry, live: int):
    """The model with the adapter ``"policy"`` that a round trains, active: a fresh LoRA on the
    reference policy (``config.init_policy == "reference"``, B = 0 so it starts as the SFT
    model) or a trainable copy of version ``live``'s adapter (``"live"``).

    Raises:
        storage.errors.UnknownVersion (a ``KeyError``) / FileNotFoundError: ``"live"``, and
            version ``live`` is not registered / has no adapter files (``AdapterRegistry.path``).
    """
    if config.init_policy == "reference":
        return add_lora(model, adapter_name="policy")
    return load_lora(model, registry.path(live), adapter_name="policy", trainable=True)


def improve_policy(policy, tokenizer, reward_fn, prompts: list[list[dict]], config: RoundConfig,
                   window: int | None = None, progress: RoundProgress | None = None,
                   value_head: ValueHead | None = None) -> dict:
    """Rejection-sampling fine-tuning (when ``config.rs.n`` > 1), then PPO against
    ``reward_fn``, both on the active adapter of ``policy`` (trained in place).

    After rejection sampling, PPO's KL target counts from where it left the policy (raised by
    ``rs/kl``): the controller would otherwise read that drift as PPO overshooting and raise β.

    Args:
        prompts: conversations ending with a user turn (already fitted to the context window).
        window: the model's context window in tokens (longer PPO-ptx demonstrations are left out).
        progress: told of the stages and PPO iterations; may end PPO early (time budget).
        value_head: PPO's value head, trained in place (None: a fresh one, discarded).

    Returns:
        the ``rs/*`` metrics (if any) and :func:`training.ppo.ppo_train`'s metrics.
    """
    rs_metrics, ppo_config = {}, config.ppo
    if config.rs.enabled:  # best-of-n distillation first (Llama 2's rejection sampling)
        if progress is not None:
            progress.stage("rejection sampling")
        rs_metrics = rejection_sampling_finetune(policy, tokenizer, reward_fn, prompts, config.rs)
        if "rs/kl" in rs_metrics and ppo_config.adaptive_kl:
            ppo_config = replace(ppo_config, kl_target=ppo_config.kl_target + max(0.0, rs_metrics["rs/kl"]))
            rs_metrics["rs/ppo_kl_target"] = ppo_config.kl_target
    ptx = ptx_demonstrations(config, tokenizer, max_tokens=window)
    if progress is not None:
        progress.stage("ppo", total=ppo_config.steps)
    ppo_metrics = ppo_train(policy, tokenizer, reward_fn, prompts, ppo_config, value_head=value_head,
                            ptx_examples=ptx, on_iteration=progress.ppo_iteration if progress is not None else None)
    return {**rs_metrics, **ppo_metrics}


# ------------------------------------------------------------------ 5-6 gate and publish -------
def gate_step(config: RoundConfig, registry: AdapterRegistry, policy, tokenizer, reward: RewardStep,
              inputs: RoundInputs) -> GateResult:
    """Step 5: the gate's verdict on the candidate (adapter ``"policy"``): the promotion gate
    against the live version on held-out prompts, judged by the reward model in use, and that
    reward model's own held-out accuracy (a reward model at chance only drifts). Its
    ``samples`` (live's and the candidate's answers on a few of those prompts) are what the
    published version keeps as its changes. With ``config.gate.enabled`` false every candidate
    passes, with no metrics and no samples."""
    if not config.gate.enabled:
        return GateResult(True, "")
    load_lora(policy, registry.path(inputs.live), adapter_name="live")
    result = run_gate(policy, tokenizer, reward.reward_fn, inputs.gate_prompts, config.gate, "policy", "live")
    weak = rm_accuracy_check(reward.accuracy, reward.decisive, config.gate)
    reason = "; ".join(r for r in (result.reason, weak) if r)
    return GateResult(result.passed and not weak, reason, result.metrics, result.samples)


def publish_step(registry: AdapterRegistry, reward_models: RewardModelRegistry, policy, reward: RewardStep,
                 round_id: int, live: int, metrics: dict, passed: bool, value_head: ValueHead | None = None,
                 as_candidate: bool = False, changes: list[dict] | None = None) -> int:
    """Step 6: publish the new reward model, if the round made one, as the one in use, then save
    the candidate adapter (and PPO's ``value_head`` and the gate's ``changes`` against version
    ``live``, :func:`storage.versions.write_changes`, beside it: inside its checksum) to staging
    and publish it as version N+1: live when it ``passed``; a *candidate* when it passed and
    ``as_candidate`` (users' votes decide, :mod:`training.user_gate`; an older candidate still
    waiting is rejected as superseded); else recorded as rejected (the live version keeps
    serving). Returns N+1. A failure leaves no staging, and never a live adapter in a round
    recorded as failed (the adapter goes last)."""
    if reward.staging is not None:
        reward_models.publish(reward.staging)
        reward.staging = None
    staging = registry.staging_dir()
    try:
        save_adapter(policy, "policy", staging)
        if value_head is not None:
            value_head.save(staging)
        if changes:
            write_changes(staging, live, changes)
        version = registry.publish(staging, parent=live, round_id=round_id, metrics=metrics,
                                   live=passed and not as_candidate)
    except BaseException:
        registry.discard(staging)
        raise
    store = registry.store
    if not passed:
        store.set_version_status(version, "rejected")
    elif as_candidate:
        for older in store.versions():
            if older["status"] == "candidate" and older["version"] != version:
                store.decide_candidate(older["version"], promote=False,
                                       note=f"superseded by version {version} before users decided")
    return version
