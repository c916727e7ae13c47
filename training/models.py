"""Loading causal LMs, chat templating, LoRA adapters and context fitting.

Everything that touches a model goes through here, for the starter model and hub models alike:

* :func:`load_model_and_tokenizer` — a hub id or a local directory, optionally quantized with
  bitsandbytes (``8bit``, or ``4bit`` nf4).
* :func:`render_prompt` — token ids of a conversation through the tokenizer's chat template.
* :func:`fit_messages` — drop the oldest whole turns until prompt + ``max_new_tokens`` fits;
  :func:`fit_prompts` applies the same rule to a batch of training prompts.
* :func:`add_lora` / :func:`load_lora` — the policy is the base plus one LoRA adapter (peft).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "8bit", "4bit")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says why and what to pass instead."""


class ContextTooLongError(ValueError):
    """The newest user message alone (with the system prompt) does not fit the context window."""


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models")."""

    r: int = 8  # rank of the update B·A
    alpha: int = 16  # scaling: the update is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the LoRA input; 0 keeps PPO log-probs deterministic
    target_modules: str | list[str] = "all-linear"  # peft's shorthand: every linear but the LM head

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def peft_config(self):
        """The equivalent ``peft.LoraConfig`` for a causal LM."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type="CAUSAL_LM",
        )


def _quantization_config(quantize: str):
    if quantize not in QUANTIZE_MODES:
        raise ModelLoadError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    if quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # noqa: BLE001 - any import failure means "unsupported here"
        log.warning("--quantize %s is unsupported here (%s); loading unquantized", quantize, exc)
        return None
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )


class _OnceFilter(logging.Filter):
    """Lets each distinct message of a logger through once (bitsandbytes' 8-bit matmul warns
    "inputs will be cast … to float16" on every forward pass, i.e. every decoded token)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _quiet_bitsandbytes() -> None:
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OnceFilter) for f in logger.filters):
            logger.addFilter(_OnceFilter())


class _DropOptionalKernelNotice(logging.Filter):
    """Drops bitsandbytes' import-time notice that its optional downloadable CPU kernel is
    missing ("pip install kernels"): the kernel comes from a model hub this app never reaches,
    and bitsandbytes works without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


def quiet_optional_kernel_notice() -> None:
    """Install :class:`_DropOptionalKernelNotice`; call before bitsandbytes is first imported."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropOptionalKernelNotice) for f in logger.filters):
        logger.addFilter(_DropOptionalKernelNotice())


