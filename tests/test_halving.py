"""Successive halving (`dfhead sweep --halving`, heads.train.Halving): the rung schedule, who is
kept, that dropped configs leave the batched tensors, that a survivor trains as its own fit would,
the leaderboard it writes, and the one-line errors for bad --eta / --min-epochs. Also the per-seed
random streams it relies on, which every sweep now uses."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import polars as pl
import pytest
import torch

from dfclip import cli
from dfclip.errors import UserError
from dfclip.heads import train as T
from dfclip.heads.config import make_config
from dfclip.heads.models import BatchedMLP
from dfclip.heads.optim import BatchedAdamW
from dfclip.heads.run import sweep
from dfclip.store.synthetic import make_synthetic_store

QUIET = {"log": lambda line: None}
# fp32: parity with a fit is exact in fp32; bf16 matmuls of K heads may round apart from K = 1 ones.
FAST = dict(epochs=3, lr=1e-2, batch_size=64, precision="fp32")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return make_synthetic_store(tmp_path_factory.mktemp("halving") / "s", n=2000, dim=32, signal=4, fake_rate=0.7,
                                seed=1)


@pytest.fixture(scope="module")
def data(base):
    return T.load_data(base, make_config(**FAST), device=torch.device("cpu"))


def run(data, cfgs, **kw):
    return T.train(data, list(cfgs), **QUIET, **kw)[0]


def effective_diff(a, b) -> float:
    """Largest weight difference, leaving out what BatchNorm cancels (see tests/test_train.py _pre_bn_bias)."""
    skip = lambda n: (n.startswith("linears.") and n.endswith(".bias")) or n.endswith("running_mean")
    sa, sb = a.head.state_dict(), b.head.state_dict()
    return max((sa[n] - sb[n]).abs().max().item() for n in sa if not skip(n))


# --- the schedule and the rule ------------------------------------------------------------------


@pytest.mark.parametrize("eta, min_epochs, epochs, rungs", [
    (3, 1, 10, [1, 3, 9, 10]), (3, 1, 9, [1, 3, 9]), (2, 2, 8, [2, 4, 8]), (2, 1, 5, [1, 2, 4, 5]),
    (3, 5, 5, [5]), (4, 3, 20, [3, 12, 20]),
])
def test_rungs_are_min_epochs_times_powers_of_eta_then_epochs(eta, min_epochs, epochs, rungs):
    assert T.Halving(eta, min_epochs).rungs(epochs) == rungs


def test_survivors_are_the_best_third_ties_to_the_earlier_config_nan_last():
    h = T.Halving(3)
    scores = {0: 0.7, 1: 0.9, 2: 0.9, 3: math.nan, 4: 0.95, 5: 0.9, 6: 0.1}
    assert h.survivors(scores, "auc") == [1, 4]  # 7 // 3 = 2: 0.95, then the first 0.9
    assert h.survivors(scores, "loss") == [0, 6]  # lower is better; NaN still last
    assert h.survivors({5: math.nan, 8: math.nan}, "auc") == [5]  # at least one goes on
    assert T.Halving(2).survivors({i: 0.5 for i in range(5)}, "auc") == [0, 1]


@pytest.mark.parametrize("halving, message", [
    (T.Halving(eta=1), "--eta must be an integer >= 2"),
    (T.Halving(min_epochs=0), "--min-epochs must be between 1 and --epochs (3), got 0"),
    (T.Halving(min_epochs=4), "--min-epochs must be between 1 and --epochs (3), got 4"),
])
def test_bad_halving_settings_are_user_errors(data, halving, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(data, [make_config(**FAST)], halving=halving)


def test_halving_needs_one_epochs(data):
    with pytest.raises(UserError, match="one --epochs"):
        run(data, [make_config(**FAST), make_config(**(FAST | dict(epochs=2)))], halving=T.Halving())


# --- pruning --------------------------------------------------------------------------------


GRID = [dict(cvar_alpha=a, lr=lr) for lr in (1e-4, 1e-2) for a in (1.0, 0.5, 0.2)]  # lr 1e-4 barely moves


def test_pruning_keeps_the_best_third_at_each_rung_and_shrinks_the_group(data, monkeypatch):
    cfgs = [make_config(**(FAST | dict(head="linear") | kw)) for kw in GRID]
    full = run(data, cfgs)  # no halving: every config's epoch-1 val AUC, as halving sees it
    at_rung1 = {i: r.history.filter(pl.col("epoch") == 1)["val_auc"][0] for i, r in enumerate(full)}
    expected = T.Halving(3).survivors(at_rung1, "auc")

    sizes = []  # models in the batched head each time training resumes
    real = T.GroupRun.run_until
    monkeypatch.setattr(T.GroupRun, "run_until", lambda self, e: sizes.append((e, self.head.k)) or real(self, e))
    halved = run(data, cfgs, halving=T.Halving(3))
    assert sizes == [(1, 6), (3, 2)]  # pruned configs leave the tensors
    stops = [int(r.history["epoch"].max()) for r in halved]
    assert [i for i, s in enumerate(stops) if s == 3] == expected and sorted(stops) == [1, 1, 1, 1, 3, 3]
    for i, (h, f) in enumerate(zip(halved, full)):
        # history up to its stop is the full sweep's; a dropped config keeps its best epoch so far
        assert np.allclose(h.history.drop("seconds").to_numpy(),
                           f.history.filter(pl.col("epoch") <= stops[i]).drop("seconds").to_numpy(), atol=1e-6)
        assert h.best_epoch <= stops[i]


def test_optimizer_select_keeps_the_rows_state_lr_and_weight_decay():
    head = BatchedMLP(4, 8, hidden=5, depth=2, seeds=[0, 1, 2, 3])
    opt = BatchedAdamW(list(head.parameters()), lr=torch.tensor([1., 2., 3., 4.]), weight_decay=torch.tensor([5., 6., 7., 8.]))
    head(torch.randn(6, 8)).sum().backward()
    opt.step()
    kept = head.select([3, 1])
    new = opt.select([3, 1], list(kept.parameters()))
    assert new.param_groups[0]["lr"].tolist() == [4., 2.] and new.param_groups[0]["weight_decay"].tolist() == [8., 6.]
    for p_old, p_new in zip(head.parameters(), kept.parameters()):
        s_old, s_new = opt.state[p_old], new.state[p_new]
        assert s_new["step"] == 1
        assert torch.equal(s_new["exp_avg"], s_old["exp_avg"][[3, 1]])
        assert torch.equal(s_new["exp_avg_sq"], s_old["exp_avg_sq"][[3, 1]])


# --- a survivor is its own fit -----------------------------------------------------------------


def test_a_survivor_equals_its_own_fit_with_dropout_and_noise(data):
    """Dropout masks and feature noise come from the config's seed, batches from the group's first
    seed (equal here): pruning the others changes nothing for the survivor, within the tolerance K>1
    MLP sweeps meet (tests/test_train.py)."""
    cfgs = [make_config(**(FAST | dict(feature_noise=True) | kw)) for kw in GRID]
    halved = run(data, cfgs, halving=T.Halving(3))
    survivors = [i for i, r in enumerate(halved) if r.history["epoch"].max() == 3]
    assert len(survivors) == 2
    for i in survivors:
        (alone,) = run(data, [cfgs[i]])
        assert effective_diff(halved[i], alone) < 1e-5
        assert halved[i].history["train_loss"].to_numpy() == pytest.approx(alone.history["train_loss"].to_numpy(),
                                                                           abs=1e-5)
        assert halved[i].reports["val"]["auc"] == pytest.approx(alone.reports["val"]["auc"], abs=1e-3)


def test_sweep_members_draw_their_own_seeds_noise_and_masks(data):
    """Per-seed streams in every sweep: a member with another seed than the group's first gets its own
    seed's dropout and noise (only the batch order is the group's), so it equals a fit of its config
    whose batches follow the group's first seed."""
    cfgs = [make_config(**(FAST | dict(feature_noise=True, seed=s, cvar_alpha=a))) for s, a in ((0, 1.0), (5, 0.5))]
    group = run(data, cfgs)
    for cfg, member in zip(cfgs, group):
        (alone,) = T.train_group(data, [cfg], batch_seed=0, **QUIET)
        assert effective_diff(member, alone) < 1e-4
        assert member.reports["val"]["auc"] == pytest.approx(alone.reports["val"]["auc"], abs=1e-3)


