"""Feature noise statistics, train/val/holdout split rules, per-model epoch batches."""

import math

import numpy as np
import polars as pl
import pytest
import torch

from dfclip.heads.data import augment_with_noise, epoch_batches, feature_noise, split_rows
from dfclip.errors import UserError


# --- feature noise ----------------------------------------------------------------------


def noise_scales(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-sample lam*sigma, estimated as the std of the added noise across D."""
    return (out[..., x.shape[-2] :, :] - x).std(dim=-1)


def test_feature_noise_shapes_and_originals():
    x = torch.randn(5, 8)
    out = feature_noise(x, torch.Generator().manual_seed(0))
    assert out.shape == (10, 8)
    torch.testing.assert_close(out[:5], x, atol=0, rtol=0)
    assert not torch.equal(out[5:], x)
    xk, y = torch.randn(3, 5, 8), torch.randint(0, 2, (3, 5))
    xk2, y2 = augment_with_noise(xk, y, torch.Generator().manual_seed(0))
    assert xk2.shape == (3, 10, 8) and torch.equal(xk2[:, :5], xk)
    assert torch.equal(y2, torch.cat([y, y], dim=1))
    assert feature_noise(x.half()).dtype == torch.float32


def test_feature_noise_scale_distribution():
    n, d = 2000, 1024
    x = torch.randn(n, d)
    scales = noise_scales(x, feature_noise(x, torch.Generator().manual_seed(1)))
    # lam*sigma with lam, sigma ~ U(0,1): mean 1/4, CDF P(ls <= t) = t - t ln t.
    assert abs(scales.mean().item() - 0.25) < 0.015
    for t in (0.1, 0.25, 0.5, 0.8):
        assert abs((scales <= t).float().mean().item() - (t - t * math.log(t))) < 0.03
    # Independent per sample: neighbouring samples' scales are uncorrelated.
    r = torch.corrcoef(torch.stack([scales[:-1], scales[1:]]))[0, 1]
    assert abs(r.item()) < 0.1
    # The noise itself is centred Gaussian: standardised by its scale, mean 0 and variance 1.
    z = (feature_noise(x, torch.Generator().manual_seed(1))[n:] - x) / scales[:, None]
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.01


def test_feature_noise_per_model_generators_independent_of_k():
    x = torch.randn(3, 6, 8)
    out = feature_noise(x, [torch.Generator().manual_seed(s) for s in (4, 5, 6)])
    alone = feature_noise(x[1:2], [torch.Generator().manual_seed(5)])
    torch.testing.assert_close(out[1], alone[0], atol=0, rtol=0)
    assert not torch.allclose(noise_scales(x[0], out[0]), noise_scales(x[2], out[2]))


# --- split_rows -------------------------------------------------------------------------


def make_meta(labels, source=None, split=None, group=None) -> pl.DataFrame:
    n = len(labels)
    return pl.DataFrame(
        {
            "path": [f"img{i}.png" for i in range(n)],
            "label": pl.Series(labels, dtype=pl.Int8),
            "source": source if source is not None else ["a"] * n,
            "split": split if split is not None else [""] * n,
            "group": group if group is not None else [""] * n,
        }
    )


def test_random_split_is_stratified_supervised_and_deterministic():
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 0, 1], size=503, p=[0.1, 0.6, 0.3])
    meta = make_meta(labels)
    rows = split_rows(meta, val_frac=0.25, seed=3)
    train, val = rows["train"], rows["val"]
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.union1d(train, val), np.flatnonzero(labels >= 0))  # -1 rows nowhere
    for cls in (0, 1):
        n_cls = (labels == cls).sum()
        assert abs((labels[val] == cls).sum() - 0.25 * n_cls) <= 1
    assert len(rows["holdout"]) == 0
    again = split_rows(meta, val_frac=0.25, seed=3)
    np.testing.assert_array_equal(again["val"], val)
    assert not np.array_equal(split_rows(meta, val_frac=0.25, seed=4)["val"], val)


def test_random_split_keeps_groups_whole():
    rng = np.random.default_rng(1)
    n_groups = 120
    sizes = rng.integers(1, 9, size=n_groups)
    group = np.repeat([f"video{g}" for g in range(n_groups)], sizes)
    labels = np.repeat(rng.integers(0, 2, size=n_groups), sizes)
    group[: sizes[0]] = ""  # the first video's frames have no group: each is its own
    meta = make_meta(labels, group=group.tolist())
    rows = split_rows(meta, val_frac=0.2, seed=0)
    named = group != ""
    val_groups = set(group[rows["val"]][named[rows["val"]]])
    train_groups = set(group[rows["train"]][named[rows["train"]]])
    assert val_groups and train_groups and not val_groups & train_groups
    for cls in (0, 1):
        frac = (labels[rows["val"]] == cls).sum() / (labels == cls).sum()
        assert abs(frac - 0.2) < 0.05  # whole groups of at most 8 rows: near, not exact


def test_holdout_sources_leave_train_and_val():
    rng = np.random.default_rng(2)
    labels = rng.choice([-1, 0, 1], size=300)
    source = rng.choice(["real", "sd15", "mj", "dalle"], size=300).tolist()
    split = rng.choice(["train", "val"], size=300).tolist()
    meta = make_meta(labels, source=source, split=split)
    source = np.array(source)
    for has_val_store in (False, True):
        rows = split_rows(meta, holdout_sources=["mj", "dalle"], has_val_store=has_val_store)
        held = np.isin(source, ["mj", "dalle"])
        np.testing.assert_array_equal(rows["holdout"], np.flatnonzero(held & (labels >= 0)))
        assert not held[rows["train"]].any() and not held[rows["val"]].any()


def test_split_column_decides_when_it_has_val_rows():
    labels = [0, 1, 0, 1, 0, 1, 1, 0, -1, 1]
    split = ["train", "train", "", "val", "val", "test", "train", "train", "val", ""]
    rows = split_rows(make_meta(labels, split=split), val_frac=0.5)
    np.testing.assert_array_equal(rows["train"], [0, 1, 2, 6, 7, 9])  # "test" row 5 reserved
    np.testing.assert_array_equal(rows["val"], [3, 4])  # unlabelled row 8 dropped


def test_val_store_makes_everything_train():
    labels = [0, 1, 0, 1, -1, 1]
    split = ["train", "val", "", "val", "", "test"]
    rows = split_rows(make_meta(labels, split=split), has_val_store=True)
    np.testing.assert_array_equal(rows["train"], [0, 1, 2, 3])
    assert len(rows["val"]) == 0


def test_split_errors():
    meta = make_meta([0, 1, 0, 1, 0, 1], source=["real", "sd", "real", "sd", "real", "mj"])
    with pytest.raises(UserError, match="known sources: mj, real, sd"):
        split_rows(meta, holdout_sources=["midjourney"])
    with pytest.raises(UserError, match="no labelled rows"):
        split_rows(make_meta([-1, -1, -1]))
    with pytest.raises(UserError, match=r"no real \(label 0\) rows.*add labelled real"):
        split_rows(make_meta([1, 1, 1, 1, -1]))
    with pytest.raises(UserError, match=r"no fake \(label 1\).*hold out fewer sources"):
        split_rows(meta, holdout_sources=["sd", "mj"])
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(UserError, match="val_frac"):
            split_rows(meta, val_frac=bad)
    with pytest.raises(UserError, match="validation split is empty"):
        split_rows(make_meta([0, 1]), val_frac=0.1)


# --- epoch_batches ----------------------------------------------------------------------


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_every_row_once_per_epoch_per_model():
    labels = torch.randint(0, 2, (103,))
    batches = epoch_batches(labels, 3, 10, gens(0, 1, 2), drop_last=False)
    assert len(batches) == 11 and [b.shape for b in batches[:-1]] == [(3, 10)] * 10 and batches[-1].shape == (3, 3)
    order = torch.cat(batches, dim=1)
    for k in range(3):
        assert torch.equal(order[k].sort().values, torch.arange(103))
    assert not torch.equal(order[0], order[1])
    dropped = epoch_batches(labels, 3, 10, gens(0, 1, 2))
    assert len(dropped) == 10 and all(b.shape == (3, 10) for b in dropped)
    assert all(len(set(row.tolist())) == 100 for row in torch.cat(dropped, dim=1))


@pytest.mark.parametrize("rate", [None, 0.5])
def test_batches_of_model_k_do_not_depend_on_k(rate):
    labels = (torch.rand(250, generator=torch.Generator().manual_seed(0)) < 0.2).long()
    many = epoch_batches(labels, 3, 16, gens(7, 8, 9), balanced_fake_rate=rate)
    one = epoch_batches(labels, 1, 16, gens(8), balanced_fake_rate=rate)
    assert len(many) == len(one)
    for b_many, b_one in zip(many, one):
        assert torch.equal(b_many[1], b_one[0])


def test_balanced_batches_have_exact_fake_count_and_cycle_the_small_pool():
    n, batch, rate = 1000, 32, 0.3
    labels = torch.zeros(n, dtype=torch.long)
    fake_rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:23]
    labels[fake_rows] = 1
    batches = epoch_batches(labels, 2, batch, gens(0, 1), balanced_fake_rate=rate)
    assert len(batches) == n // batch
    n_fake = round(rate * batch)
    for b in batches:
        assert b.shape == (2, batch)
        assert ((labels[b] == 1).sum(dim=1) == n_fake).all()
    # Fakes come first in each batch; in draw order, each run of 23 is one full pass over the pool.
    drawn = torch.cat([b[:, :n_fake] for b in batches], dim=1)
    for k in range(2):
        for start in range(0, drawn.shape[1] - 23 + 1, 23):
            assert torch.equal(drawn[k, start : start + 23].sort().values, fake_rows.sort().values)
    # Many cycles of a tiny pool take the one-call path; still exact counts and full passes.
    labels = torch.zeros(n, dtype=torch.long)
    labels[:3] = 1
    batches = epoch_batches(labels, 1, batch, gens(0), balanced_fake_rate=0.5)
    drawn = torch.cat([b[:, :16] for b in batches], dim=1)[0]
    assert all(sorted(drawn[i : i + 3].tolist()) == [0, 1, 2] for i in range(0, len(drawn) - 2, 3))


def test_epoch_batches_errors():
    labels = torch.tensor([0, 1] * 10)
    with pytest.raises(UserError, match="fewer than the batch size"):
        epoch_batches(labels, 1, 64, gens(0))
    with pytest.raises(UserError, match="balanced fake rate"):
        epoch_batches(labels, 1, 8, gens(0), balanced_fake_rate=0.01)
    with pytest.raises(UserError, match="both fake"):
        epoch_batches(torch.zeros(20, dtype=torch.long), 1, 8, gens(0), balanced_fake_rate=0.5)
