"""The training loop (heads.train) on small synthetic stores: determinism, fit/sweep parity,
SAM and BatchNorm wiring, the schedule, model selection, and the split rules end to end."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dfclip.heads import train as T
from dfclip import store
from dfclip.heads.config import make_config
from dfclip.heads.data import load_data
from dfclip.heads.mlp_layer import HiddenLayer
from dfclip.heads.optim import BatchedAdamW
from dfclip.errors import UserError
from dfclip.store.synthetic import SYNTHETIC_PROVENANCE, make_synthetic_store, rewrite_store
from dfclip.store.writer import ShardWriter

QUIET = {"log": lambda line: None}
# fp32: these tests compare trainings to round-off (sweep member vs fit, K chunks); bf16 has its own tests.
FAST = dict(epochs=3, lr=1e-2, batch_size=64, precision="fp32")


def row_keys(x: torch.Tensor | np.ndarray) -> list[bytes]:
    """One hashable key per embedding row (random synthetic rows are all distinct)."""
    return [r.tobytes() for r in np.asarray(x, dtype=np.float32)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """2000 rows, dim 32, 70 % fake from 3 generators, videos of 4 frames, a strong planted signal."""
    return make_synthetic_store(tmp_path_factory.mktemp("train") / "s", n=2000, dim=32, signal=4, fake_rate=0.7,
                                seed=1)


@pytest.fixture(scope="module")
def base_meta(base) -> tuple[np.ndarray, pl.DataFrame]:
    return store.open(base).load()


def cfg_of(**kw):
    """FAST settings with overrides."""
    return make_config(**(FAST | kw))


def run(store_dir, *cfgs, **kw):
    return T.train(store_dir, list(cfgs), **QUIET, **kw)


def states_max_diff(a: dict, b: dict, skip=lambda name: False) -> float:
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a if not skip(n))


def history_values(result) -> np.ndarray:
    return result.history.drop("seconds").to_numpy()


# --- determinism -----------------------------------------------------------------------


def test_same_seed_same_result_and_other_seed_differs(base):
    cfg = cfg_of(feature_noise=True)  # dropout + noise: every random stream in play
    (a,), _ = run(base, cfg)
    (b,), _ = run(base, cfg)
    (c,), _ = run(base, dataclasses.replace(cfg, seed=1))
    assert np.array_equal(history_values(a), history_values(b))
    assert states_max_diff(a.head.state_dict(), b.head.state_dict()) == 0.0
    assert a.reports == b.reports
    assert not np.array_equal(history_values(a), history_values(c))
    assert states_max_diff(a.head.state_dict(), c.head.state_dict()) > 1e-3


# --- a sweep member is the model it would be alone ---------------------------------------


def test_sweep_members_have_their_own_init_and_share_the_groups_batches(base, monkeypatch):
    """Model k of a K=3 group starts from the weights of a K=1 fit with its seed; all three see one
    batch per step (one pass over the data), in the order of the group's first seed."""
    seen = []
    real_build, real_batches = T.build_head, T.epoch_batches

    def build(*a, **kw):
        head = real_build(*a, **kw)
        seen.append(("init", {n: t.clone() for n, t in head.state_dict().items()}))
        return head

    def batches(*a, **kw):
        out = real_batches(*a, **kw)
        seen.append(("batches", torch.stack(out)))  # [steps, 1, B]
        return out

    monkeypatch.setattr(T, "build_head", build)
    monkeypatch.setattr(T, "epoch_batches", batches)
    cfgs = [cfg_of(epochs=2, seed=s, cvar_alpha=a) for s, a in ((3, 1.0), (7, 0.5), (11, 0.3))]
    run(base, *cfgs)
    group = seen
    assert group[1][1].shape[1] == 1  # one batch per step for the whole group
    alone = []
    for k, cfg in enumerate(cfgs):
        seen = []
        run(base, cfg)
        alone.append(seen)
        init1 = seen[0][1]
        assert all(torch.equal(group[0][1][n][k], init1[n][0]) for n in init1)
    # the group's batches are those of a fit with the first config's seed, and seeds do matter
    assert torch.equal(group[1][1], alone[0][1][1]) and torch.equal(group[2][1], alone[0][2][1])
    assert not torch.equal(alone[0][1][1], alone[1][1][1])


