"""Shared bits of the bench scripts: device clocks, machine description, tables, JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from dfclip.runtime import resolve_device, tf32_precision  # noqa: F401  (resolve_device: re-exported)
from dfclip.store.format import feature_parts

ROOT = Path(__file__).resolve().parents[1]


def clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work, so intervals are true wall time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def setup_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads (the bench machine is often shared); returns the count in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    """What the figures were measured on; the load average says how busy a shared machine was."""
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "loadavg_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"
    return f"{where}, torch {info['torch']}, {info['date']}, load average at start {info['loadavg_start'][0]:.1f}"


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as an aligned table; columns are (key, header, format spec), e.g. ("s", "seconds", ".2f")."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["" if r.get(k) is None else format(r[k], f) if f else str(r[k]) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, line in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | os.PathLike | None, result: dict) -> None:
    if path:
        result.setdefault("machine", {})["loadavg_end"] = list(os.getloadavg())
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}")


# --- roofline: the heads' matmul arithmetic against the machine's measured matmul peak ------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (rows, inner, cols): the head's own shape (a noise-doubled batch through a 768-wide layer) and a large one
PEAK_SHAPES = ((512, 768, 768), (2048, 2048, 2048))


def matmul_peak_gflops(device: torch.device, precision: str, seconds: float = 0.5) -> float:
    """The best GFLOP/s of plain a @ b in `precision` (fp32 / bf16) over PEAK_SHAPES, measured now.

    fp32 is measured with TF32 on, as training runs it (heads.train.train runs inside
    tf32_precision), so an fp32 epoch's share of this peak stays below 100%."""
    with tf32_precision():
        return _matmul_peak(device, precision, seconds)


def _matmul_peak(device: torch.device, precision: str, seconds: float) -> float:
    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a = torch.randn(m, k, device=device, dtype=DTYPES[precision])
        b = torch.randn(k, n, device=device, dtype=DTYPES[precision])
        a @ b  # warm-up: kernels, BLAS handles
        reps, t0 = 0, clock(device)
        while reps < 3 or clock(device) - t0 < seconds / len(PEAK_SHAPES):
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (clock(device) - t0) / 1e9)
    return best


def head_matmul_flops_per_row(cfg, dim: int) -> tuple[int, int]:
    """(forward FLOPs, backward FLOPs skipped) of the matmuls for one row through one head of cfg's
    kind, 2 per multiply-add. Backward is twice the forward (the weight and the input gradient of
    each matmul) less the input gradient of the head's first matmul when its input (the stored
    embedding) needs none, which autograd and HiddenLayer skip."""
    if cfg.head == "linear":
        return 2 * dim, 2 * dim
    if cfg.head == "layermix":  # the softmax mix of L blocks (an einsum), then the MLP on width dim / L
        width = dim // len(feature_parts(cfg.feature))
        hidden = cfg.hidden or width
        mlp = 2 * (width * hidden + (cfg.depth - 1) * hidden * hidden + hidden)
        return 2 * dim + mlp, 2 * dim  # the MLP's input needs its gradient (for the mixing weights)
    hidden = cfg.hidden or dim
    return 2 * (dim * hidden + (cfg.depth - 1) * hidden * hidden + hidden), 2 * dim * hidden


def epoch_matmul_flops(cfg, dim: int, train_rows: int, val_rows: int, k: int = 1) -> float:
    """Matmul FLOPs of one epoch of K heads: training steps (forward + backward, twice with SAM, on
    the noise-doubled batch with feature noise) plus one validation forward."""
    steps = train_rows // cfg.batch_size
    rows = cfg.batch_size * (2 if cfg.feature_noise else 1)
    forward, skipped = head_matmul_flops_per_row(cfg, dim)
    train = steps * rows * (3 * forward - skipped) * (2 if cfg.sam_rho > 0 else 1)
    return float(k * (train + val_rows * forward))


# --- ops per training step, from a torch.profiler trace ------------------------------------------

OPTIMIZER_REGIONS = ("Optimizer.step#BatchedAdamW.step", "Optimizer.zero_grad#BatchedAdamW.zero_grad",
                     "SAM.first_step", "SAM.second_step")


def _top_level_ops(events) -> tuple[int, int]:
    """(all, in OPTIMIZER_REGIONS) counts of aten ops not nested in another aten op: the ops the step issues."""
    total = optimizer = 0
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        names, parent = [], e.cpu_parent
        while parent is not None:
            names.append(parent.name)
            parent = parent.cpu_parent
        if any(n.startswith("aten::") for n in names):
            continue
        total += 1
        optimizer += any(n in OPTIMIZER_REGIONS for n in names)
    return total, optimizer


def ops_per_step(data, cfg, steps: tuple[int, int] = (3, 6)) -> dict:
    """Ops per training step of heads.train.train on `data` with `cfg` (one epoch of steps[0], then of
    steps[1] batches; the difference / extra steps is one step, so validation and setup cancel out).
    Counted on eager steps: a CUDA-graph step replays these ops with one launch."""
    import dataclasses

    from torch.profiler import ProfilerActivity, profile

    from dfclip.heads.train import train

    counts = []
    for n in steps:
        rows = n * cfg.batch_size
        part = dataclasses.replace(data, x=data.x[:rows], y=data.y[:rows])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train(part, [dataclasses.replace(cfg, epochs=1, warmup_epochs=0.0, cuda_graphs="off")], log=lambda line: None)
        counts.append(_top_level_ops(prof.events()))
    extra = steps[1] - steps[0]
    return {"step": (counts[1][0] - counts[0][0]) / extra, "optimizer_and_sam": (counts[1][1] - counts[0][1]) / extra}
