"""The arithmetic precision of the heads' matmuls: `--precision auto|fp32|bf16`.

bf16 means: the MLP's hidden layers run in bfloat16 (their matmuls, forward and backward,
accumulating in float32, and the activations between them; heads.mlp_layer), signalled by a
torch.autocast context that BatchedMLP reads. Everything else stays float32: master weights,
gradients, AdamW's moments, BatchNorm's statistics and affine (computed inside torch's kernel),
the output layer (so logits, losses, the CVaR sort, scores and metrics are float32), and the data.

"auto" picks bf16 only where the hardware multiplies it natively: CUDA GPUs with bf16
support, and CPUs with AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo; elsewhere a bf16
matmul is emulated and slower than fp32). run directories record the resolved value.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dfclip.errors import UserError
from dfclip.heads.config import CHOICES

PRECISIONS = CHOICES["precision"]  # auto, fp32, bf16
CPUINFO = Path("/proc/cpuinfo")
# CPU feature flags (Linux /proc/cpuinfo names) of native bf16 multiplication
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (or of the given text); empty if unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:  # not Linux: no flags known, so no native bf16 claimed
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16(device: torch.device, cpuinfo: str | None = None) -> bool:
    """Whether `device` multiplies bf16 in hardware (detected, not guessed)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS))
    return False


def resolve_precision(precision: str, device: torch.device, cpuinfo: str | None = None) -> str:
    """"fp32" or "bf16" for a `--precision` value on `device` ("auto": bf16 where native_bf16)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device, cpuinfo) else "fp32"
    return precision


def matmuls_in(precision: str, device: torch.device, cache: bool = True):
    """A context in which the heads' hidden layers run in `precision` (resolved: fp32 or bf16).

    A bf16 autocast: BatchedMLP reads its dtype and runs its hidden layers in it; other heads'
    matmuls (layermix's mix) run under autocast itself. Enter it once per forward: SAM moves
    the weights between two forwards, and each forward casts them afresh. cache=False turns
    autocast's weight-cast cache off, as CUDA-graph capture requires (the casts are the same).
    """
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()