def test_k3_linear_sweep_equals_three_fits(base):
    """Without dropout or noise (a linear probe has neither) a K=3 group trains each model exactly as
    alone, with per-model alpha, gamma, lr, weight decay and rho (one member under SAM)."""
    common = FAST | dict(head="linear", lr=3e-2)
    cfgs = [make_config(**common, seed=0),  # one seed: the group's batch order is the first seed's
            make_config(**(common | dict(seed=0, cvar_alpha=0.5, auc_gamma=0.5, sam_rho=0.05))),
            make_config(**(common | dict(seed=0, cvar_alpha=0.3, lr=1e-2, weight_decay=1e-2)))]
    group, _ = run(base, *cfgs)
    for cfg, member in zip(cfgs, group):
        (alone,), _ = run(base, cfg)
        assert np.allclose(history_values(member), history_values(alone), atol=1e-4, rtol=0)
        assert states_max_diff(member.head.state_dict(), alone.head.state_dict()) < 1e-4
        assert member.reports["val"]["auc"] == pytest.approx(alone.reports["val"]["auc"], abs=1e-4)
        assert member.threshold == pytest.approx(alone.threshold, abs=1e-4)


def test_cpu_chunking_does_not_change_results(base, monkeypatch):
    """CPU groups train in cache-sized chunks that all follow the group's batch order, so a config's
    result does not depend on the chunk it lands in (linear probe: no dropout randomness)."""
    cfgs = [cfg_of(head="linear", lr=3e-2, seed=s, cvar_alpha=a) for s, a in ((0, 1.0), (1, 0.5), (2, 0.3))]
    whole, _ = run(base, *cfgs)
    calls = []
    real = T.train_group
    monkeypatch.setattr(T, "train_group", lambda data, group, **kw: calls.append(len(group)) or real(data, group, **kw))
    monkeypatch.setattr(T, "CPU_CHUNK_BYTES", 1)  # one head per chunk
    chunked, _ = run(base, *cfgs)
    assert calls == [1, 1, 1]
    for a, b in zip(whole, chunked):
        assert states_max_diff(a.head.state_dict(), b.head.state_dict()) < 1e-5
        assert a.reports["val"]["auc"] == pytest.approx(b.reports["val"]["auc"], abs=1e-6)


def test_a_diverged_head_does_not_stop_its_group(base):
    """A head whose lr blows its logits up to inf/NaN scores NaN for those epochs and keeps its last
    finite state; the other heads of the sweep train exactly as they would alone."""
    (ok, bad), _ = run(base, cfg_of(head="linear", lr=3e-2), cfg_of(head="linear", lr=1e38))
    (alone,), _ = run(base, cfg_of(head="linear", lr=3e-2))
    assert bad.history["val_auc"].is_nan().any()
    assert bad.reports["val"]["auc"] is not None and bad.best_epoch < bad.config.epochs
    assert ok.reports["val"]["auc"] == pytest.approx(alone.reports["val"]["auc"], abs=1e-6)
    assert states_max_diff(ok.head.state_dict(), alone.head.state_dict()) < 1e-6


def _pre_bn_bias(name: str) -> bool:
    # The Linear bias feeding BatchNorm is cancelled by BN, so its true gradient is 0; Adam turns the
    # round-off left in it into +-lr steps, so it and the running mean tracking it drift apart.
    return (name.startswith("linears.") and name.endswith(".bias")) or name.endswith("running_mean")


MLP_K3 = [dict(seed=0), dict(seed=0, cvar_alpha=0.5, auc_gamma=0.5), dict(seed=0, cvar_alpha=0.3, lr=3e-3)]


def test_k3_mlp_sweep_with_dropout_0_matches_fits_in_every_effective_weight(base):
    cfgs = [make_config(**(FAST | dict(dropout=0.0) | kw)) for kw in MLP_K3]
    group, _ = run(base, *cfgs)
    for cfg, member in zip(cfgs, group):
        (alone,), _ = run(base, cfg)
        assert states_max_diff(member.head.state_dict(), alone.head.state_dict(), skip=_pre_bn_bias) < 1e-5
        assert member.history["train_loss"].to_numpy() == pytest.approx(alone.history["train_loss"].to_numpy(),
                                                                        abs=1e-5)
        assert member.reports["val"]["auc"] == pytest.approx(alone.reports["val"]["auc"], abs=1e-3)


