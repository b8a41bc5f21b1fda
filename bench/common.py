"""Shared bits of the bench scripts: device clocks, machine description, tables, JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from dfclip.runtime import resolve_device  # noqa: F401  (re-exported for the bench scripts)

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
