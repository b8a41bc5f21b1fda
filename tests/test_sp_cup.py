"""Reproducing the reference (Purdue-M2/SP_CUP, train_test_clipv1.py): its objectives, schedule and commands.

`reference_loss` (tests/sp_cup_reference.py) is the reference's calculate_loss transcribed line
by line, scipy's fminbound search included. sp_cup_loss must equal it in value for every mode
(at the exact minimiser of its formula, and within its own search's error) and in gradient
wherever the gradient is unique.
"""

from __future__ import annotations

import dataclasses
import json
import math

import h5py
import numpy as np
import polars as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfclip import store
from dfclip.heads import train as T
from dfclip.heads.config import CHOICES, make_config
from dfclip.heads.losses import SP_CUP_MODES, Objective, clamped_logistic_pairs, searched_lambda, sp_cup_loss
from dfclip.heads.optim import BatchedAdamW
from dfclip.heads.report import default_run_name
from sp_cup_reference import binary_vs, reference_loss

# --- sp_cup_loss against the reference -------------------------------------------------------------


def _batch(rng: np.random.Generator, n: int, fake_rate: float = 0.5, scale: float = 3.0):
    z = torch.from_numpy((rng.standard_normal(n) * scale).astype(np.float32))
    y = torch.from_numpy((rng.random(n) < fake_rate).astype(np.float32))
    return z, y


def _fractional(alpha: float, n: int) -> bool:
    return abs(alpha * n - round(alpha * n)) > 1e-6


@pytest.mark.parametrize("mode", SP_CUP_MODES)
def test_value_equals_the_references_formula_at_its_minimiser(mode):
    """Against its formula with lambda searched exactly, and its literal float32 search, whose error
    in lambda (up to ~4e-3 where f is flat) enters vs_cvar_auc's value to first order: it is applied to
    other losses than it minimises."""
    rng = np.random.default_rng(list(SP_CUP_MODES).index(mode))
    for trial in range(40):
        n = int(rng.integers(2, 300))
        alpha, gamma = float(rng.uniform(0.05, 1.0)), float(rng.uniform(0.0, 2.0))
        if mode == "vs_cvar_auc" and not _fractional(alpha, n):
            continue  # integer alpha n: the searched lambda is not unique there (see the next test)
        z, y = _batch(rng, n, fake_rate=float(rng.uniform(0.05, 0.95)), scale=float(rng.uniform(0.1, 8)))
        want, _ = reference_loss(z, y, mode, alpha, gamma, exact_search=True)
        got = sp_cup_loss(z, y, mode, alpha, gamma)
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5), (trial, n, alpha, gamma)
        literal, _ = reference_loss(z, y, mode, alpha, gamma)  # its float32 search: first order in vs_cvar_auc
        assert got.item() == pytest.approx(literal.item(), rel=2e-3 if mode == "vs_cvar_auc" else 1e-5, abs=1e-4)


def test_lambda_is_the_searched_one():
    """Fractional alpha n: the unique minimiser; dag searches the BCE, vs_cvar_auc the VS losses (BCE bounds)."""
    rng = np.random.default_rng(5)
    checked = {"dag": 0, "vs_cvar_auc": 0, "upper bound": 0}
    for _ in range(150):
        n, alpha = int(rng.integers(2, 200)), float(rng.uniform(0.05, 1.0))
        if not _fractional(alpha, n):
            continue
        z, y = _batch(rng, n, scale=float(rng.uniform(0.1, 6)))
        bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        vs = binary_vs(z, y, "none").flatten()
        for mode, search in (("dag", bce), ("vs_cvar_auc", vs)):
            _, cutpt = reference_loss(z, y, mode, alpha, 0.6, exact_search=True)
            lam = searched_lambda(search, alpha, bce.min() - 1000, bce.max())
            assert lam.item() == pytest.approx(cutpt, abs=1e-6), (mode, n, alpha)
            k = math.ceil(alpha * n)  # the ceil(alpha n)-th largest, capped by max(bce)
            assert lam.item() == pytest.approx(min(search.sort(descending=True).values[k - 1].item(),
                                                   bce.max().item()), abs=1e-6)
            checked[mode] += 1
            checked["upper bound"] += mode == "vs_cvar_auc" and lam.item() == pytest.approx(bce.max().item())
    assert min(checked.values()) > 0, checked  # the max(bce) bound does bind sometimes: VS losses are larger