@pytest.mark.xfail(strict=True, reason="pre-BN Linear biases random-walk on round-off under Adam (see "
                                       "_pre_bn_bias); eval logits of K=3 vs K=1 differ by ~1e-3")
def test_k3_mlp_sweep_with_dropout_0_gives_fit_logits(base):
    cfgs = [make_config(**(FAST | dict(dropout=0.0) | kw)) for kw in MLP_K3]
    group, data = run(base, *cfgs)
    for cfg, member in zip(cfgs, group):
        (alone,), _ = run(base, cfg)
        diff = (T.predict_logits(member.head, data.val.x) - T.predict_logits(alone.head, data.val.x)).abs().max()
        assert diff < 1e-4


# --- SAM, BatchNorm and the schedule --------------------------------------------------------


def test_sam_rho_0_is_plain_adamw(base):
    """--sam-rho 0 leaves SAM out entirely, and a rho=0 member trained through SAM's two passes
    (its group has rho > 0) ends where plain AdamW does."""
    cfg = cfg_of(head="linear", lr=3e-2)
    (plain,), _ = run(base, cfg)
    (explicit,), _ = run(base, dataclasses.replace(cfg, sam_rho=0.0))
    assert states_max_diff(plain.head.state_dict(), explicit.head.state_dict()) == 0.0
    (zero, sharp), _ = run(base, cfg, dataclasses.replace(cfg, sam_rho=0.1))
    assert states_max_diff(zero.head.state_dict(), plain.head.state_dict()) < 1e-6
    (sharp_alone,), _ = run(base, dataclasses.replace(cfg, sam_rho=0.1))
    assert states_max_diff(sharp.head.state_dict(), sharp_alone.head.state_dict()) < 1e-6
    assert states_max_diff(sharp.head.state_dict(), plain.head.state_dict()) > 1e-4  # SAM did something


def test_sam_updates_batchnorm_statistics_once_per_step(base, monkeypatch):
    calls = {True: 0, False: 0}
    real_apply = HiddenLayer.apply

    def counting(*args):  # running_mean (argument 8) is given when the statistics are to be updated
        calls[args[8] is not None] += 1
        return real_apply(*args)

    monkeypatch.setattr(HiddenLayer, "apply", counting)
    cfg = cfg_of(epochs=1, depth=2, sam_rho=0.05)
    (res,), data = run(base, cfg)
    steps = data.counts["train"] // cfg.batch_size
    assert calls == {True: steps * cfg.depth, False: steps * cfg.depth}


