"""CUDA-graph training steps (`--cuda-graphs auto|on|off`): one launch per step instead of hundreds.

On a GPU a K-head training step is a few hundred small kernels (forward, CVaR + AUC losses,
backward, SAM's two half-steps, the fused AdamW): ~0.3-0.5 ms of arithmetic for K = 24 MLP heads,
but ~2 ms of Python and launches. A CUDA graph records the whole step once and replays it with
one launch. What a replay needs, everything it reads lives in device buffers that keep their
address:

- the batch's row positions, copied into a static buffer (`copy_`) before each replay;
- the step count (a device scalar the step adds 1 to), from which the cosine schedule's lr
  factor is computed on the device (device_cosine_scale, the twin of train._lr_scale); the
  sp_cup schedule's per-model factor is a [K] buffer refilled once per epoch;
- AdamW's step count and lr (BatchedAdamW.device_step); the epoch's summed training loss.

The random streams (dropout masks, feature noise) are the configs' own generators, registered with
the graph, so a replay draws exactly what the eager step would. The step function is the trainer's
own (GroupRun._batch and GroupRun._step with graph_safe=True): no host reads, no branch on data,
the same shapes every call. The first WARMUP steps run eagerly on a side stream (lazy
initialisation of cuBLAS and autograd), then the step is captured and replayed. The last, short
batch of an epoch (--no-drop-last) runs the same step function eagerly.

`auto` uses graphs on a GPU when the capture works and falls back to eager steps with one line
saying why; `on` makes a failed capture an error; `off` and any CPU run eager steps.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dfclip.errors import UserError

WARMUP = 3  # eager steps before the capture (torch's guidance for whole-step capture)


def device_cosine_scale(step: torch.Tensor, total: int, warmup: int) -> torch.Tensor:
    """train._lr_scale on the device: step is a float64 0-dim tensor (0-based); float64 out."""
    decay = 0.5 * (1 + torch.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    if warmup <= 0:
        return decay
    return torch.where(step < warmup, (step + 1) / warmup, decay)


class CudaBackend:
    """Capture and replay with torch.cuda (tests substitute an emulation to run the same code on a CPU)."""

    def applies(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def problem(self) -> str | None:
        """Why graphs cannot be used with this torch, or None."""
        if not hasattr(torch.cuda, "CUDAGraph") or not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            return f"torch {torch.__version__} cannot capture draws from a seeded generator"
        return None

    def warmup(self, fn: Callable[[], None]) -> None:
        """fn() eagerly on a side stream, as torch asks before a capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn: Callable[[], None], generators: list[torch.Generator], pool) -> object:
        graph = torch.cuda.CUDAGraph()
        for g in generators:
            graph.register_generator_state(g)
        with torch.cuda.graph(graph, pool=pool):
            fn()
        return graph

    def replay(self, graph) -> None:
        graph.replay()

    def pool(self):
        return torch.cuda.graph_pool_handle()


BACKEND = CudaBackend()


def use_graphs(mode: str, device: torch.device, log: Callable[[str], None]) -> bool:
    """Whether training steps on `device` are captured, for --cuda-graphs `mode` (auto, on, off)."""
    if mode == "off" or not BACKEND.applies(device):
        return False
    why = BACKEND.problem()
    if why is None:
        return True
    if mode == "on":
        raise UserError(f"--cuda-graphs on: {why}; use --cuda-graphs auto or off")
    log(f"note: CUDA graphs off, eager steps: {why}")
    return False


class GraphedSteps:
    """The training steps of one GroupRun (until its models change: halving builds a new one).

    Call begin(step) before the first step of a run_until call and begin_epoch() before each
    epoch; then step(idx) per batch. loss_sum is the epoch's summed training loss [K].
    """

    def __init__(self, run, mode: str, log: Callable[[str], None]) -> None:
        self.run, self.mode, self.log = run, mode, log
        c0, device, k = run.cfgs[0], run.data.x.device, len(run.cfgs)
        self.step_count = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_sum = torch.zeros(k, device=device)
        self.sp_cup = c0.schedule == "sp_cup"
        self.epoch_scale = torch.zeros(k, dtype=torch.float64, device=device)
        self.full_rows = run.batch_size
        self.idx: dict[int, torch.Tensor] = {}  # static position buffers, by batch rows
        self.calls, self.graph, self.failed = 0, None, False
        self.pool = None

    def begin(self, step: int) -> None:
        """Device counters from the host's: the run's step count and AdamW's."""
        self.step_count.fill_(step)
        self.run.opt.begin_device_steps()

    def begin_epoch(self, epoch_scale: list[float] | None) -> None:
        """Zero the epoch's loss; with the sp_cup schedule, set the epoch's lr factor per model."""
        self.loss_sum.zero_()
        if self.sp_cup:
            self.epoch_scale.copy_(torch.tensor(epoch_scale, dtype=torch.float64))

    def _scale(self) -> torch.Tensor:
        if self.sp_cup:
            return self.epoch_scale
        return device_cosine_scale(self.step_count, self.run.total, self.run.warmup)

    def _body(self, idx: torch.Tensor) -> None:
        """The capture-safe step: reads idx and the device counters, writes weights, moments and loss_sum."""
        xb, yb = self.run._batch(idx)
        loss = self.run._step(xb, yb, self._scale(), graph_safe=True)
        self.loss_sum.add_(loss.detach())
        self.step_count.add_(1)

    def step(self, idx: torch.Tensor) -> None:
        """One training step on rows idx [B]: replayed, captured, or eager (warm-up, short batch, fallback)."""
        rows = idx.numel()
        buf = self.idx.get(rows)
        if buf is None:
            buf = self.idx[rows] = torch.empty_like(idx)
        buf.copy_(idx)
        body = lambda: self._body(buf)  # noqa: E731
        if rows != self.full_rows or self.failed:
            body()
        elif self.graph is not None:
            BACKEND.replay(self.graph)
        elif self.calls < WARMUP:
            BACKEND.warmup(body)
            self.calls += 1
        else:
            self._capture(body)
        self.run.opt.advance_host_steps(1)

    def _capture(self, body: Callable[[], None]) -> None:
        """Capture the step and replay it for this batch; on failure (auto) run it eagerly from now on."""
        generators = list({id(g): g for g in self.run.noise_gens + self.run.dropout_gens}.values())
        try:
            self.pool = self.pool or BACKEND.pool()
            self.graph = BACKEND.capture(body, generators, self.pool)
        except Exception as e:  # a capture records nothing it ran: the state is that of before it
            if self.mode == "on":
                raise UserError(f"--cuda-graphs on: capturing the training step failed: {e}; "
                                "use --cuda-graphs auto or off") from e
            self.log(f"note: CUDA graphs off, eager steps: capturing the training step failed "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            self.failed = True
            body()
            return
        BACKEND.replay(self.graph)
