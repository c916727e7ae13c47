"""Loading causal LMs, chat templating, LoRA adapters and context fitting.

Everything that touches a model goes through here, for the starter model and hub models alike:

* :func:`load_model_and_tokenizer` — a hub id or a local directory, optionally quantized with
  bitsandbytes (``8bit``, or ``4bit`` nf4).
* chat templates: :mod:`training.chat_format` (special tokens, system role, end of turn).
* :func:`add_lora` / :func:`load_lora` — the policy is the base plus one LoRA adapter (peft).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from training.chat_format import (
    ChatTemplateError,
    check_template,
    read_chat_template,
)
from training.devices import (
    DEVICE_HELP,
    DTYPES,
    QUANTIZE_MODES,
    Placement,
    PlacementError,
    resolve_placement,
)
from training.flags import help_field

log = logging.getLogger(__name__)

@dataclass
class LoadConfig:
    """How the base model is loaded: the app and its training rounds share these flags, so a
    round trains on the base the app serves (:func:`training.devices.resolve_placement`)."""

    device: str = help_field("auto", help=f"where the model runs: {DEVICE_HELP}")
    dtype: str = help_field("auto", choices=list(DTYPES),
                            help="weights and compute: auto = float32 on the CPU, bfloat16 on a GPU that has it, else float16")
    quantize: str = help_field("none", choices=list(QUANTIZE_MODES),
                               help="store the frozen base in 8bit or 4bit (nf4) with bitsandbytes; rounds train LoRA on it (QLoRA)")
    chat_template: str = help_field("", help="file with a Jinja chat template for a model without one (or to replace its own)")

    def __post_init__(self):
        resolve_placement(self.device, self.dtype, self.quantize)  # PlacementError (ValueError): bad or unavailable
        if self.chat_template:
            self.chat_template = str(Path(self.chat_template).expanduser().resolve())  # rounds run elsewhere
            if not Path(self.chat_template).is_file():
                raise ValueError(f"--chat-template {self.chat_template}: no such file")

    def load(self, name_or_path: str | os.PathLike):
        """``(model, tokenizer)`` of ``name_or_path`` loaded this way (:func:`load_model_and_tokenizer`)."""
        return load_model_and_tokenizer(name_or_path, self.quantize, self.device, self.dtype, self.chat_template)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says why and what to pass instead."""


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


def _quantization_config(placement: Placement):
    """bitsandbytes' config for ``placement.quantize`` (None: unquantized or bitsandbytes missing),
    computing in ``placement.dtype``."""
    if placement.quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # noqa: BLE001 - any import failure means "unsupported here"
        log.warning("--quantize %s is unsupported here (%s); loading unquantized", placement.quantize, exc)
        return None
    if placement.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=placement.torch_dtype
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
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):  # the notice; its offline check
        logger = logging.getLogger(name)
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


def load_tokenizer(name_or_path: str | os.PathLike, chat_template: str | os.PathLike = ""):
    """Load a tokenizer and check that it has a chat template that renders a conversation.

    Args:
        chat_template: a file holding a Jinja chat template (``--chat-template FILE``), used
            instead of the tokenizer's own (or where it has none).

    Raises:
        ModelLoadError: the tokenizer cannot be loaded, has no chat template and none was given,
            or the template does not render a conversation.
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
    try:
        if chat_template:
            tok.chat_template = read_chat_template(chat_template)
        elif not getattr(tok, "chat_template", None):
            raise ModelLoadError(
                f"model {str(name_or_path)!r} has no chat template: pass one with --chat-template FILE "
                "(a Jinja template, or a tokenizer_config.json holding chat_template), use an "
                "instruct/chat model, or leave --model out."
            )
        check_template(tok, f"--chat-template {chat_template}" if chat_template else repr(str(name_or_path)))
    except ChatTemplateError as exc:
        raise ModelLoadError(str(exc)) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation batches are left-padded
    return tok


def load_model_and_tokenizer(name_or_path: str | os.PathLike, quantize: str = "none", device: str = "auto",
                             dtype: str = "auto", chat_template: str | os.PathLike = ""):
    """Load a causal LM and its tokenizer from a hub id or a local directory.

    Args:
        name_or_path: a Hugging Face hub id or a directory written by ``save_pretrained``.
        quantize: ``"none"``, ``"8bit"`` or ``"4bit"`` (nf4) through bitsandbytes, on CPU or
            CUDA. Where bitsandbytes is missing, cannot load the model or its kernels fail a
            one-forward smoke test, a one-line warning is logged and the model loads
            unquantized (never a crash).
        device, dtype: see :func:`training.devices.resolve_placement` (auto: CUDA and
            bfloat16/float16 where present, else the CPU and float32).
        chat_template: a template file for a model without one (:func:`load_tokenizer`).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on its device, and only
        ``.safetensors`` weights are accepted. ``model.placement`` is the
        :class:`training.devices.Placement` it was loaded with (logged once).

    Raises:
        ModelLoadError: the path/id cannot be loaded, has no usable chat template, holds no
            safetensors weights, or the device/dtype is unavailable here.
    """
    try:
        placement = resolve_placement(device, dtype, quantize)
    except PlacementError as exc:
        raise ModelLoadError(str(exc)) from None
    tok = load_tokenizer(name_or_path, chat_template)
    model = _load_model(name_or_path, placement)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _load_model(name_or_path, placement: Placement):
    """The causal LM of :func:`load_model_and_tokenizer` (falls back to unquantized)."""
    from transformers import AutoModelForCausalLM

    qconfig = _quantization_config(placement)
    kwargs = {"use_safetensors": True, "dtype": placement.torch_dtype}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if placement.on_cuda:
        kwargs["device_map"] = {"": placement.device}
    unquantized = replace(placement, quantize="none")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    except Exception as exc:  # noqa: BLE001
        if qconfig is not None:
            log.warning(
                "--quantize %s failed (%s: %s); loading unquantized",
                placement.quantize, exc.__class__.__name__, _first_line(exc),
            )
            return _load_model(name_or_path, unquantized)
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
                placement.quantize, exc.__class__.__name__, _first_line(exc),
            )
            del model
            return _load_model(name_or_path, unquantized)
    model.eval()
    model.placement = placement
    log.info("model %s: %s", name_or_path, placement.describe())
    return model


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


def lora_params(model, adapter_name: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of adapter ``adapter_name``'s LoRA weights in a peft model (empty
    when it holds no such adapter)."""
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n and f".{adapter_name}." in n]