def test_schedule_is_linear_warmup_then_cosine_to_zero(base, monkeypatch):
    scales = []
    real_step = BatchedAdamW.step

    def record(self, lr_scale=1.0):
        scales.append(lr_scale)
        return real_step(self, lr_scale=lr_scale)

    monkeypatch.setattr(BatchedAdamW, "step", record)
    cfg = cfg_of(epochs=4, warmup_epochs=1.0, head="linear")
    _, data = run(base, cfg)
    steps = data.counts["train"] // cfg.batch_size
    total, warmup = 4 * steps, steps
    assert len(scales) == total
    for s, got in enumerate(scales):
        want = (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert got == pytest.approx(want, abs=1e-12)
    assert scales[warmup - 1] == 1.0 and scales[-1] < 0.01


# --- model selection and early stopping ---------------------------------------------------------


@pytest.mark.parametrize("select", ["auc", "loss", "last"])
def test_the_kept_head_is_the_selected_epoch(base, select):
    cfg = cfg_of(epochs=5, lr=3e-2, select=select)
    (res,), data = run(base, cfg)
    h = res.history
    want = {"auc": int(np.argmax(h["val_auc"])) + 1, "loss": int(np.argmin(h["val_loss"])) + 1, "last": 5}[select]
    assert res.best_epoch == want
    # the weights kept are that epoch's: their val AUC is the one logged for it
    assert res.reports["val"]["auc"] == pytest.approx(h["val_auc"][want - 1], abs=1e-6)


def test_early_stopping_per_model_in_a_group_matches_fits(base):
    """A group member that would stop early alone keeps its stop-time best state and history,
    though the group trains on (dropout 0 so K=2 trajectories match K=1)."""
    common = FAST | dict(epochs=8, dropout=0.0, warmup_epochs=0.0, patience=1)
    cfgs = [make_config(**common | dict(lr=0.02)), make_config(**common | dict(lr=0.001))]
    alone = [run(base, c)[0][0] for c in cfgs]
    # preconditions: model 0 stops first, and would find a better epoch if it trained on
    assert alone[0].history.height < alone[1].history.height
    (longer,), _ = run(base, dataclasses.replace(cfgs[0], patience=0, epochs=8))
    assert longer.history["val_auc"][: alone[1].history.height].max() > alone[0].history["val_auc"].max()
    group, _ = run(base, *cfgs)
    for g, a in zip(group, alone):
        assert g.best_epoch == a.best_epoch
        assert g.history.height == a.history.height
        assert np.allclose(history_values(g), history_values(a), atol=1e-3)
        assert g.reports["val"]["auc"] == pytest.approx(a.reports["val"]["auc"], abs=1e-3)


# --- options that change training --------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(base):
    """A fit with the FAST settings and nothing else switched on."""
    return run(base, cfg_of())[0][0]



@pytest.mark.parametrize("option", [dict(balanced=True), dict(feature_noise=True), dict(sam_rho=0.05),
                                    dict(sam_rho=0.05, sam_adaptive=True), dict(loss="vs"),
                                    dict(auc_gamma=0.5, auc_kind="squared_hinge"), dict(l2_normalize=True)])
def test_option_trains_and_changes_the_result(base, plain, option):
    (other,), _ = run(base, cfg_of(**option))
    assert np.isfinite(history_values(other)).all()
    assert other.reports["val"]["auc"] > 0.9  # still learns the planted signal
    assert states_max_diff(plain.head.state_dict(), other.head.state_dict()) > 1e-4


def test_balanced_batches_hold_the_fake_rate(base, monkeypatch):
    fake_counts = []
    real_batches = T.epoch_batches

    def batches(labels, *a, **kw):
        out = real_batches(labels, *a, **kw)
        fake_counts.extend(labels[idx].sum(1).tolist()[0] for idx in out)
        return out

    monkeypatch.setattr(T, "epoch_batches", batches)
    run(base, cfg_of(epochs=1, balanced=True, fake_rate=0.25))
    assert set(fake_counts) == {16}  # 25 % of 64, though the store is 70 % fake


# --- splits, held-out generators and the checks on data -------------------------------------------


def test_holdout_source_is_kept_out_and_reported_as_unseen(base, base_meta):
    x_all, meta = base_meta
    cfg = cfg_of(holdout_sources=("gan",))
    (res,), data = run(base, cfg)
    gan = meta["source"].to_numpy() == "gan"
    gan_keys = set(row_keys(x_all[gan]))
    assert not gan_keys & set(row_keys(data.x)), "a held-out row was trained on"
    assert "gan" not in data.val.meta["source"].to_list()
    assert data.counts["train"] + data.counts["val"] == meta.height - gan.sum()
    # the unseen-generator test: every gan row, ranked against the validation reals
    h = data.holdout
    assert sorted(set(h.meta["source"])) == ["ffhq", "gan"]
    assert (h.meta.filter(pl.col("source") == "gan").height, int((h.y == 0).sum())) == (
        gan.sum(), int((data.val.y == 0).sum()))
    scores = torch.sigmoid(T.predict_logits(res.head, h.x))[0].numpy()
    want = roc_auc_score(h.y.numpy(), scores)
    assert res.reports["holdout"]["per_source"]["gan"]["auc"] == pytest.approx(want, abs=1e-9)
    assert res.reports["holdout"]["auc"] == pytest.approx(want, abs=1e-9)
    assert res.reports["holdout"]["n"] == h.y.numel()


def test_unknown_holdout_source_is_refused(base):
    with pytest.raises(UserError, match="unknown holdout source.*known sources: diffusion, faceswap, ffhq, gan"):
        run(base, cfg_of(holdout_sources=("midjourney",)))


def test_split_column_decides_validation(base, base_meta, tmp_path):
    x_all, meta = base_meta
    split = np.array(["train", "val", "test", ""])[np.arange(meta.height) % 4]
    s = rewrite_store(base, tmp_path / "split", split=split)
    (_, data) = run(s, cfg_of(epochs=1))
    keys = lambda rows: set(row_keys(x_all[rows]))
    assert set(row_keys(data.val.x)) == keys(split == "val")
    assert set(row_keys(data.x)) == keys((split == "train") | (split == ""))  # never "test"


def test_grouped_val_split_keeps_each_video_on_one_side(base, base_meta):
    x_all, meta = base_meta
    (_, data) = run(base, cfg_of(epochs=1, val_frac=0.25, split_seed=3))
    group_of = dict(zip(row_keys(x_all), meta["group"].to_list()))
    train_groups = {group_of[k] for k in row_keys(data.x)}
    val_groups = set(data.val.meta["group"].to_list())
    assert val_groups and not train_groups & val_groups
    assert data.counts["val"] == pytest.approx(0.25 * meta.height, rel=0.05)
    for cls in (0, 1):  # stratified: each class gets about val_frac
        n_cls = int((meta["label"] == cls).sum())
        assert int((data.val.y == cls).sum()) == pytest.approx(0.25 * n_cls, rel=0.1)


def test_val_store_is_the_validation_set(base, base_meta, tmp_path):
    x_all, meta = base_meta
    is_val = (np.arange(meta.height) % 5 == 0)
    tr = rewrite_store(base, tmp_path / "tr", keep=~is_val)
    va = rewrite_store(base, tmp_path / "va", keep=is_val)
    (res,), data = run(tr, cfg_of(holdout_sources=("gan",)), val_store=va)
    gan = meta["source"].to_numpy() == "gan"
    assert set(row_keys(data.val.x)) == set(row_keys(x_all[is_val & ~gan]))  # held-out source leaves val too
    assert set(row_keys(data.x)) == set(row_keys(x_all[~is_val & ~gan]))
    assert data.counts["val_store"] == va and data.counts["store"] == tr


def test_val_store_of_another_model_or_dim_is_refused(base, tmp_path):
    other_model = rewrite_store(base, tmp_path / "m", provenance=SYNTHETIC_PROVENANCE | {"model": "ViT-B-16"})
    with pytest.raises(UserError, match="val-store .* holds model=ViT-B-16"):
        run(base, cfg_of(), val_store=other_model)
    other_dim = make_synthetic_store(tmp_path / "d", n=200, dim=16)
    with pytest.raises(UserError, match="dim=16"):
        run(base, cfg_of(), val_store=other_dim)


def test_one_class_training_set_and_unlabelled_store_are_refused(base, base_meta, tmp_path):
    _, meta = base_meta
    labels = meta["label"].to_numpy()
    only_fakes = rewrite_store(base, tmp_path / "fakes", label=np.where(labels == 0, -1, labels))
    with pytest.raises(UserError, match="no real"):
        run(only_fakes, cfg_of())
    unlabelled = rewrite_store(base, tmp_path / "nolabels", label=np.full(meta.height, -1))
    with pytest.raises(UserError, match="no labelled rows"):
        run(unlabelled, cfg_of())


def test_the_data_line_states_the_imbalance(base):
    lines = []
    (res,), data = T.train(base, [cfg_of(epochs=1, holdout_sources=("gan",))], log=lines.append)
    fake, n = int(data.y.sum()), data.y.numel()
    assert lines[0].startswith("data on cpu: ")
    assert f"train {n} ({fake} fake : {n - fake} real = {fake / (n - fake):.1f}:1)" in lines[0]
    assert "unseen gan: holdout" in lines[0]


def test_train_on_loaded_data_is_train_on_the_store(base):
    """Benchmarks load once (heads.data.load_data) and pass the Data: same results as from the store."""
    cfg = cfg_of(epochs=2, head="linear")
    data = load_data(base, cfg, device=torch.device("cpu"))
    (a,), same = T.train(data, [cfg], **QUIET)
    (b,), _ = run(base, cfg)
    assert same is data
    assert np.array_equal(history_values(a), history_values(b)) and a.reports == b.reports
    with pytest.raises(ValueError, match="val_store"):
        T.train(data, [cfg], val_store=base, **QUIET)
