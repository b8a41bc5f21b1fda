"""Heads on any stored feature: `--feature blockN`, concatenations, a sweep over features, the layermix head,
and predict re-embedding exactly the run's feature."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from dfclip import store
from dfclip.errors import UserError
from dfclip.heads.config import make_config
from dfclip.heads.models import BatchedLayerMix, BatchedMLP, build_head
from dfclip.heads.run import evaluate_run, fit, grid, predict_store, sweep
from dfclip.store.writer import ShardWriter

N, DIM, WIDTH = 1200, 16, 24


@pytest.fixture(scope="module")
def layered_store(tmp_path_factory) -> str:
    """proj carries no signal; block2 carries a strong one, block1 a weak one (like early vs late layers)."""
    root = tmp_path_factory.mktemp("layered") / "store"
    rng = np.random.default_rng(0)
    y = (rng.random(N) < 0.5).astype(np.int8)
    direction = rng.normal(size=WIDTH)
    direction /= np.linalg.norm(direction)
    proj = rng.normal(size=(N, DIM))
    blocks = rng.normal(size=(N, 2, WIDTH))
    blocks[:, 0] += 0.3 * y[:, None] * direction
    blocks[:, 1] += 4.0 * y[:, None] * direction
    prov = {"model": "synthetic", "model_config": {}, "pretrained": "none", "feature": "proj", "preprocess": {},
            "layers": [1, 2], "layer_width": WIDTH}
    with ShardWriter(root, prov, dim=DIM, shard_size=500) as w:
        w.add(proj, {"path": [f"img/{i:05d}.png" for i in range(N)], "label": y,
                     "source": np.where(y == 1, "gan", "ffhq"), "split": [""] * N,
                     "group": [f"v{i // 4:05d}" for i in range(N)], "size": np.zeros(N, np.int64),
                     "mtime_ns": np.zeros(N, np.int64)}, blocks=blocks)
    return str(root)


def _cfg(**kw):
    return make_config(epochs=4, batch_size=64, dropout=0.0, **kw)


def test_fit_on_a_block_learns_what_proj_cannot_and_records_the_feature(layered_store, tmp_path):
    aucs = {}
    for feature in ("proj", "block2", "block1+block2"):
        run = fit(layered_store, _cfg(feature=feature), runs_dir=tmp_path, name=feature.replace("+", "_"),
                  device="cpu", log=lambda _: None)
        aucs[feature] = json.loads((run / "report.json").read_text())["val"]["auc"]
        config = json.loads((run / "config.json").read_text())
        assert config["run"]["feature"] == feature
        assert config["head"]["dim"] == {"proj": DIM, "block2": WIDTH, "block1+block2": 2 * WIDTH}[feature]
        # evaluate and predict read the run's feature from the store, not the default one
        # (a head on another feature would not even fit the columns: dims 16, 24 and 48 differ)
        assert (evaluate_run(run, layered_store, device="cpu")["auc"] > 0.9) == (feature != "proj")
        assert predict_store(run, layered_store, device="cpu").height == N
    assert aucs["proj"] < 0.65 and aucs["block2"] > 0.9 and aucs["block1+block2"] > 0.9


def test_sweep_over_features_trains_separate_groups_from_one_open_store(layered_store, tmp_path, monkeypatch):
    scans = []  # metadata resolutions: a scan of the shards, or a read of the cached index
    real_scan, real_index = store.Store._scan, store.Store._read_index
    monkeypatch.setattr(store.Store, "_scan", lambda self: (scans.append(1), real_scan(self))[1])
    monkeypatch.setattr(store.Store, "_read_index", lambda self: (scans.append(1), real_index(self))[1])
    cfgs = grid(_cfg(), feature=["proj", "block2"], cvar_alpha=[0.5, 1.0])
    out, board = sweep(layered_store, cfgs, runs_dir=tmp_path, name="feat", device="cpu", log=lambda _: None)
    assert len(scans) == 1  # the metadata of the store was read once for both features
    assert sorted(board["feature"].unique().to_list()) == ["block2", "proj"]
    assert json.loads((out / "best" / "config.json").read_text())["run"]["feature"] == "block2"
    # Each feature's group gives what a fit of that config alone gives.
    runs = pl.read_parquet(out / "runs.parquet")
    row = runs.filter((pl.col("feature") == "block2") & (pl.col("cvar_alpha") == 1.0)).row(0, named=True)
    alone = fit(layered_store, _cfg(feature="block2"), runs_dir=tmp_path, name="alone", device="cpu",
                log=lambda _: None)
    assert json.loads((alone / "report.json").read_text())["val"]["auc"] == pytest.approx(row["val_auc"], abs=1e-9)


def test_feature_the_store_lacks_or_misspelt_is_one_line(layered_store, tmp_path, dfhead):
    code, _, err = dfhead("fit", layered_store, "--feature", "block5", "--runs-dir", tmp_path, "--device", "cpu")
    assert code == 2 and "no feature block5" in err and "proj, block1, block2" in err and "Traceback" not in err
    code, _, err = dfhead("fit", layered_store, "--feature", "layer5", "--runs-dir", tmp_path)
    assert code == 2 and "bad feature 'layer5'" in err
    code, _, err = dfhead("fit", layered_store, "--head", "layermix", "--feature", "block2", "--runs-dir", tmp_path)
    assert code == 2 and "layermix" in err and "Traceback" not in err


def test_layermix_is_softmax_weighted_blocks_then_the_mlp():
    torch.manual_seed(0)
    head = build_head("layermix", 2, 3 * 8, seeds=[1, 2], feature="block1+block2+block3", hidden=5, depth=1,
                      dropout=0.0)
    assert isinstance(head, BatchedLayerMix)
    with torch.no_grad():
        head.mix.copy_(torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]]))
    head.eval()
    x = torch.randn(2, 7, 24)
    mlp = BatchedMLP(2, 8, hidden=5, depth=1, dropout=0.0, seeds=[1, 2])
    mlp.load_state_dict(head.mlp.state_dict())
    mlp.eval()
    for k in range(2):
        w = torch.exp(head.mix[k]) / torch.exp(head.mix[k]).sum()
        mixed = sum(w[j] * x[k, :, 8 * j:8 * (j + 1)] for j in range(3))
        want = mlp(torch.stack([mixed, mixed]))[k]
        torch.testing.assert_close(head(x)[k], want)
    # A shared batch [B, D] gives each model's logits of that batch.
    torch.testing.assert_close(head(x[0])[0], head(x)[0])
    assert head.select([1]).mix.tolist() == [[2.0, 0.0, 0.0]]


def test_layermix_fits_and_reloads(layered_store, tmp_path):
    run = fit(layered_store, _cfg(head="layermix", feature="block1+block2"), runs_dir=tmp_path, name="mix",
              device="cpu", log=lambda _: None)
    assert json.loads((run / "report.json").read_text())["val"]["auc"] > 0.9
    assert evaluate_run(run, layered_store, device="cpu")["auc"] > 0.9


def test_rewrite_store_keeps_the_blocks(layered_store, tmp_path):
    from dfclip.store.synthetic import rewrite_store

    keep = np.arange(N) % 3 == 0
    copy = store.open(rewrite_store(layered_store, tmp_path / "copy", keep=keep))
    np.testing.assert_array_equal(copy.load(feature="block1+block2")[0],
                                  store.open(layered_store).load(feature="block1+block2")[0][keep])


def test_validate_refuses_bad_features():
    with pytest.raises(UserError, match="bad feature"):
        make_config(feature="block1+")