# --- the sweep directory and the CLI ------------------------------------------------------------


def test_sweep_halving_writes_stop_epochs_and_a_full_length_best(base, tmp_path):
    cfgs = [make_config(**(FAST | dict(head="linear") | kw)) for kw in GRID]
    out, summary = sweep(base, cfgs, runs_dir=tmp_path, name="h", device="cpu", halving=True, **QUIET)
    runs = pl.read_parquet(out / "runs.parquet")
    assert sorted(runs["stop_epoch"].to_list()) == [1, 1, 1, 1, 3, 3]
    assert runs["stop_epoch"][0] == 3  # full-length runs first
    best = json.loads((out / "best" / "config.json").read_text())
    assert pl.read_parquet(out / "best" / "metrics.parquet")["epoch"].max() == 3
    assert best["run"]["cvar_alpha"] == runs["cvar_alpha"][0] and best["run"]["lr"] == runs["lr"][0]
    assert json.loads((out / "sweep.json").read_text())["halving"]["rungs"] == [1, 3]
    assert "stop_epoch" in summary.columns


def dfhead(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["dfhead", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.dfhead_main()
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--halving", "--eta", "1"], "--eta must be an integer >= 2"),
    (["--halving", "--min-epochs", "0"], "--min-epochs must be between 1 and --epochs (3), got 0"),
    (["--halving", "--min-epochs", "5"], "--min-epochs must be between 1 and --epochs (3), got 5"),
    (["--eta", "2"], "add --halving"),
])
def test_bad_eta_and_min_epochs_are_one_line_errors(base, tmp_path, monkeypatch, capsys, args, message):
    code, err = dfhead(monkeypatch, capsys, "sweep", base, "--epochs", "3", "--runs-dir", tmp_path, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "sweep").exists()  # refused before anything was trained or written