def _smoke_forward(model) -> None:
    """One 2-token forward pass; raises what the (quantized) kernels raise on this machine."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without a trailing full stop."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else ""


def load_tokenizer(name_or_path: str | os.PathLike):
    """Load a tokenizer and check that it has a chat template.

    Raises:
        ModelLoadError: the tokenizer cannot be loaded or has no chat template.
    """
    from transformers import AutoTokenizer

    text = str(name_or_path)
    looks_local = text.startswith(("/", "./", "../", "~")) or os.sep + os.sep in text
    if looks_local and not Path(text).expanduser().is_dir():
        raise ModelLoadError(
            f"cannot load a model from {text!r}: no such directory. Pass --model with a hub id "
            "(ORG/NAME) or a local directory holding config.json, *.safetensors weights and "
            "tokenizer files, or leave --model out to use the offline starter model."
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(text).expanduser()) if looks_local else text)
    except Exception as exc:  # noqa: BLE001 - re-raised with a message that says what to do
        raise ModelLoadError(
            f"cannot load a tokenizer from {str(name_or_path)!r}: {exc.__class__.__name__}: "
            f"{_first_line(exc)}. Pass --model with a hub id or a "
            "local directory holding config.json, the weights and tokenizer files, or leave "
            "--model out to use the offline starter model."
        ) from exc
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(
            f"model {str(name_or_path)!r} has no chat template; use an instruct/chat model "
            "(its tokenizer_config.json must define chat_template) or leave --model out."
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation batches are left-padded
    return tok


def load_model_and_tokenizer(name_or_path: str | os.PathLike, quantize: str = "none"):
    """Load a causal LM and its tokenizer from a hub id or a local directory.

    Args:
        name_or_path: a Hugging Face hub id or a directory written by ``save_pretrained``.
        quantize: ``"none"``, ``"8bit"`` or ``"4bit"`` (nf4, float32 compute) through
            bitsandbytes, on CPU or CUDA. Where bitsandbytes is missing, cannot load the model or
            its kernels fail a one-forward smoke test, a one-line warning is logged and the model
            loads unquantized (never a crash).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, float32 where unquantized, and only
        ``.safetensors`` weights are accepted.

    Raises:
        ModelLoadError: the path/id cannot be loaded, has no chat template, or holds no
            safetensors weights.
    """
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(name_or_path)
    qconfig = _quantization_config(quantize)
    kwargs = {"use_safetensors": True}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    else:
        kwargs["dtype"] = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    except Exception as exc:  # noqa: BLE001
        if qconfig is not None:
            log.warning(
                "--quantize %s failed (%s: %s); loading unquantized",
                quantize, exc.__class__.__name__, _first_line(exc),
            )
            return load_model_and_tokenizer(name_or_path, "none")
        raise ModelLoadError(
            f"cannot load a causal LM from {str(name_or_path)!r}: {exc.__class__.__name__}: "
            f"{_first_line(exc)}. Pass --model with a hub id or a "
            "local directory holding config.json and *.safetensors weights, or leave --model "
            "out to use the offline starter model."
        ) from exc
    if qconfig is not None:
        _quiet_bitsandbytes()
        try:
            _smoke_forward(model)
        except Exception as exc:  # noqa: BLE001 - unsupported kernels: fall back, never crash
            log.warning(
                "--quantize %s is unsupported here (%s: %s); loading unquantized",
                quantize, exc.__class__.__name__, _first_line(exc),
            )
            del model
            return load_model_and_tokenizer(name_or_path, "none")
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """Every token id that ends an assistant turn: the generation config's eos ids and the
    tokenizer's eos token, deduplicated, in that order."""
    ids: list[int] = []
    eos = model.generation_config.eos_token_id
    for i in eos if isinstance(eos, list) else [eos]:
        if i is not None and i not in ids:
            ids.append(int(i))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, ending with the assistant
    header (``add_generation_prompt=True``). ``messages`` are ``{"role", "content"}`` dicts."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def fit_messages(
    tokenizer, messages: list[dict], max_context_tokens: int, max_new_tokens: int
) -> list[dict]:
    """Drop the oldest whole turns until the rendered prompt + ``max_new_tokens`` fits.

    A turn is a user message and the assistant replies that follow it. A leading system message
    and the newest user turn are always kept. Counts use the real tokenizer and chat template.

    Args:
        messages: the conversation so far, ending with the user message to answer.
        max_context_tokens: the model's context window, in tokens.
        max_new_tokens: tokens reserved for the reply.

    Returns:
        The kept messages (a suffix of the turns, with the system message if any).

    Raises:
        ContextTooLongError: the system message plus the newest user turn alone do not fit.
    """
    budget = max_context_tokens - max_new_tokens
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"] or [0]
    for start in starts:
        kept = system + rest[start:]
        if len(render_prompt(tokenizer, kept)) <= budget:
            return kept
    n = len(render_prompt(tokenizer, system + rest[starts[-1]:]))
    raise ContextTooLongError(
        f"the message is too long: {n} tokens with the template, but only {budget} fit "
        f"({max_context_tokens}-token window minus {max_new_tokens} for the reply). "
        "Shorten it or start a new conversation."
    )


