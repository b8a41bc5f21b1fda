"""Where a command runs: this process's torchrun rank and its torch device, and the fp32 precision
of its GPU maths.

One copy for embed/ and heads/ alike, so `--device` means the same in every command.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dfclip.errors import UserError

NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun job (0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local: int = 0
    local_world: int = 1

    @property
    def tag(self) -> str:
        """Message prefix under torchrun ("" when alone); plain text, escape it for rich markup."""
        return f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""


def rank_from_env(env: dict | None = None) -> Rank:
    """RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun sets them."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); "
                        "unset them for a one-process run") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world}); launch with torchrun "
                        "or unset RANK and WORLD_SIZE")
    return Rank(rank, world, local, max(1, local_world))


# torchrun's elastic agent sets this in every worker it starts (with RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR ...). Cluster pods and job schedulers set WORLD_SIZE, RANK and often MASTER_ADDR for
# their own purposes, so those alone do not say that this process has peers.
TORCHRUN_VARIABLE = "TORCHELASTIC_RUN_ID"
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def under_torchrun(env: dict | None = None) -> bool:
    """Whether torchrun started this process (TORCHELASTIC_RUN_ID is set), so that its rank variables
    name real peer processes."""
    return TORCHRUN_VARIABLE in (os.environ if env is None else env)


def own_rank() -> Rank:
    """This process's rank for commands that only split work under a real torchrun (dfhead predict):
    rank_from_env() under torchrun, else 0 of 1 whatever RANK and WORLD_SIZE say."""
    return rank_from_env() if under_torchrun() else Rank()


@contextmanager
def without_stray_ranks(log: Callable[[str], None]) -> Iterator[Rank]:
    """Inside, rank variables that no torchrun set are hidden from rank_from_env (and from the processes
    started meanwhile), with one note through `log` when they would have split the work; restored on
    exit. Yields this process's Rank (own_rank).

    A pod with WORLD_SIZE=2 RANK=0 set by its scheduler would otherwise make a one-process command
    do only half of its work, with no peer to do the rest.
    """
    if under_torchrun():
        yield rank_from_env()
        return
    stray = {k: os.environ[k] for k in RANK_VARIABLES if k in os.environ}
    if any(os.environ.get(k, default) != default for k, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))):
        log(f"note: {' '.join(f'{k}={v}' for k, v in stray.items())} set, but not by torchrun (no {TORCHRUN_VARIABLE}): "
            "ignored, this one process does all the work")
    for k in stray:
        del os.environ[k]
    try:
        yield Rank()
    finally:
        os.environ.update(stray)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (someone else's live process counts): whose temporary folder is garbage."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version (e.g. "570.86.15"), or None without one."""
    try:
        text = NVIDIA_DRIVER_FILE.read_text()
    except OSError:
        return None
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else "unknown"


def _no_cuda_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return "this torch is a CPU-only build; install a CUDA build of torch"
    driver = nvidia_driver_version()
    if driver is None:
        return "torch sees no CUDA GPU (no NVIDIA driver on this machine)"
    return (f"an NVIDIA driver ({driver}) is loaded but torch {torch.__version__} (CUDA {torch.version.cuda}) "
            "cannot use it, usually because the driver is older than this CUDA build needs "
            "(CUDA 13 needs driver >= 580); update the driver or install a torch built for an older CUDA")


def resolve_device(device: str = "auto", rank: Rank | None = None):
    """A torch.device for `--device`: auto, cpu, cuda or cuda:N.

    "auto" and "cuda" take this rank's GPU (LOCAL_RANK) under torchrun, so ranks never share a
    GPU by accident. "auto" falls back to the CPU only where there is no NVIDIA GPU at all: a
    GPU whose driver this torch build cannot use is an error, not a silent CPU run.
    """
    import torch

    rank = rank_from_env() if rank is None else rank
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.version.cuda is not None and nvidia_driver_version() is not None:
            raise UserError(f"--device auto found a GPU it cannot use: {_no_cuda_reason()}; or pass --device cpu")
        else:
            return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: {_no_cuda_reason()}; or use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", rank.local % torch.cuda.device_count())  # one GPU per torchrun rank
        if dev.index >= torch.cuda.device_count():
            raise UserError(f"GPU {dev.index} does not exist ({torch.cuda.device_count()} visible); "
                            "use --nproc-per-node <= the number of GPUs")
    elif dev.type != "cpu":
        raise UserError(f"unsupported --device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


@contextmanager
def tf32_precision():
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA while inside; restored on exit.

    TF32 rounds the inputs to 10 mantissa bits and accumulates in fp32, the usual trade for
    training. The heads' fit, evaluate and predict all run inside this, so a threshold picked
    on validation scores applies to scores computed the same way. Only torch's fp32_precision
    API is used (torch >= 2.9): reading the legacy `allow_tf32` after setting it raises on
    torch 2.14. CPU maths is unaffected.
    """
    import torch

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