@pytest.mark.parametrize("mode", SP_CUP_MODES)
def test_gradient_equals_the_reference_formula_with_its_lambda_held(mode):
    """Autograd of the reference's formula (fminbound's lambda a constant) against ours.

    The sample whose loss is lambda gets 0 or 1/(alpha n) depending on which side of it the
    search stopped: not unique, so not compared (ours: 0, relu'(0)).
    """
    rng = np.random.default_rng(11)
    for trial in range(15):
        n, alpha, gamma = int(rng.integers(8, 200)), float(rng.uniform(0.1, 1.0)), float(rng.uniform(0, 2))
        if mode == "vs_cvar_auc" and not _fractional(alpha, n):
            continue
        z, y = _batch(rng, n, fake_rate=0.4)
        z_ref, z_ours = z.clone().requires_grad_(), z.clone().requires_grad_()
        want, cutpt = reference_loss(z_ref, y, mode, alpha, gamma, exact_search=True)
        want.backward()
        sp_cup_loss(z_ours, y, mode, alpha, gamma).backward()
        unique = torch.ones(n, dtype=torch.bool)
        if cutpt is not None:
            unique = (F.binary_cross_entropy_with_logits(z, y, reduction="none") - cutpt).abs() > 1e-6
        torch.testing.assert_close(z_ours.grad[unique], z_ref.grad[unique], rtol=1e-5, atol=1e-7)


def test_integer_alpha_n_dag_value_and_gradient_equal_the_search():
    """alpha n = m: lambda anywhere in [l_(m+1), l_(m)] minimises; the gradient reaches the top m losses."""
    rng = np.random.default_rng(2)
    for n, alpha in ((10, 0.3), (10, 0.9), (40, 0.25), (64, 0.5), (20, 1.0), (100, 0.07)):
        z, y = _batch(rng, n)
        z_ref, z_ours = z.clone().requires_grad_(), z.clone().requires_grad_()
        want, _ = reference_loss(z_ref, y, "dag", alpha, 0.0)
        want.backward()
        got = sp_cup_loss(z_ours, y, "dag", alpha)
        got.backward()
        assert got.item() == pytest.approx(want.item(), abs=1e-4)
        torch.testing.assert_close(z_ours.grad, z_ref.grad, rtol=1e-5, atol=1e-7)
        assert int((z_ours.grad != 0).sum()) == round(alpha * n)


@pytest.mark.parametrize("mode", ["auc", "vs_cvar_auc"])
def test_one_class_batches_fall_back_to_mean_bce(mode):
    z = torch.randn(12) * 3
    for cls in (0.0, 1.0):
        y = torch.full((12,), cls)
        want, _ = reference_loss(z, y, mode, 0.9, 0.6)
        got = sp_cup_loss(z, y, mode, 0.9, 0.6)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        assert got.item() == pytest.approx(F.binary_cross_entropy_with_logits(z, y).item(), rel=1e-6)


def test_dag_has_no_one_class_fallback():
    z, y = torch.randn(12) * 3, torch.ones(12)
    want, _ = reference_loss(z, y, "dag", 0.45, 0.6)
    assert sp_cup_loss(z, y, "dag", 0.45).item() == pytest.approx(want.item(), abs=1e-4)
    assert want.item() > F.binary_cross_entropy_with_logits(z, y).item()  # CVaR, not the mean


