"""--precision: detection of native bf16 (from a fake /proc/cpuinfo), what runs in bf16 and what
stays float32, and bf16 vs fp32 training parity on a small task."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dfclip.errors import UserError
from dfclip.heads import precision as P
from dfclip.heads import train as T
from dfclip.heads.config import make_config
from dfclip.heads.models import build_head
from dfclip.store.synthetic import make_synthetic_store

CPU = torch.device("cpu")
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme de pse sse sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
flags\t\t: fpu vme de pse sse sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
OLD_XEON = "processor\t: 0\nflags\t\t: fpu sse sse2 avx2 avx512f avx512bw avx512_vnni\n"
AMX_ONLY = "processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics\n"


@pytest.mark.parametrize("cpuinfo, want", [(XEON, "bf16"), (AMX_ONLY, "bf16"), (OLD_XEON, "fp32"), (ARM, "fp32"),
                                           ("", "fp32")])
def test_auto_is_bf16_only_on_cpus_that_multiply_it_natively(cpuinfo, want):
    assert P.resolve_precision("auto", CPU, cpuinfo=cpuinfo) == want
    # explicit values are taken as they are, whatever the CPU
    assert P.resolve_precision("fp32", CPU, cpuinfo=XEON) == "fp32"
    assert P.resolve_precision("bf16", CPU, cpuinfo=OLD_XEON) == "bf16"


def test_avx512_without_bf16_is_not_mistaken_for_it():
    assert "avx512f" in P.cpu_flags(OLD_XEON) and not P.native_bf16(CPU, cpuinfo=OLD_XEON)


def test_auto_on_cuda_follows_the_gpus_bf16_support(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert P.resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert P.resolve_precision("auto", cuda) == "fp32"


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="--precision must be one of auto, fp32, bf16"):
        P.resolve_precision("fp16", CPU)


def test_bf16_runs_the_hidden_matmuls_and_keeps_logits_and_weights_float32():
    torch.manual_seed(0)
    head = build_head("mlp", 2, 64, seeds=[0, 1], dropout=0.0)
    x = torch.randn(300, 64)
    ref = head(x)
    with P.matmuls_in("bf16", CPU):
        low = head(x)
    assert low.dtype == torch.float32 and all(p.dtype == torch.float32 for p in head.parameters())
    rel = ((low - ref).abs().max() / ref.abs().max()).item()
    assert 1e-5 < rel < 5e-2  # bf16 rounding (8 significant bits) shows, and stays small
    low.sum().backward()  # gradients of float32 master weights are float32
    assert all(p.grad.dtype == torch.float32 for p in head.parameters())
    # the output layer (one number per row) stays float32: its matmul input is float32 under autocast too
    with P.matmuls_in("bf16", CPU):
        assert head.out(torch.randn(2, 5, 64)).dtype == torch.bfloat16  # what autocast alone would give
        assert head(x).dtype == torch.float32


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    # a weak signal, so val AUC is well below 1 and a precision effect could show
    return make_synthetic_store(tmp_path_factory.mktemp("prec") / "s", n=3000, dim=64, signal=1.5, seed=5)


def test_bf16_training_matches_fp32_val_auc(small):
    """Parity on a small task: 3 seeds, val AUC of bf16 fits within 0.005 of fp32 on average; the
    runs are really different arithmetic (not identical weights); config records the precision."""
    base = make_config(epochs=4, lr=3e-3, batch_size=64, feature_noise=True, sam_rho=0.05, cvar_alpha=0.5,
                       auc_gamma=0.5)
    aucs = {}
    for precision in ("fp32", "bf16"):
        results, _ = T.train(small, [dataclasses.replace(base, precision=precision, seed=s) for s in range(3)],
                             log=lambda line: None)
        assert all(r.config.precision == precision for r in results)
        aucs[precision] = [r.reports["val"]["auc"] for r in results]
        weights = results[0].head.state_dict()
        assert all(t.dtype == torch.float32 for t in weights.values())
        if precision == "fp32":
            fp32_weights = weights
    assert 0.6 < min(aucs["fp32"]) < 0.99  # a task where the AUC can move
    diff = sum(b - a for a, b in zip(aucs["fp32"], aucs["bf16"])) / 3
    assert abs(diff) < 0.005, aucs
    assert max((fp32_weights[n] - weights[n]).abs().max().item() for n in weights) > 1e-4


def test_auto_is_resolved_in_the_results_and_the_log(small, monkeypatch):
    lines = []
    monkeypatch.setattr(P, "native_bf16", lambda device, cpuinfo=None: True)
    (res,), _ = T.train(small, [make_config(epochs=1, batch_size=256)], log=lines.append)
    assert res.config.precision == "bf16"
    assert lines[0].endswith("; head matmuls in bf16")
    monkeypatch.setattr(P, "native_bf16", lambda device, cpuinfo=None: False)
    (res,), _ = T.train(small, [make_config(epochs=1, batch_size=256)], log=lines.append)
    assert res.config.precision == "fp32"