def fit_prompts(
    tokenizer, prompts: list[list[dict]], max_context_tokens: int, max_new_tokens: int
) -> list[list[dict]]:
    """The rule of :func:`fit_messages` for a batch of prompts (training rounds, gates): each
    conversation loses its oldest whole turns until it fits; one whose newest message alone does
    not fit is left out (logged), so a round never feeds the model more than its window.

    Returns:
        The fitted prompts, in order, without the ones that cannot fit.
    """
    fitted = []
    for messages in prompts:
        try:
            fitted.append(fit_messages(tokenizer, messages, max_context_tokens, max_new_tokens))
        except ContextTooLongError as exc:
            log.info("prompt left out: %s", exc)
    return fitted


def text_config(model):
    """The config of a model's language part: ``config.text_config`` for families that nest it
    (Gemma 3, Llava-style multimodal checkpoints), else ``config`` itself. ``model`` may be a
    ``PeftModel``; its base model's config is used."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model.config, "text_config", None) or model.config


def context_window(model, default: int = 2048) -> int:
    """The model's context window in tokens (``max_position_embeddings`` or similar)."""
    cfg = text_config(model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def requires_grad_flags(model) -> dict[str, bool]:
    """Every parameter's ``requires_grad`` flag by name: a snapshot for
    :func:`restore_requires_grad`."""
    return {name: p.requires_grad for name, p in model.named_parameters()}


def restore_requires_grad(model, flags: dict[str, bool]) -> None:
    """Set each parameter named in ``flags`` back to its snapshot flag (peft's adapter switches
    mark adapters trainable); parameters added since the snapshot are left as they are."""
    for name, p in model.named_parameters():
        if name in flags and p.requires_grad != flags[name]:
            p.requires_grad_(flags[name])


def active_lora_params(policy) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the LoRA weights of the peft model's active adapter.

    Raises:
        ValueError: the active adapter has no LoRA weights.
    """
    active = policy.active_adapter
    active = active[0] if isinstance(active, list | tuple) else active
    params = [(n, p) for n, p in policy.named_parameters() if "lora_" in n and f".{active}." in n]
    if not params:
        raise ValueError(
            f"the policy has no LoRA weights for its active adapter {active!r}; "
            "wrap the base with training.models.add_lora first"
        )
    return params


def add_lora(model, settings: LoraSettings | None = None, adapter_name: str = "default"):
    """Wrap ``model`` in a peft ``PeftModel`` with a fresh LoRA adapter (B = 0, so the policy
    starts equal to the base). Base weights are frozen; only LoRA weights require grad."""
    from peft import get_peft_model

    settings = settings or LoraSettings()
    return get_peft_model(model, settings.peft_config(), adapter_name=adapter_name)


def load_lora(model, adapter_dir: str | Path, adapter_name: str = "default", trainable: bool = False):
    """Load the adapter saved in ``adapter_dir`` on top of ``model``.

    If ``model`` is already a ``PeftModel`` the adapter is added under ``adapter_name``
    (existing adapters stay); otherwise ``model`` is wrapped.

    Only safetensors weights are loaded: an adapter saved as a pickle (``adapter_model.bin``)
    is refused, never unpickled.

    Raises:
        FileNotFoundError: ``adapter_dir`` holds no ``adapter_config.json`` or no
            ``adapter_model.safetensors``.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir}")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"no adapter_model.safetensors in {adapter_dir}; only safetensors adapters are "
            "loaded (re-save it with save_pretrained(..., safe_serialization=True))"
        )
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable
    )


def save_adapter(model, adapter_name: str, directory: str | Path) -> None:
    """Save one adapter of a ``PeftModel`` (safetensors) with its files at the top of
    ``directory`` (peft nests adapters not named "default" in a sub-folder; it is flattened)."""
    directory = Path(directory)
    model.save_pretrained(str(directory), selected_adapters=[adapter_name])
    nested = directory / adapter_name
    if nested.is_dir():
        for f in nested.iterdir():
            f.rename(directory / f.name)
        nested.rmdir()