def test_clamped_pairs_cap_at_13_8_with_zero_gradient():
    d = torch.tensor([-20.0, -13.0, 0.0, 13.0, 20.0], requires_grad=True)
    loss = clamped_logistic_pairs(d)
    loss.sum().backward()
    assert loss[0].item() == pytest.approx(-math.log(1e-6), rel=1e-4) and d.grad[0] == 0
    assert loss[1].item() == pytest.approx(math.log1p(math.exp(13.0)), rel=1e-4) and d.grad[1] != 0
    assert loss[2].item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_batched_over_k_with_per_model_alpha_and_gamma():
    rng = np.random.default_rng(4)
    k, n = 4, 50
    z = torch.from_numpy(rng.standard_normal((k, n)).astype(np.float32) * 3)
    y = torch.from_numpy((rng.random(n) < 0.5).astype(np.float32)).expand(k, -1).clone()
    y[2] = 1.0  # one model whose batch has one class: its own fallback, not the others'
    alpha, gamma = [0.13, 0.5, 0.9, 1.0], [0.0, 0.6, 1.5, 0.3]
    for mode in SP_CUP_MODES:
        got = sp_cup_loss(z, y, mode, torch.tensor(alpha, dtype=torch.float64), torch.tensor(gamma))
        for i in range(k):
            assert got[i].item() == pytest.approx(sp_cup_loss(z[i], y[i], mode, alpha[i], gamma[i]).item(), rel=1e-6)


def test_objective_trains_the_configured_mode():
    cfgs = [make_config(objective="sp_cup:vs_cvar_auc", cvar_alpha=a, auc_gamma=g) for a, g in ((0.9, 0.6), (0.3, 0))]
    z, y = torch.randn(2, 64) * 3, (torch.rand(64) < 0.5).float().expand(2, -1)
    got = Objective(cfgs)(z, y)
    for i, c in enumerate(cfgs):
        assert got[i].item() == pytest.approx(sp_cup_loss(z[i], y[i], "vs_cvar_auc", c.cvar_alpha, c.auc_gamma).item())
    assert set(CHOICES["objective"]) == {"dfclip", *(f"sp_cup:{m}" for m in SP_CUP_MODES)}


@pytest.mark.parametrize("mode", SP_CUP_MODES)
def test_real_as_1_files_are_the_reference_with_swapped_vs_deltas(mode):
    """The reference on a realAS1 file (1 = real) is sp_cup_loss after --target-means real, which flips the
    labels (so our logit is -theirs), with --vs-delta-fake 1.1 --vs-delta-real 0.9: its Delta 0.9 on the reals."""
    rng = np.random.default_rng(9)
    n, alpha = 137, 0.9
    z_theirs, y_theirs = _batch(rng, n, scale=0.3)  # small logits: the worst 90% VS losses are not all 0
    want, _ = reference_loss(z_theirs, y_theirs, mode, alpha, 0.6, exact_search=True)
    swapped = sp_cup_loss(-z_theirs, 1 - y_theirs, mode, alpha, 0.6, vs={"delta_fake": 1.1, "delta_real": 0.9})
    assert swapped.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6)
    if mode in ("vs", "vs_cvar_auc"):  # the defaults keep Delta 0.9 on the fakes: a different loss
        plain = sp_cup_loss(-z_theirs, 1 - y_theirs, mode, alpha, 0.6)
        assert abs(plain.item() - want.item()) > 1e-4


@pytest.mark.parametrize("mode", SP_CUP_MODES)
def test_the_preset_alone_is_the_reference_on_its_real_as_1_files(mode):
    """--preset sp_cup on a store imported from realAS1 files with --target-means real is the reference's
    loss, VS included: the preset itself puts the reference's Delta 0.9 on the reals."""
    rng = np.random.default_rng(11)
    z_theirs, y_theirs = _batch(rng, 137, scale=0.3)
    cfg = make_config("sp_cup", objective=f"sp_cup:{mode}")
    want, _ = reference_loss(z_theirs, y_theirs, mode, cfg.cvar_alpha, cfg.auc_gamma, exact_search=True)
    got = Objective([cfg])(-z_theirs[None], (1 - y_theirs)[None])[0]
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6)


def test_default_run_name_names_the_sp_cup_mode():
    assert default_run_name(make_config("sp_cup")) == "mlp-sp_cup-vs_cvar_auc-a0.9-g0.6-s8079"
    assert default_run_name(make_config()) == "mlp-a1-g0-s0"


