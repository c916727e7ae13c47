"""The reward model: the policy's base weights + its own LoRA adapter + a scalar head, plus
learned weights on how likely the reference policy finds the answer. Trained and used by
:mod:`training.reward_training`.

The score is read from the last real token of prompt ⧺ answer (the answer's end-of-turn
token), found from the attention mask, with position ids counted over real tokens: a sequence
scored alone, right-padded or left-padded in a batch gets the same score, whatever the pad id
(pad may equal eos) and however many end-of-turn tokens the prompt holds.

Reference features (on by default, ``RewardConfig.reference_features``): besides the head on the
last hidden state, the score adds ``softplus(w) · f`` where ``f`` = (mean, min) of the answer's
token log-probs under the reference policy — the base weights with the adapter disabled, i.e.
the SFT model PPO is anchored to (nats per token, nats) — and ``w`` (2,) is learned from the
votes with its own learning rate. A sampled answer the SFT model itself finds unlikely (a
slipped digit, a garbled word) is often one users reject: language models are largely
calibrated about their own answers (Kadavath et al. 2022, "Language Models (Mostly) Know What
They Know"). The last hidden state alone cannot see how surprising earlier tokens were, and a
few hundred votes are too few to learn it. The weights are kept ≥ 0, so votes that do not
reward confidence (e.g. a preference for brevity) drive them to ~0 rather than rewarding
unlikely text. The features are computed without gradient (the reference is frozen).

Ensemble (optional, :mod:`training.ensemble`): K further linear heads on the same last hidden
state, each fitted on a bootstrap resample of the votes; member k scores ``w_k · h + b_k`` plus
the same feature term. Their spread says how sure the votes make the reward model about an
answer; the mean is close to the main head's score.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from training.models import (
    LoraSettings,
    add_lora,
    load_lora,
    load_model_and_tokenizer,
    lora_params,
    requires_grad_flags,
    restore_requires_grad,
    save_adapter,
    text_config,
    using_adapter,
)
from training.rollout import (
    NO_GRAD_LOGITS,
    logprobs_from_logits,
    position_ids_from_mask,
    reference_model,
)

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


def _load_base(base):
    """The model a reward model's adapter goes on: a hub id or directory is loaded afresh (its
    own copy); a model object (a causal LM, or a peft model holding other adapters, e.g. a
    round's policy) is shared as it is, never copied."""
    if isinstance(base, str | os.PathLike):
        model, _ = load_model_and_tokenizer(base)
        return model
    if isinstance(base, torch.nn.Module):
        return base
    raise TypeError(f"pass the base model as a hub id, a directory or a model, got {type(base).__name__}")


def _base_name(base) -> str:
    """The base model's name or path (what a saved reward model records)."""
    if isinstance(base, str | os.PathLike):
        return str(base)
    inner = base.get_base_model() if hasattr(base, "get_base_model") else base
    return str(getattr(inner, "name_or_path", "") or getattr(inner.config, "_name_or_path", ""))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _on(weight: torch.nn.Parameter | None, device) -> torch.nn.Parameter | None:
    """The feature weight as a parameter on ``device`` (None stays None)."""
    if weight is None:
        return None
    return torch.nn.Parameter(weight.detach().to(device), requires_grad=weight.requires_grad)


FEATURES = ("ref_mean_logp", "ref_min_logp")  # nats per answer token, nats
FEATURE_INIT = 0.1  # softplus(w) of each reference feature at initialisation


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """(N, H) last hidden states → (N, V) next-token logits as the model's own forward computes
    them: the LM head, then the final-logit transforms some families apply after it —
    soft-capping ``cap · tanh(logits / cap)`` (Gemma 2/3, ``final_logit_softcapping``), Cohere's
    ``logit_scale`` and Granite's ``logits_scaling`` (transformers' modeling code of each)."""
    config = text_config(model)
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    return logits


class RewardModel(torch.nn.Module):
    """Causal-LM backbone (frozen base + its own LoRA adapter, named ``adapter``) and a scalar
    head, plus optional non-negative weights on reference features (see the module docstring).

    The backbone may be shared: a round's policy, its reference and its reward models are
    adapters on one peft model, one copy of the base weights. Every forward switches to
    ``adapter`` and back (:func:`training.models.using_adapter`), so scoring never changes the
    policy's active adapter, its ``requires_grad`` flags or its weights.

    ``forward(input_ids (B, T), attention_mask (B, T), answer_mask (B, T) | None) -> (B,)``
    scores, read at the last position where ``attention_mask`` is 1.
    """

    def __init__(self, backbone, head: torch.nn.Linear, base_name: str = "",
                 feature_weight: torch.nn.Parameter | None = None, adapter: str = "default",
                 ensemble: torch.nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone  # peft PeftModel
        self.head = head  # Linear(hidden, 1), float32
        self.base_name = str(base_name)
        self.feature_weight = feature_weight  # (len(FEATURES),) raw; the weight is softplus(raw)
        self.adapter = adapter
        self.ensemble = ensemble  # Linear(hidden, K), float32, frozen: member heads; None: no ensemble

    @property
    def members(self) -> int:
        """How many ensemble heads the model has (0: none)."""
        return 0 if self.ensemble is None else int(self.ensemble.out_features)

    def release(self) -> None:
        """Delete this reward model's adapter from a shared backbone (a round that drops a
        candidate reward model frees its weights); the other adapters, the active one and every
        ``requires_grad`` flag stay as they were. The reward model is unusable afterwards."""
        config = self.backbone.peft_config
        if self.adapter not in config or len(config) < 2:
            return  # its own copy of the base (the only adapter): freed with the object
        flags = requires_grad_flags(self.backbone)
        if self.backbone.active_adapter == self.adapter:
            self.backbone.set_adapter(next(a for a in config if a != self.adapter))
        self.backbone.delete_adapter(self.adapter)
        restore_requires_grad(self.backbone, flags)

    @property
    def uses_reference_features(self) -> bool:
        """True when the score includes the weighted reference features (needs ``answer_mask``)."""
        return self.feature_weight is not None

    def feature_weights(self) -> dict[str, float]:
        """The current non-negative feature weights, by name (empty without features)."""
        if self.feature_weight is None:
            return {}
        w = torch.nn.functional.softplus(self.feature_weight.detach()).tolist()
        return dict(zip(FEATURES, w, strict=True))

    @staticmethod
    def _hidden_size(model) -> int:
        return int(text_config(model).hidden_size)

    @staticmethod
    def _new_feature_weight() -> torch.nn.Parameter:
        raw = math.log(math.expm1(FEATURE_INIT))  # softplus(raw) = FEATURE_INIT
        return torch.nn.Parameter(torch.full((len(FEATURES),), raw))

    @classmethod
    def from_base(cls, base, lora_settings: LoraSettings | None = None, seed: int = 0,
                  reference_features: bool = True, adapter: str = "reward"):
        """A fresh reward model on ``base`` (a hub id or directory: its own copy; a model:
        shared, see :func:`_load_base`): LoRA adapter ``adapter`` with B = 0; with
        ``reference_features``, feature weights ``FEATURE_INIT`` each and a zero head, so the
        first score is the features alone rather than noise the votes must first undo; without, a head
        ~ N(0, 1/(H+1)) (Stiennon et al. 2020: initial scores of unit-ish scale).

        Raises:
            ValueError: ``base`` already holds an adapter named ``adapter``.
        """
        model = _load_base(base)
        if adapter in getattr(model, "peft_config", {}):
            raise ValueError(f"the model already holds an adapter named {adapter!r}")
        backbone = add_lora(model, lora_settings or LoraSettings(), adapter_name=adapter)
        H = cls._hidden_size(model)
        head = torch.nn.Linear(H, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(1, H, generator=gen) / math.sqrt(H + 1))
            head.bias.zero_()
            if reference_features:
                head.weight.zero_()
        weight = cls._new_feature_weight() if reference_features else None
        device = _device(model)
        return cls(backbone, head.to(device), _base_name(base), _on(weight, device), adapter)

    @classmethod
    def load(cls, base, directory, trainable: bool = False, adapter: str = "reward"):
        """Load a reward model written by :meth:`save` onto ``base`` (a hub id or directory:
        its own copy; a model: shared, see :func:`_load_base`) as adapter ``adapter`` (a model
        saved without reference features loads without them).

        Raises:
            FileNotFoundError: ``directory`` lacks the adapter or the head file.
            ValueError: ``base`` already holds an adapter named ``adapter``.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / HEAD_FILE).is_file():
            raise FileNotFoundError(f"no {HEAD_FILE} in {directory}; not a saved reward model")
        model = _load_base(base)
        if adapter in getattr(model, "peft_config", {}):
            raise ValueError(f"the model already holds an adapter named {adapter!r}")
        backbone = load_lora(model, directory, adapter_name=adapter, trainable=trainable)
        state = load_file(str(directory / HEAD_FILE))
        raw = state.pop("feature_weight", None)
        ensemble = None
        if "ensemble.weight" in state:
            members = state.pop("ensemble.weight")
            ensemble = torch.nn.Linear(members.shape[1], members.shape[0])
            ensemble.load_state_dict({"weight": members, "bias": state.pop("ensemble.bias")})
            ensemble.requires_grad_(False)
        head = torch.nn.Linear(state["weight"].shape[1], 1)
        head.load_state_dict(state)
        head.requires_grad_(trainable)
        weight = None
        if raw is not None:
            weight = torch.nn.Parameter(raw.float().clone(), requires_grad=trainable)
        device = _device(model)
        return cls(backbone, head.to(device), _base_name(base), _on(weight, device), adapter,
                   None if ensemble is None else ensemble.to(device))

    def save(self, directory) -> None:
        """Write the adapter, the head (and feature weights) and a small JSON note to
        ``directory`` (created)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_adapter(self.backbone, self.adapter, directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        if self.feature_weight is not None:
            tensors["feature_weight"] = self.feature_weight.detach().contiguous().cpu()
        if self.ensemble is not None:
            tensors["ensemble.weight"] = self.ensemble.weight.detach().contiguous().cpu()
            tensors["ensemble.bias"] = self.ensemble.bias.detach().contiguous().cpu()
        save_file(tensors, str(directory / HEAD_FILE))
        meta = {"base": self.base_name, "features": self.feature_weights(), "members": self.members}
        (directory / META_FILE).write_text(json.dumps(meta) + "\n")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA weights and the head (what the optimizer holds), then the feature weight."""
        lora = [p for _, p in lora_params(self.backbone, self.adapter)]
        extra = [self.feature_weight] if self.feature_weight is not None else []
        return lora + list(self.head.parameters()) + extra

    def _decoder_hidden(self, input_ids, mask, positions) -> torch.Tensor:
        """(B, T, H) last hidden states of the backbone as it is (adapter on or off)."""
        base = self.backbone.get_base_model()
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        if decoder is not None:
            return decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           use_cache=False).last_hidden_state
        return self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             output_hidden_states=True, use_cache=False).hidden_states[-1]

    @torch.no_grad()
    def reference_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           answer_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids, (B, T) attention mask, (B, T) answer mask → (B, len(FEATURES)): the mean
        (nats/token) and the min (nats) of the answer tokens' log-probs under the reference
        policy (the backbone with its adapter disabled). Token t is predicted from position t−1;
        only answer positions are projected to the vocabulary, in chunks.

        Raises:
            ValueError: a row has no answer token, or its first token is marked as answer.
        """
        mask = attention_mask.long()
        answer = answer_mask.bool() & mask.bool()
        if not bool(answer.any(dim=1).all()) or bool(answer[:, 0].any()):
            raise ValueError("answer_mask must mark at least one token per row, never a row's first position")
        positions = position_ids_from_mask(mask)
        with using_adapter(self.backbone, self.adapter), reference_model(self.backbone):
            hidden = self._decoder_hidden(input_ids, mask, positions)  # (B, T, H)
        base = self.backbone.get_base_model()
        rows, cols = answer[:, 1:].nonzero(as_tuple=True)  # predicting token cols+1 from cols
        logps = []
        chunk = max(16, NO_GRAD_LOGITS // int(text_config(base).vocab_size))  # positions per projection
        for s in range(0, rows.numel(), chunk):
            r, c = rows[s:s + chunk], cols[s:s + chunk]
            logits = output_logits(base, hidden[r, c])  # (N, V)
            logps.append(logprobs_from_logits(logits[None], input_ids[r, c + 1][None])[0])  # (N,)
        token_logp = torch.zeros(answer.shape, dtype=torch.float32, device=hidden.device)
        token_logp[rows, cols + 1] = torch.cat(logps)  # (B, T), 0 outside the answer
        counts = answer.sum(dim=1).float()
        mean = token_logp.sum(dim=1) / counts
        lowest = token_logp.masked_fill(~answer, float("inf")).min(dim=1).values
        return torch.stack([mean, lowest], dim=1)

    def parts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              answer_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T), (B, T)[, (B, T)] → ``(h, offset)``: (B, H) float32 last hidden state at each
        row's last real token, and (B,) the weighted reference features (zeros without them).
        The main score is ``head(h) + offset``; member k's is ``ensemble(h)[:, k] + offset``.

        Raises:
            ValueError: the model uses reference features and ``answer_mask`` is None.
        """
        if self.feature_weight is not None and answer_mask is None:
            raise ValueError("this reward model adds reference features: pass answer_mask (B, T)")
        mask = attention_mask.long()
        positions = position_ids_from_mask(mask)  # (B, T) real-token positions
        with using_adapter(self.backbone, self.adapter):  # one switch for the score and the features
            hidden = self._decoder_hidden(input_ids, mask, positions)  # (B, T, H)
            T = mask.shape[1]
            last = (mask * torch.arange(T, device=mask.device)).argmax(dim=1)  # (B,) last real index
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(self.head.weight.dtype)
            offset = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
            if self.feature_weight is not None:
                feats = self.reference_features(input_ids, mask, answer_mask)  # (B, F)
                weight = torch.nn.functional.softplus(self.feature_weight)  # (F,) >= 0
                offset = (feats.to(weight.dtype) * weight).sum(dim=-1).to(h.dtype)
        return h, offset

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T), (B, T)[, (B, T)] → (B,) scores at the last real token of each row.

        Raises:
            ValueError: the model uses reference features and ``answer_mask`` is None.
        """
        h, offset = self.parts(input_ids, attention_mask, answer_mask)
        return self.head(h).squeeze(-1) + offset

    @torch.no_grad()
    def member_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      answer_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T), (B, T)[, (B, T)] → (K, B) the ensemble members' scores.

        Raises:
            ValueError: the model has no ensemble (or see :meth:`parts`).
        """
        if self.ensemble is None:
            raise ValueError("this reward model has no ensemble (RewardConfig.ensemble.members = 0)")
        h, offset = self.parts(input_ids, attention_mask, answer_mask)
        return (self.ensemble(h) + offset[:, None]).T
