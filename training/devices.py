"""Where and in which number format a model runs: ``--device``, ``--dtype``, ``--quantize``.

:func:`resolve_placement` turns the three flags into a :class:`Placement` and says why, for the
app and for training rounds alike (the same rules, so a round trains on the base the app serves):

* ``--device auto``: the first CUDA device when torch sees one, else the CPU; ``cuda`` means
  ``cuda:0``; ``cuda:N`` must exist.
* ``--dtype auto``: float32 on the CPU; on CUDA bfloat16 where the GPU supports it (compute
  capability 8.0 and later), else float16.
* ``--quantize 8bit|4bit``: the frozen base weights are stored by bitsandbytes (LLM.int8 or nf4)
  and computed in the dtype above; LoRA weights and the value/reward heads stay float32 (peft
  up-casts adapters on a low-precision base): QLoRA (Dettmers et al. 2023, "QLoRA: Efficient
  Finetuning of Quantized LLMs").

The CUDA facts come from :func:`cuda_info` unless a :class:`CudaInfo` is passed, so the
selection logic is the same code on a machine without a GPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from training.distributed import launched

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_MODES = ("none", "8bit", "4bit")
DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"


class PlacementError(ValueError):
    """A ``--device`` / ``--dtype`` / ``--quantize`` value that is malformed or unavailable here."""


@dataclass(frozen=True)
class CudaInfo:
    """What torch says about CUDA on this machine."""

    available: bool
    count: int = 0
    bf16: bool = False  # whether device 0 supports bfloat16 (compute capability >= 8.0)
    name: str = ""


def cuda_info() -> CudaInfo:
    """The CUDA devices torch sees (none on a CPU build)."""
    import torch

    if not torch.cuda.is_available():
        return CudaInfo(False)
    return CudaInfo(True, torch.cuda.device_count(), bool(torch.cuda.is_bf16_supported()),
                    torch.cuda.get_device_name(0))


@dataclass(frozen=True)
class Placement:
    """A resolved device, dtype and quantization, with the reason for each choice."""

    device: str  # "cpu" or "cuda:N"
    dtype: str  # float32 | bfloat16 | float16: the unquantized weights and every matmul
    quantize: str  # none | 8bit | 4bit
    reason: str  # one line: what was chosen and why

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def describe(self) -> str:
        """``"device cuda:0, bfloat16, 4bit (…why…)"``: the startup line's words."""
        quant = "" if self.quantize == "none" else f", {self.quantize} base (QLoRA when training)"
        return f"device {self.device}, {self.dtype}{quant} ({self.reason})"


def resolve_placement(device: str = "auto", dtype: str = "auto", quantize: str = "none",
                      cuda: CudaInfo | None = None) -> Placement:
    """The :class:`Placement` for the flags (rules in the module docstring).

    Args:
        cuda: the machine's CUDA facts; default :func:`cuda_info`. ``auto`` and ``cuda`` mean
            ``cuda:LOCAL_RANK`` in a process started by torchrun for several processes.

    Raises:
        PlacementError: an unknown value, CUDA asked for where there is none, a device index
            beyond the devices present, or bfloat16 asked for on a GPU without it.
    """
    if dtype not in DTYPES:
        raise PlacementError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize not in QUANTIZE_MODES:
        raise PlacementError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    spec = device.strip().lower()
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", spec)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise PlacementError(f"--device must be {DEVICE_HELP}, got {device!r}")
    cuda = cuda if cuda is not None else cuda_info()
    why = []
    # in a data-parallel round (torchrun) each rank takes its own GPU: LOCAL_RANK's
    kind, index = match.group(1), int(match.group(2) or (os.environ.get("LOCAL_RANK", "0") if launched() else 0))
    if kind == "auto":
        kind = "cuda" if cuda.available else "cpu"
        why.append(f"auto: {'CUDA is available' + (f' ({cuda.name})' if cuda.name else '') if cuda.available else 'no CUDA device'}")
    if kind == "cuda":
        if not cuda.available:
            raise PlacementError(f"--device {device}: torch sees no CUDA device here; pass --device cpu (or auto)")
        if index >= cuda.count:
            raise PlacementError(f"--device {device}: only {cuda.count} CUDA device(s) here (cuda:0…cuda:{cuda.count - 1})")
    resolved = f"cuda:{index}" if kind == "cuda" else "cpu"
    if dtype == "auto":
        if kind == "cpu":
            dtype = "float32"
            why.append("float32 on the CPU")
        elif cuda.bf16:
            dtype = "bfloat16"
            why.append("bfloat16: the GPU supports it")
        else:
            dtype = "float16"
            why.append("float16: the GPU has no bfloat16")
    elif dtype == "bfloat16" and kind == "cuda" and not cuda.bf16:
        raise PlacementError(f"--dtype bfloat16: {cuda.name or 'this GPU'} does not support it; pass --dtype float16 (or auto)")
    else:
        why.append(f"--dtype {dtype}")
    if quantize != "none":
        why.append(f"--quantize {quantize}: bitsandbytes on {'CUDA' if kind == 'cuda' else 'the CPU'}")
    return Placement(resolved, dtype, quantize, "; ".join(why))
