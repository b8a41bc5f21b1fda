"""How far dfclip's losses are from the reference's (Purdue-M2/SP_CUP), measured on random batches.

Not a timing: each row is a numerical difference between two objectives on the same batches,
the reference's being its calculate_loss transcribed line by line (tests/sp_cup_reference.py,
scipy's fminbound search included). Batches are n = 512 rows (the reference's 256 doubled by
feature noise), half fakes, logits z = (2y - 1) * margin + N(0, 1.5^2): margin 0 is an untrained
head, 2 a learning one, 6 a trained one. Rows:
- flags_vs_cvar_auc: dfclip's `--loss vs --cvar-alpha 0.9 --auc-gamma 0.6` (CVaR of the VS losses)
  against the reference's vs_cvar_auc (lambda from the VS losses, applied to BCE): |value rel diff|;
- cvar_grad: dfclip's CVaR of BCE (`--cvar-alpha 0.9`, the boundary sample weighted by the
  fractional part of alpha n) against the reference's dag gradient at its exact lambda
  (boundary sample 0): ||g_dfclip - g_ref|| / ||g_ref||; values agree exactly;
- search_lambda_dag / search_lambda_vs: |lambda of the literal float32 fminbound search - exact lambda|;
- search_value_vs: the resulting |value rel diff| of vs_cvar_auc (first order: lambda minimises the VS
  objective but is applied to BCE), literal search vs exact;
- clamp_auc: dfclip's unclamped logistic AUC term against the reference's clamped one: |value rel diff|.

    python bench/sp_cup_diffs.py [--batches 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from common import ROOT, print_table, write_json

sys.path.insert(0, str(ROOT / "tests"))
from sp_cup_reference import binary_vs, reference_loss  # noqa: E402

from dfclip.heads.losses import (  # noqa: E402
    SP_CUP_VS, cvar_loss, head_loss, pairwise_auc_loss, searched_lambda, sp_cup_loss)

N, ALPHA, GAMMA = 512, 0.9, 0.6


def batch(rng: np.random.Generator, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    y = (rng.random(N) < 0.5).astype(np.float32)
    z = (2 * y - 1) * margin + rng.standard_normal(N) * 1.5
    return torch.from_numpy(z.astype(np.float32)), torch.from_numpy(y)


def measure(rng: np.random.Generator, margin: float) -> dict[str, float]:
    z, y = batch(rng, margin)
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    vs = binary_vs(z, y, "none").flatten()
    lower, upper = bce.min() - 1000, bce.max()
    out = {}

    exact = sp_cup_loss(z, y, "vs_cvar_auc", ALPHA, GAMMA)
    flags = head_loss(z, y, alpha=ALPHA, gamma=GAMMA, loss="vs", loss_options=SP_CUP_VS)
    out["flags_vs_cvar_auc"] = abs(flags.item() - exact.item()) / exact.item()

    z_a, z_b = z.clone().requires_grad_(), z.clone().requires_grad_()
    cvar_loss(F.binary_cross_entropy_with_logits(z_a, y, reduction="none"), ALPHA).backward()
    sp_cup_loss(z_b, y, "dag", ALPHA).backward()
    out["cvar_grad"] = ((z_a.grad - z_b.grad).norm() / z_b.grad.norm()).item()

    _, cut_dag = reference_loss(z, y, "dag", ALPHA, GAMMA)
    literal_vs, cut_vs = reference_loss(z, y, "vs_cvar_auc", ALPHA, GAMMA)
    out["search_lambda_dag"] = abs(cut_dag - searched_lambda(bce, ALPHA, lower, upper).item())
    out["search_lambda_vs"] = abs(cut_vs - searched_lambda(vs, ALPHA, lower, upper).item())
    out["search_value_vs"] = abs(literal_vs.item() - exact.item()) / exact.item()

    clamped = pairwise_auc_loss(z, y, "clamped_logistic").item()
    out["clamp_auc"] = abs(pairwise_auc_loss(z, y, "logistic").item() - clamped) / clamped
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    for margin in (0.0, 2.0, 6.0):
        samples = [measure(rng, margin) for _ in range(args.batches)]
        for key in samples[0]:
            values = np.array([s[key] for s in samples])
            rows.append({"margin": margin, "quantity": key, "median": float(np.median(values)),
                         "p90": float(np.quantile(values, 0.9)), "max": float(values.max())})
    print(f"{args.batches} batches of {N} rows per margin, alpha {ALPHA} (alpha n = {ALPHA * N:g}, "
          f"boundary weight {ALPHA * N - math.floor(ALPHA * N):.1f}/{ALPHA * N:g}), gamma {GAMMA}")
    print_table(rows, [("margin", "margin", "g"), ("quantity", "quantity", ""), ("median", "median", ".3g"),
                       ("p90", "p90", ".3g"), ("max", "max", ".3g")])
    write_json(args.json, {"batches": args.batches, "n": N, "alpha": ALPHA, "gamma": GAMMA, "rows": rows})


if __name__ == "__main__":
    main()
