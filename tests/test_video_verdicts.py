"""Video verdicts: frame scores pooled per video (mean, max, lse) against a hand computation, video-level
metrics against scikit-learn on hand-pooled scores, --select video_auc, predict's per-video table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from dfclip import store
from dfclip.errors import UserError
from dfclip.heads import metrics
from dfclip.heads import run as R
from dfclip.heads import train as T
from dfclip.heads.config import make_config
from dfclip.heads.report import load_run
from dfclip.store.synthetic import make_synthetic_store, rewrite_store

QUIET = {"log": lambda line: None}
# A weak signal (val frame AUC ~0.7) and 6 frames per video: frame and video AUC peak at different epochs.
FAST = dict(epochs=8, lr=3e-2, batch_size=64, head="linear", precision="fp32")
POOLS = [("mean", 0.1), ("max", 0.1), ("lse", 0.1), ("lse", 0.02), ("lse", 3.0)]


def hand_pool(scores: np.ndarray, pool: str, temperature: float) -> float:
    """One video's pooled score from its frame probabilities, by the definition, in plain numpy."""
    if pool == "mean":
        return float(np.mean(scores))
    if pool == "max":
        return float(np.max(scores))
    return float(temperature * np.log(np.mean(np.exp(scores / temperature))))


def hand_video_table(scores: np.ndarray, labels: np.ndarray, groups: list, pool: str, temperature: float
                     ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(sorted video ids, pooled scores [K, G], video labels [G]) with a python loop over videos."""
    names = sorted({g for g in groups if g})
    rows = {name: [i for i, g in enumerate(groups) if g == name] for name in names}
    pooled = np.array([[hand_pool(head[rows[n]], pool, temperature) for n in names] for head in scores])
    return names, pooled, np.array([labels[rows[n]].max() for n in names])


@pytest.fixture(scope="module")
def frames() -> tuple[np.ndarray, np.ndarray, list]:
    """K=3 heads scoring 400 frames of 50 videos of varied lengths, a few rows without a video."""
    rng = np.random.default_rng(4)
    video_of_row = rng.integers(0, 50, 400)
    video_labels = rng.random(50) < 0.5
    labels = video_labels[video_of_row].astype(np.int64)
    scores = np.clip(rng.beta(2, 2, (3, 400)) * 0.8 + 0.2 * labels, 0, 1)
    groups = [f"v{v:02d}.mp4" for v in video_of_row]
    groups[3], groups[9] = "", None
    return scores, labels, groups


# --- pooling and video-level metrics -------------------------------------------------------------


@pytest.mark.parametrize("pool,temperature", POOLS)
def test_pooling_matches_the_hand_computation_for_every_head(frames, pool, temperature):
    scores, labels, groups = frames
    index = metrics.video_index(groups, torch.from_numpy(labels))
    pooled = metrics.video_scores(torch.from_numpy(scores), index, pool, temperature)
    names, expected, video_labels = hand_video_table(scores, labels, groups, pool, temperature)
    assert index.names == names and pooled.shape == (3, 50)
    np.testing.assert_allclose(pooled.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert index.labels.tolist() == video_labels.tolist()


def test_lse_lies_between_the_mean_and_the_max_and_tends_to_each(frames):
    scores, labels, groups = frames
    index = metrics.video_index(groups, torch.from_numpy(labels))
    s = torch.from_numpy(scores)
    mean, top = (metrics.video_scores(s, index, p) for p in ("mean", "max"))
    for t in (0.01, 0.1, 1.0):
        lse = metrics.video_scores(s, index, "lse", t)
        assert (lse >= mean - 1e-12).all() and (lse <= top + 1e-12).all()
    torch.testing.assert_close(metrics.video_scores(s, index, "lse", 1e-4), top, atol=2e-3, rtol=0)
    torch.testing.assert_close(metrics.video_scores(s, index, "lse", 1e4), mean, atol=1e-5, rtol=0)
    # no overflow where exp(p / T) alone would be inf
    assert torch.isfinite(metrics.video_scores(s, index, "lse", 1e-3)).all()


@pytest.mark.parametrize("pool,temperature", POOLS)
def test_video_metrics_are_sklearns_on_hand_pooled_scores(frames, pool, temperature):
    scores, labels, groups = frames
    reports = metrics.evaluate(torch.from_numpy(scores), torch.from_numpy(labels), groups=groups, pool=pool,
                               temperature=temperature, threshold=0.5)
    json.dumps(reports, allow_nan=False)
    _, pooled, video_labels = hand_video_table(scores, labels, groups, pool, temperature)
    for k, report in enumerate(reports):
        video = report["video"]
        assert video["pool"] == pool and video["temperature"] == (temperature if pool == "lse" else None)
        assert video["n"] == 50 and video["n_fake"] == int(video_labels.sum())
        assert video["auc"] == pytest.approx(roc_auc_score(video_labels, pooled[k]), abs=1e-12)
        assert video["ap"] == pytest.approx(average_precision_score(video_labels, pooled[k]), abs=1e-12)
        assert video["acc"] == pytest.approx(np.mean((pooled[k] >= 0.5) == video_labels), abs=1e-12)
        assert report["auc"] == pytest.approx(roc_auc_score(labels, scores[k]), abs=1e-12)  # frames unchanged


def test_bad_pooling_is_a_one_line_error(frames):
    scores, labels, groups = frames
    with pytest.raises(UserError, match="pool must be one of mean, max, lse, got 'median'"):
        metrics.evaluate(torch.from_numpy(scores), torch.from_numpy(labels), groups=groups, pool="median")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="--temperature must be a number > 0") as e:
            metrics.check_pool("lse", bad)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--pool-temperature must be > 0"):
        make_config(pool_temperature=0.0)
    with pytest.raises(UserError, match="--video-pool must be one of mean, max, lse"):
        make_config(video_pool="median")


# --- predict's table ---------------------------------------------------------------------------------


def frame_rows() -> pl.DataFrame:
    """Scored rows of two videos (one with two faces in a frame) and two still images."""
    rows = [  # path, video, frame, face_index, score, label
        ("fake/a.mp4#f000000", "fake/a.mp4", 0, 0, 0.30, 1),
        ("fake/a.mp4#f000010", "fake/a.mp4", 10, 0, 0.80, 1),
        ("fake/a.mp4#f000010@1", "fake/a.mp4", 10, 1, 0.95, 1),
        ("fake/a.mp4#f000020", "fake/a.mp4", 20, 0, 0.55, 1),
        ("real/b.mp4#f000000", "real/b.mp4", 0, 0, 0.20, 0),
        ("real/b.mp4#f000005", "real/b.mp4", 5, 0, 0.45, 0),
        ("real/c.png", "", -1, 0, 0.60, 0),
        ("x/d.jpg", "", -1, 0, 0.10, -1),
    ]
    return pl.DataFrame(rows, schema={"path": pl.String, "video": pl.String, "frame": pl.Int64, "face_index": pl.Int64,
                                      "score": pl.Float32, "label": pl.Int8}, orient="row")


@pytest.mark.parametrize("pool,temperature", POOLS)
def test_pool_table_gives_one_row_per_video_and_per_image(pool, temperature):
    rows = frame_rows()
    table = metrics.pool_table(rows, pool, temperature, threshold=0.5)
    assert table.columns == ["path", "n_frames", "n_faces", "score", "pred", "label"]
    assert table["path"].to_list() == ["fake/a.mp4", "real/b.mp4", "real/c.png", "x/d.jpg"]
    assert table["n_frames"].to_list() == [3, 2, 1, 1] and table["n_faces"].to_list() == [4, 2, 1, 1]
    assert table["label"].to_list() == [1, 0, 0, -1]
    a = rows["score"].to_numpy()[:4].astype(np.float64)
    b = rows["score"].to_numpy()[4:6].astype(np.float64)
    expected = [hand_pool(a, pool, temperature), hand_pool(b, pool, temperature), rows["score"][6], rows["score"][7]]
    np.testing.assert_allclose(table["score"].to_numpy(), expected, rtol=1e-6)
    assert table["score"].dtype == pl.Float32  # the scores' own dtype, as predict's per-frame table
    assert table["pred"].to_list() == [int(s >= np.float32(0.5)) for s in table["score"].to_numpy()]


def test_a_frame_without_a_video_stays_its_own_row():
    rows = frame_rows().with_columns(pl.when(pl.col("path") == "real/b.mp4#f000005").then(pl.lit(""))
                                     .otherwise(pl.col("video")).alias("video"))
    table = metrics.pool_table(rows, "mean", threshold=0.5)
    assert table["path"].to_list() == ["fake/a.mp4", "real/b.mp4", "real/b.mp4#f000005", "real/c.png", "x/d.jpg"]
    assert table["score"][1] == pytest.approx(0.2) and table["score"][2] == pytest.approx(0.45)


def test_pool_table_pools_as_the_video_metrics_do(frames):
    """predict and eval share one pooling: the table's scores are evaluate's video scores."""
    scores, labels, groups = frames
    keep = [i for i, g in enumerate(groups) if g]
    rows = pl.DataFrame({"path": [f"{groups[i]}#f{i:06d}" for i in keep], "video": [groups[i] for i in keep],
                         "frame": keep, "score": scores[1, keep], "label": labels[keep]})
    for pool, temperature in POOLS:
        table = metrics.pool_table(rows, pool, temperature)
        index = metrics.video_index(groups, torch.from_numpy(labels))
        pooled = metrics.video_scores(torch.from_numpy(scores[1:2]), index, pool, temperature)[0]
        assert table["path"].to_list() == index.names
        np.testing.assert_allclose(table["score"].to_numpy(), pooled.numpy(), rtol=1e-12)


def test_verdicts_read_frames_from_store_rows_and_write_frame_scores(tmp_path):
    """Store rows with a `frame` column (video rows at frame >= 0) become one row per video; the
    per-row scores go to --frame-scores with the video taken from the path."""
    rows = frame_rows()
    store_rows = rows.select("path", "frame", "face_index", "label").with_columns(
        pl.col("frame").cast(pl.Int32), pl.col("face_index").cast(pl.Int16), group=pl.col("path"))
    config = {"threshold": 0.5, "run": {"video_pool": "max", "pool_temperature": 0.1}}
    out = tmp_path / "frames.csv"
    table = R.verdicts(store_rows, rows["score"].to_numpy(), config, frame_scores=out)
    assert table.equals(metrics.pool_table(rows, "max", 0.1, 0.5))  # the run's pooling
    assert R.verdicts(store_rows, rows["score"].to_numpy(), config, pool="mean")["score"][0] == pytest.approx(0.65)
    written = pl.read_csv(out)
    assert written.columns == ["path", "video", "frame", "face_index", "score", "label"]
    assert written["video"].fill_null("").to_list() == rows.sort("path")["video"].to_list()
    assert written["score"].to_numpy() == pytest.approx(rows.sort("path")["score"].to_numpy())


def test_rows_without_frames_keep_the_image_table(tmp_path):
    rows = pl.DataFrame({"path": ["b.png", "a.png"], "label": [1, 0]}, schema={"path": pl.String, "label": pl.Int8})
    table = R.verdicts(rows, np.array([0.7, 0.2], np.float32), {"threshold": 0.5, "run": {"video_pool": "mean",
                                                                                         "pool_temperature": 0.1}})
    assert table.columns == ["path", "score", "pred", "label"] and table["pred"].to_list() == [0, 1]


# --- training: video AUC per epoch and --select video_auc -------------------------------------------


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> str:
    return make_synthetic_store(tmp_path_factory.mktemp("videos") / "s", n=1200, dim=16, signal=1.0, fake_rate=0.5,
                                frames_per_group=6, seed=4)


@pytest.mark.parametrize("pool", ["mean", "max", "lse"])
def test_select_video_auc_keeps_the_epoch_with_the_best_video_auc(videos, pool):
    (res,), data = T.train(videos, [make_config(**FAST, select="video_auc", video_pool=pool)], **QUIET)
    h = res.history
    best = int(np.argmax(h["val_video_auc"].to_numpy())) + 1
    assert res.best_epoch == best
    assert best != int(np.argmax(h["val_auc"].to_numpy())) + 1  # precondition: frame AUC would keep another epoch
    # The per-epoch video AUC is scikit-learn's on the kept head's val scores, pooled by hand.
    probs, labels = res.scores["val"]
    groups = data.val.meta["group"].to_list()
    _, pooled, video_labels = hand_video_table(probs[None].astype(np.float64), labels, groups, pool, 0.1)
    assert h["val_video_auc"][best - 1] == pytest.approx(roc_auc_score(video_labels, pooled[0]), abs=1e-6)
    video = res.reports["val"]["video"]
    assert video["pool"] == pool and video["auc"] == pytest.approx(h["val_video_auc"][best - 1], abs=1e-6)


def test_sweep_ranks_by_video_auc(videos, tmp_path):
    cfgs = R.grid(make_config(**FAST | dict(epochs=3), select="video_auc"), lr=[1e-3, 3e-2])
    out, summary = R.sweep(videos, cfgs, runs_dir=tmp_path, name="v", device="cpu", **QUIET)
    runs = pl.read_parquet(out / "runs.parquet")
    assert runs["val_video_auc"].to_list() == sorted(runs["val_video_auc"].to_list(), reverse=True)
    assert {"val_video_ap", "val_video_eer", "video_pool"} <= set(runs.columns)
    best = json.loads((out / "best" / "report.json").read_text())
    assert best["val"]["video"]["auc"] == pytest.approx(runs["val_video_auc"][0])


def test_select_video_auc_without_groups_is_a_one_line_error(videos, tmp_path, dfhead):
    no_groups = rewrite_store(videos, tmp_path / "flat", group=[""] * len(store.open(videos)))
    with pytest.raises(UserError, match="--select video_auc needs videos in the validation set"):
        T.train(no_groups, [make_config(**FAST, select="video_auc")], **QUIET)
    code, out, err = dfhead("fit", no_groups, "--select", "video_auc", "--epochs", "1", "--runs-dir", tmp_path / "runs")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--select video_auc" in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --- eval and the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(videos, tmp_path_factory) -> Path:
    return R.fit(videos, make_config(**FAST | dict(epochs=3), video_pool="lse", pool_temperature=0.05),
                 runs_dir=tmp_path_factory.mktemp("runs"), name="v", device="cpu", **QUIET)


def test_eval_pools_as_the_run_or_as_asked(videos, fitted):
    own = R.evaluate_run(fitted, videos, device="cpu", include_train=True)  # every row, as the hand computation
    assert (own["video"]["pool"], own["video"]["temperature"]) == ("lse", 0.05)
    # The head's raw frame probabilities (predict's are calibrated after pooling; eval pools the raw ones).
    head, config = load_run(fitted)
    x, scored = store.open(videos).load()
    raw = R._scores(head, config, x, torch.device("cpu"))[0].numpy()
    labels, probs = scored["label"].to_numpy().astype(np.int64), raw[None].astype(np.float64)
    for pool in ("mean", "max", "lse"):
        rep = R.evaluate_run(fitted, videos, device="cpu", pool=pool, temperature=0.05, include_train=True)
        _, pooled, video_labels = hand_video_table(probs, labels, scored["group"].to_list(), pool, 0.05)
        assert rep["video"]["pool"] == pool
        assert rep["video"]["auc"] == pytest.approx(roc_auc_score(video_labels, pooled[0]), abs=1e-6)


def test_cli_reports_name_the_pooling(videos, fitted, dfhead, tmp_path):
    code, out, err = dfhead("eval", fitted, "--store", videos, "--pool", "max", "--device", "cpu", "--include-train")
    assert code == 0, err
    assert "frames pooled by max" in out and "n=200 videos" in out
    code, out, err = dfhead("eval", fitted)
    assert code == 0 and "frames pooled by lse T=0.05" in out, err
    code, out, err = dfhead("fit", videos, "--epochs", "1", "--head", "linear", "--video-pool", "max",
                            "--runs-dir", tmp_path / "runs", "--device", "cpu")
    assert code == 0, err
    assert "frames' scores pooled by max" in out, out
    code, _, err = dfhead("eval", fitted, "--pool", "max")
    assert code == 2 and "give --store STORE" in err and len(err.strip().splitlines()) == 1
    code, _, err = dfhead("eval", fitted, "--store", videos, "--store", videos, "--pool", "max")
    assert code == 2 and "video-level metrics of one --store" in err and len(err.strip().splitlines()) == 1
    code, _, err = dfhead("predict", fitted, "--store", videos, "--pool", "median", "--out", tmp_path / "s.csv")
    assert code == 2 and "--pool must be one of mean, max, lse" in err and len(err.strip().splitlines()) == 1


def test_predict_prints_one_video_in_one_line(fitted, dfhead, tmp_path, monkeypatch):
    """A single video argument: the pooled score is one printed line (the table comes from the pipeline)."""
    import dfclip.pipeline as P

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    seen = {}

    def fake_predict_images(run, images, **kwargs):
        seen.update(kwargs)
        return metrics.pool_table(frame_rows().filter(pl.col("video") == "fake/a.mp4"), "lse", 0.05, 0.5)

    monkeypatch.setattr(P, "predict_images", fake_predict_images)
    frames_csv = tmp_path / "frames.csv"
    code, out, err = dfhead("predict", fitted, video, "--out", tmp_path / "s.csv", "--frame-scores", frames_csv)
    assert code == 0, err
    assert seen["pool"] is None and seen["frame_scores"] == frames_csv  # None: the run's pooling
    line = [l for l in out.splitlines() if l.startswith("fake/a.mp4")]
    assert len(line) == 1 and "fake, score" in line[0] and "lse T=0.05 over 3 frames, 4 faces" in line[0], out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("pool,temperature", POOLS)
def test_cuda_pools_as_the_cpu(frames, pool, temperature):
    scores, labels, groups = frames
    cpu = metrics.video_scores(torch.from_numpy(scores), metrics.video_index(groups, torch.from_numpy(labels)), pool,
                               temperature)
    index = metrics.video_index(groups, torch.from_numpy(labels).cuda())
    gpu = metrics.video_scores(torch.from_numpy(scores).cuda(), index, pool, temperature)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)
    assert index.labels.is_cuda and index.codes.is_cuda


def test_predict_on_a_store_of_video_frames_writes_one_row_per_video(videos, fitted, dfhead, tmp_path, monkeypatch):
    """End to end through `dfhead predict --store`: rows named VIDEO#fNNNNNN with a `frame` column
    (as extract writes for videos) come out as one row per video, pooled as --frame-scores' rows say."""
    meta = store.open(videos).meta
    frame = meta.select(pl.int_range(pl.len()).over("group"))[:, 0]  # 0..5 within each video
    paths = [f"{g}.mp4#f{f:06d}" for g, f in zip(meta["group"], frame)]
    framed = rewrite_store(videos, tmp_path / "framed", path=paths)
    real_load = store.Store.load

    def load_with_frames(self, *args, **kwargs):  # the frame column of a store extracted from videos
        x, rows = real_load(self, *args, **kwargs)
        frame = rows["path"].str.extract(r"#f(\d+)$").cast(pl.Int32)
        return x, rows.with_columns(frame=frame, face_index=pl.lit(0, pl.Int16))

    monkeypatch.setattr(store.Store, "load", load_with_frames)
    out, frames_csv = tmp_path / "videos.csv", tmp_path / "frames.csv"
    code, stdout, err = dfhead("predict", fitted, "--store", framed, "--out", out, "--frame-scores", frames_csv,
                               "--pool", "max", "--device", "cpu")
    assert code == 0, err
    table, per_frame = pl.read_csv(out), pl.read_csv(frames_csv)
    assert table.height == 200 and per_frame.height == 1200 and "200 rows" in stdout
    assert table.columns == ["path", "n_frames", "n_faces", "score", "pred", "label"]
    assert (table["n_frames"] == 6).all() and (table["n_faces"] == 6).all()
    assert set(per_frame["video"]) == set(table["path"]) and per_frame["frame"].max() == 5
    by_hand = per_frame.group_by("video").agg(pl.col("score").max(), pl.col("label").max()).sort("video")
    np.testing.assert_allclose(table["score"].to_numpy(), by_hand["score"].to_numpy(), rtol=1e-6)
    assert table["label"].to_list() == by_hand["label"].to_list()
    threshold = json.loads((fitted / "config.json").read_text())["calibration"]["threshold"]  # calibrated scale
    assert table["pred"].to_list() == (table["score"] >= threshold).cast(pl.Int64).to_list()


def test_halving_ranks_rungs_by_video_auc(videos, tmp_path):
    """With --select video_auc the config that goes on past the first rung is the one with the best
    val video AUC at it (the dropped ones report that epoch)."""
    cfgs = R.grid(make_config(**FAST | dict(epochs=3, seed=6), select="video_auc", video_pool="max"), seeds=3)
    out, _ = R.sweep(videos, cfgs, runs_dir=tmp_path, name="h", device="cpu", halving=True, eta=3, min_epochs=1,
                     **QUIET)
    runs = pl.read_parquet(out / "runs.parquet")
    assert runs["stop_epoch"].to_list() == [3, 1, 1]
    survivor_at_rung = pl.read_parquet(out / "best" / "metrics.parquet").row(0, named=True)
    assert survivor_at_rung["val_video_auc"] > runs["val_video_auc"][1:].max()
    assert survivor_at_rung["val_auc"] < runs["val_auc"][1:].max()  # precondition: frame AUC would keep another


def test_a_sweep_takes_one_pooling(videos, dfhead, tmp_path):
    code, _, err = dfhead("sweep", videos, "--video-pool", "mean,max", "--epochs", "1", "--runs-dir", tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--video-pool must be one value for a whole sweep" in err, err
