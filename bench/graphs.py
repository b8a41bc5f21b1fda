"""Graph-captured training steps vs eager ones: the same fit, equal results, and the time of each.

    python bench/graphs.py --device cuda --rows 50000 --dim 768 --json graphs.json

Fits the paper configuration (MLP 3 x dim, CVaR + AUC, feature noise, SAM, --precision auto) on a
synthetic store twice from the same seed: --cuda-graphs off, then on. The two must agree (the
weights within bf16 round-off, the val AUC within 0.002); the JSON says whether they do and
which --cuda-graphs later runs should use ("auto" when they agree, "off" when they do not or the
capture failed). bench/gpu.sh runs this first, so a GPU run proves exactness before it reports
any speed. On a CPU both fits are eager (graphs apply to GPUs only) and agree trivially.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from common import clock, describe, machine_info, resolve_device, write_json

from dfclip.errors import UserError
from dfclip.heads import graphs
from dfclip.heads.config import make_config
from dfclip.heads.data import load_data
from dfclip.heads.train import train
from dfclip.store.synthetic import make_synthetic_store

RTOL, ATOL, AUC_TOL = 1.6e-2, 2e-3, 2e-3  # bf16 round-off


def timed_fit(data, cfg, device) -> tuple[object, list[float], list[str]]:
    """(result, seconds of each epoch, log lines) of one fit on loaded data."""
    marks, lines = [clock(device)], []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("epoch"):
            marks.append(clock(device))

    (result,), _ = train(data, [cfg], log=log)
    return result, [b - a for a, b in zip(marks, marks[1:])], lines


def compare(eager, graphed) -> dict:
    """How far the graphed fit is from the eager one: weights, val AUC, per-epoch training loss."""
    a, b = eager.head.state_dict(), graphed.head.state_dict()
    diffs = {n: (a[n].float() - b[n].float()).abs().max().item() for n in a}
    close = all(torch.allclose(a[n].float(), b[n].float(), rtol=RTOL, atol=ATOL) for n in a)
    auc_e, auc_g = eager.reports["val"]["auc"], graphed.reports["val"]["auc"]
    loss_e, loss_g = eager.history["train_loss"].to_list(), graphed.history["train_loss"].to_list()
    return {"match": bool(close and abs(auc_e - auc_g) <= AUC_TOL),
            "bit_exact": all(torch.equal(a[n], b[n]) for n in a), "max_weight_diff": max(diffs.values()),
            "val_auc_eager": auc_e, "val_auc_graphed": auc_g,
            "train_loss_eager": loss_e, "train_loss_graphed": loss_g}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    device = resolve_device(args.device)
    info = machine_info(device)
    cfg = make_config("paper", epochs=args.epochs)
    out = {"bench": "graphs", "machine": info, "rows": args.rows, "dim": args.dim, "epochs": args.epochs,
           "config": cfg.to_dict(), "applies": graphs.BACKEND.applies(device),
           "tolerance": {"rtol": RTOL, "atol": ATOL, "val_auc": AUC_TOL}}
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = make_synthetic_store(Path(tmp) / "s", n=args.rows, dim=args.dim, signal=3.0)
        data = load_data(store_dir, cfg, device=device)
        eager, eager_s, _ = timed_fit(data, dataclasses.replace(cfg, cuda_graphs="off"), device)
        t = time.perf_counter()
        try:
            graphed, graphed_s, lines = timed_fit(data, dataclasses.replace(cfg, cuda_graphs="on"), device)
        except (UserError, RuntimeError) as e:  # the capture failed: later runs train eager
            out.update(match=False, use="off", error=f"{type(e).__name__}: {e}", eager_epoch_s=eager_s,
                       graphed_failed_after_s=time.perf_counter() - t)
            write_json(args.json, out)
            print(f"graphs: capture failed ({e}); later stages use --cuda-graphs off")
            return
    out.update(compare(eager, graphed), eager_epoch_s=eager_s, graphed_epoch_s=graphed_s,
               notes=[line for line in lines if "CUDA graphs" in line])
    out["use"] = "auto" if out["match"] else "off"
    # the first epoch includes the warm-up steps and the capture; the last is the steady state
    out["speedup_last_epoch"] = eager_s[-1] / graphed_s[-1]
    write_json(args.json, out)
    print(f"graphs on {describe(info)}: {'graph-captured steps' if out['applies'] else 'eager steps (no GPU)'}; "
          f"graphed vs eager: {'match' if out['match'] else 'MISMATCH'} (bit exact: {out['bit_exact']}, max weight "
          f"diff {out['max_weight_diff']:.2e}, val AUC {out['val_auc_graphed']:.4f} vs {out['val_auc_eager']:.4f}); "
          f"epochs {' '.join(f'{s:.2f}' for s in graphed_s)}s vs {' '.join(f'{s:.2f}' for s in eager_s)}s, "
          f"last epoch {out['speedup_last_epoch']:.2f}x; later stages use --cuda-graphs {out['use']}")


if __name__ == "__main__":
    main()
