"""The benches' roofline counts matmul FLOPs analytically (bench/common.py); here they are checked
against torch's own FlopCounterMode over one real training step of each head kind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dfclip.heads.config import make_config
from dfclip.heads.models import build_head, head_options

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import epoch_matmul_flops, head_matmul_flops_per_row  # noqa: E402


@pytest.mark.parametrize("kind", ["mlp", "linear", "layermix"])
def test_counted_flops_of_a_training_step_are_torchs(kind):
    dim, rows = 48, 32
    extra = {"feature": "block1+block2+block3"} if kind == "layermix" else {}
    cfg = make_config(head=kind, hidden=20, depth=3, precision="fp32", **extra)
    head = build_head(kind, 1, dim, [0], **head_options(cfg)).train()
    x = torch.randn(rows, dim)  # the stored embedding: no gradient
    with FlopCounterMode(display=False) as counter:
        head(x).sum().backward()
    forward, skipped = head_matmul_flops_per_row(cfg, dim)
    assert counter.get_total_flops() == rows * (3 * forward - skipped)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head.eval()(x)
    assert counter.get_total_flops() == rows * forward


def test_epoch_flops_add_steps_sam_noise_and_validation():
    cfg = make_config(head="linear", batch_size=10, feature_noise=True, sam_rho=0.0)
    forward, skipped = head_matmul_flops_per_row(cfg, 8)
    assert epoch_matmul_flops(cfg, 8, train_rows=35, val_rows=7) == 3 * 20 * (3 * forward - skipped) + 7 * forward
    with_sam = make_config(head="linear", batch_size=10, feature_noise=False, sam_rho=0.05)
    assert epoch_matmul_flops(with_sam, 8, 35, 7, k=4) == 4 * (3 * 10 * (3 * forward - skipped) * 2 + 7 * forward)