# --- the schedule and the last batch ---------------------------------------------------------------


@pytest.mark.parametrize("epochs", [1, 2, 6, 7, 10, 100])
def test_sp_cup_schedule_is_torchs_cosine_annealing_stepped_per_epoch(epochs):
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs / 4, eta_min=1e-6)
    for epoch in range(epochs):
        assert T.sp_cup_lr(epoch, epochs, 1e-5, 1e-6) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()
    if epochs == 100:  # a wave: 1e-5 -> 1e-6 at epoch 25 -> 1e-5 at 50, not restarts
        lrs = [T.sp_cup_lr(e, 100, 1e-5, 1e-6) for e in (0, 25, 50, 75, 99)]
        assert lrs[:4] == pytest.approx([1e-5, 1e-6, 1e-5, 1e-6]) and lrs[4] > 9.9e-6


def _record_steps(monkeypatch) -> list:
    seen = []
    real_step = BatchedAdamW.step

    def record(self, lr_scale=1.0):
        seen.append(self.param_groups[0]["lr"] * torch.as_tensor(lr_scale, dtype=torch.float32))
        return real_step(self, lr_scale=lr_scale)

    monkeypatch.setattr(BatchedAdamW, "step", record)
    return seen


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> str:
    from dfclip.store.synthetic import make_synthetic_store

    root = tmp_path_factory.mktemp("sp_cup_store") / "s"
    make_synthetic_store(root, n=300, dim=16, seed=1)
    return str(root)


def test_trainer_uses_the_sp_cup_lr_each_epoch_and_keeps_the_last_batch(small_store, monkeypatch):
    seen = _record_steps(monkeypatch)
    cfgs = [make_config(schedule="sp_cup", drop_last=False, epochs=6, batch_size=64, lr=lr, head="linear",
                        objective="sp_cup:vs_cvar_auc", cvar_alpha=0.9, auc_gamma=0.6) for lr in (1e-3, 3e-4)]
    _, data = T.train(small_store, cfgs, log=lambda s: None)
    n = data.counts["train"]
    steps = math.ceil(n / 64)
    assert n % 64 and len(seen) == 6 * steps  # the short last batch is a step
    for epoch in range(6):
        for s in range(steps):
            got = seen[epoch * steps + s]
            torch.testing.assert_close(got, torch.tensor([T.sp_cup_lr(epoch, 6, lr, 1e-6) for lr in (1e-3, 3e-4)]))


@pytest.mark.parametrize("noise,head,kept", [(False, "mlp", False), (True, "mlp", True), (False, "linear", True)])
def test_a_last_batch_of_one_row_is_dropped_only_where_batchnorm_would_see_one_row(noise, head, kept):
    cfg = make_config(drop_last=False, feature_noise=noise, head=head)
    assert T._batches_per_epoch(cfg, 2 * 256 + 1, 256) == (2 + kept, kept)
    assert T._batches_per_epoch(cfg, 2 * 256 + 2, 256) == (3, True)
    assert T._batches_per_epoch(make_config(feature_noise=noise, head=head), 2 * 256 + 2, 256) == (2, False)


# --- the reproduction commands, on SP_CUP-style files ------------------------------------------------


def write_sp_cup_files(folder, name: str, dataset: str, n: int, seed: int) -> tuple:
    """An SP_CUP-style pair: NAME.h5 holding an n x 768 float16 `dataset`, and NAME_realAS1.csv (Target 1 = real)."""
    rng = np.random.default_rng(seed)
    real = rng.random(n) < 0.4
    x = rng.standard_normal((n, 768)).astype(np.float32) * 0.1
    x[real, :8] += 0.5  # a learnable difference
    with h5py.File(folder / f"{name}.h5", "w") as f:
        f.create_dataset(dataset, data=x.astype(np.float16))
    csv = folder / f"{name}_realAS1.csv"
    pl.DataFrame({"Image Path": [f"{name}/{i:05d}.png" for i in range(n)], "Target": real.astype(int)}).write_csv(csv)
    return folder / f"{name}.h5", csv, real