def active_lora_params(policy) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the LoRA weights of the peft model's active adapter.

    Raises:
        ValueError: the active adapter has no LoRA weights.
    """
    active = policy.active_adapter
    active = active[0] if isinstance(active, list | tuple) else active
    params = lora_params(policy, active)
    if not params:
        raise ValueError(
            f"the policy has no LoRA weights for its active adapter {active!r}; "
            "wrap the base with training.models.add_lora first"
        )
    return params


def add_lora(model, settings: LoraSettings | None = None, adapter_name: str = "default"):
    """A fresh LoRA adapter ``adapter_name`` (B = 0, so the policy starts equal to the base) on
    ``model``: wrapped in a peft ``PeftModel``, or, when it is one already, added beside its
    adapters on the same base weights (not made active; the other adapters' flags unchanged).
    Base weights are frozen; the new LoRA weights require grad."""
    from peft import PeftModel, get_peft_model

    settings = settings or LoraSettings()
    if isinstance(model, PeftModel):
        flags = requires_grad_flags(model)
        model.add_adapter(adapter_name, settings.peft_config())
        restore_requires_grad(model, flags)
        for _, p in lora_params(model, adapter_name):
            p.requires_grad_(True)
        return model
    return get_peft_model(model, settings.peft_config(), adapter_name=adapter_name)


def unused_adapter_name(model, name: str) -> str:
    """``name``, or ``name_2``, ``name_3`` … the first that ``model`` (a peft model, or a plain
    one: every name is free) holds no adapter under."""
    taken = set(getattr(model, "peft_config", {}) or {})
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (less memory for longer answers and bigger minibatches, one more forward of compute;
    transformers' ``gradient_checkpointing_enable``, non-reentrant, so a frozen base needs no
    input gradients). Takes effect where :func:`eval_with_checkpointing` puts the model."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5.x
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def eval_with_checkpointing(model) -> None:
    """``model.eval()`` (no dropout: deterministic log-probs), except that the decoder layers
    with gradient checkpointing enabled are flagged training, the condition under which
    transformers checkpoints them (only the layer objects: their attention and MLP stay in eval
    mode; without gradients, e.g. while sampling, a layer runs as usual)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.eval()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True


@contextlib.contextmanager
def using_adapter(model, adapter_name: str):
    """Run the block with ``adapter_name`` as the peft model's active adapter, then switch back.

    peft's ``set_adapter`` marks the adapter it activates trainable and the others frozen; every
    ``requires_grad`` flag is snapshotted and restored, so scoring with a reward model that
    shares the policy's base changes nothing of the policy's training state."""
    before = model.active_adapter
    if before == adapter_name:
        yield model
        return
    flags = requires_grad_flags(model)
    try:
        model.set_adapter(adapter_name)
        yield model
    finally:
        model.set_adapter(before)
        restore_requires_grad(model, flags)


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
    if isinstance(model, PeftModel):  # beside the other adapters, whose flags stay as they are
        flags = requires_grad_flags(model)
        model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable)
        restore_requires_grad(model, flags)
        for _, p in lora_params(model, adapter_name):
            p.requires_grad_(trainable)
        return model
    return PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable
    )


class NonFiniteAdapter(ValueError):
    """An adapter's weights hold NaN or inf (it would make every reply fail)."""


def check_adapter_weights(adapter_dir: str | Path) -> None:
    """Read ``adapter_model.safetensors`` in ``adapter_dir`` and insist every floating tensor is
    finite.

    Raises:
        NonFiniteAdapter: a tensor holds NaN or inf (the message names one).
        OSError, safetensors.SafetensorError: the file is missing, truncated or not safetensors.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteAdapter(f"{len(bad)} of {len(tensors)} tensors in {adapter_dir} hold NaN or inf (e.g. {bad[0]})")


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