def test_cpu_chunks_do_not_change_mlp_results_with_dropout_and_noise(data, monkeypatch):
    """Per-seed streams make a config's result independent of the CPU chunk it lands in, dropout and
    feature noise included (they used to be drawn per chunk), with two seeds in the group."""
    cfgs = [make_config(**(FAST | dict(feature_noise=True, seed=s, cvar_alpha=a)))
            for s, a in ((0, 1.0), (1, 0.5), (0, 0.3))]
    whole = run(data, cfgs)
    monkeypatch.setattr(T, "CPU_CHUNK_BYTES", 1)  # one head per chunk
    chunked = run(data, cfgs)
    for a, b in zip(whole, chunked):
        assert effective_diff(a, b) < 1e-5
        assert a.reports["val"]["auc"] == pytest.approx(b.reports["val"]["auc"], abs=1e-4)


def test_cpu_splits_a_noisy_group_by_seed_without_changing_results(data, monkeypatch):
    """On a CPU each chunk of a group with feature noise holds one seed (one shared noisy batch);
    the whole group in one run (as on a GPU: each head its seed's copy of the batch) trains the same."""
    cfgs = [make_config(**(FAST | dict(feature_noise=True, seed=s, cvar_alpha=a, head=h)))
            for h in ("mlp", "linear") for s, a in ((0, 1.0), (1, 0.5), (0, 0.3))]
    assert T._chunks(data, cfgs) == [[0, 2], [1], [3, 5], [4]]
    split = run(data, cfgs)
    monkeypatch.setattr(T, "_split_by_seed", lambda cfg, device: False)
    assert T._chunks(data, cfgs) == [[0, 1, 2], [3, 4, 5]]
    whole = run(data, cfgs)
    for a, b in zip(split, whole):
        assert effective_diff(a, b) < 1e-5
        assert a.reports["val"]["auc"] == pytest.approx(b.reports["val"]["auc"], abs=1e-4)


def test_halving_needs_one_select():
    """Rungs rank every config by one score; val AUC (higher is better) and val loss (lower) cannot be mixed."""
    cfgs = [make_config(**FAST, select="auc"), make_config(**FAST, select="loss")]
    with pytest.raises(UserError, match="--halving needs one --select for the whole sweep, got auc, loss"):
        T.Halving(3).check(cfgs)
    T.Halving(3).check(cfgs[:1])  # one value is fine