# The README's "Reproducing SP_CUP" commands, with --epochs 2 and a small batch.
IMPORT_TRAIN = "import-h5 {d}/cup_train.h5 --csv {d}/cup_train_realAS1.csv --dataset train_features --target-means real --out {d}/cup_train"
IMPORT_VAL = "import-h5 {d}/cup_val.h5 --csv {d}/cup_val_realAS1.csv --dataset test_features --target-means real --out {d}/cup_val"
FIT = "fit {d}/cup_train --val-store {d}/cup_val --preset sp_cup"
SWEEP = ("sweep {d}/cup_train --val-store {d}/cup_val --preset sp_cup "
         "--objective sp_cup:dag,sp_cup:vs_cvar_auc --cvar-alpha 0.5,0.9")
MODES = {"vs_cvar_auc": "", "erm": " --objective sp_cup:erm", "dag": " --objective sp_cup:dag",
         "auc": " --objective sp_cup:auc", "vs": " --objective sp_cup:vs"}


def test_the_readme_reproduction_commands_run(tmp_path, dfembed, dfhead):
    _, _, real = write_sp_cup_files(tmp_path, "cup_train", "train_features", 301, seed=0)
    write_sp_cup_files(tmp_path, "cup_val", "test_features", 120, seed=1)
    for command in (IMPORT_TRAIN, IMPORT_VAL):
        code, out, err = dfembed(*command.format(d=tmp_path).split())
        assert code == 0, err
    meta = store.open(tmp_path / "cup_train").meta
    assert (meta["label"].to_numpy() == (~real).astype(int)).all()  # --target-means real: 1 = fake in the store

    for mode, flags in MODES.items():
        run_dir = tmp_path / "runs" / mode
        code, out, err = dfhead(*(FIT + flags).format(d=tmp_path).split(), "--epochs", "2", "--batch-size", "32",
                                "--runs-dir", tmp_path / "runs", "--name", mode)
        assert code == 0, (mode, err)
        saved = json.loads((run_dir / "config.json").read_text())["run"]
        assert saved["objective"] == f"sp_cup:{mode}" and saved["schedule"] == "sp_cup"
        assert saved["feature_noise"] and not saved["drop_last"] and saved["select"] == "last"
        assert (saved["vs_delta_fake"], saved["vs_delta_real"]) == (1.1, 0.9)
        history = pl.read_parquet(run_dir / "metrics.parquet")
        assert history.height == 2 and history["train_loss"].is_finite().all()

    code, out, err = dfhead(*SWEEP.format(d=tmp_path).split(), "--epochs", "1", "--batch-size", "32",
                            "--runs-dir", tmp_path / "runs", "--name", "grid")
    assert code == 0, err
    board = pl.read_parquet(tmp_path / "runs" / "grid" / "leaderboard.parquet")
    assert sorted(zip(board["objective"], board["cvar_alpha"])) == [
        ("sp_cup:dag", 0.5), ("sp_cup:dag", 0.9), ("sp_cup:vs_cvar_auc", 0.5), ("sp_cup:vs_cvar_auc", 0.9)]


def test_the_one_row_last_batch_note_is_said_once_per_sweep(small_store):
    """A sweep of several groups and chunks says the one-row note once, not once per chunk."""
    cfg = make_config(drop_last=False, feature_noise=False, head="mlp", epochs=1, precision="fp32")
    loaded = T.load_data(small_store, cfg, device=torch.device("cpu"))
    n = loaded.counts["train"]
    cfgs = [dataclasses.replace(cfg, batch_size=n - 1, seed=s, depth=d) for s in (0, 1) for d in (1, 2)]
    lines = []
    T.train(loaded, cfgs, log=lines.append)
    assert sum("last batch of each epoch has one row" in line for line in lines) == 1
    lines.clear()
    T.train(loaded, [dataclasses.replace(c, batch_size=n - 2) for c in cfgs], log=lines.append)
    assert not any("last batch of each epoch" in line for line in lines)
