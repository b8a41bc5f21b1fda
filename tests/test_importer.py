"""`dfembed import-h5`: SP_CUP-style features + labels CSV -> a store, and every user error."""

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from dfclip import cli
from dfclip import store
from dfclip.errors import UserError
from dfclip.store.importer import import_h5

REPO = Path(__file__).resolve().parents[1]
N, D = 45, 24


@pytest.fixture
def cup(tmp_path):
    """cup_train.h5 (train_features float32 + an unrelated dataset) and cup_train.csv in the same row order."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((N, D)).astype(np.float32)
    target = rng.integers(0, 2, N)
    h5 = tmp_path / "cup_train.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("train_features", data=feats)
        f.create_dataset("meta/ids", data=np.arange(N))
    csv = tmp_path / "cup_train.csv"
    pl.DataFrame({"Image Path": [f"/data/cup/train/{i:04d}.jpg" for i in range(N)], "Target": target,
                  "Gen": rng.choice(["sd", "gan"], N)}).write_csv(csv)
    return h5, csv, feats, target


def invoke(*args):
    return CliRunner().invoke(cli.embed_app, [str(a) for a in args])


def test_cli_import_round_trip_and_provenance(tmp_path, cup):
    h5, csv, feats, target = cup
    r = invoke("import-h5", h5, "--csv", csv, "--out", tmp_path / "emb", "--split", "train")
    assert r.exit_code == 0, r.output
    assert f"imported {N} rows (fake={target.sum()}, real={N - target.sum()}" in r.output
    s = store.open(tmp_path / "emb")
    X, m = s.load()
    assert X.dtype == np.float16
    np.testing.assert_array_equal(X, feats.astype(np.float16))  # CSV order kept, row for row
    assert m["path"].to_list() == pl.read_csv(csv)["Image Path"].to_list()
    assert m["label"].to_list() == target.tolist()  # Target 1 = fake = our 1
    assert set(m["split"]) == {"train"} and set(m["size"]) == {-1}
    p = s.provenance
    assert (p["model"], p["pretrained"], p["feature"], p["dim"], p["declared"]) == ("ViT-L-14", "openai", "proj", D, True)
    assert p["imported_from"]["file"] == "cup_train.h5" and p["imported_from"]["dataset"] == "train_features"
    assert p["imported_from"]["sha256"] == hashlib.sha256(h5.read_bytes()).hexdigest()


def test_column_mapping_and_target_means_real(tmp_path, cup):
    h5, csv, feats, target = cup
    other = tmp_path / "renamed.csv"
    pl.read_csv(csv).rename({"Image Path": "file", "Target": "is_real"}).write_csv(other)
    r = invoke("import-h5", h5, "--csv", other, "--out", tmp_path / "emb", "--column", "path=file",
               "--column", "label=is_real", "--column", "source=Gen", "--target-means", "real",
               "--model", "ViT-B-16", "--pretrained", "laion2b_s34b_b88k", "--feature", "pre", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    s = store.open(tmp_path / "emb")
    X, m = s.load()
    np.testing.assert_array_equal(X, feats)  # float32 kept exactly
    assert m["label"].to_list() == (1 - target).tolist()
    assert m["source"].to_list() == pl.read_csv(csv)["Gen"].to_list()
    assert (s.provenance["model"], s.provenance["feature"]) == ("ViT-B-16", "pre")


def test_streams_in_blocks_into_several_shards(tmp_path, cup, monkeypatch):
    h5, csv, feats, _ = cup
    reads, real_getitem = [], h5py.Dataset.__getitem__

    def spy(ds, sel):
        out = real_getitem(ds, sel)
        if ds.name == "/train_features":
            reads.append(len(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    rep = import_h5(h5, csv, out=tmp_path / "emb", shard_size=10)
    assert reads == [10, 10, 10, 10, 5] and rep["shards"] == 5
    assert len(store.list_shards(tmp_path / "emb")) == 5
    np.testing.assert_array_equal(store.open(tmp_path / "emb").load()[0], feats.astype(np.float16))


def test_train_and_val_files_share_one_store(tmp_path, cup):
    h5, csv, feats, _ = cup
    val_h5 = tmp_path / "cup_val.h5"
    with h5py.File(val_h5, "w") as f:
        f.create_dataset("test_features", data=feats[:5] + 1)
    val_csv = tmp_path / "cup_val.csv"
    pl.DataFrame({"Image Path": [f"/data/cup/val/{i}.jpg" for i in range(5)], "Target": [0, 1, 0, 1, 1]}).write_csv(val_csv)
    out = tmp_path / "emb"
    import_h5(h5, csv, out=out, split="train")
    import_h5(val_h5, val_csv, dataset="test_features", out=out, split="val")
    X, m = store.open(out).load(split="val")
    assert m["label"].to_list() == [0, 1, 0, 1, 1]
    np.testing.assert_array_equal(X, (feats[:5] + 1).astype(np.float16))
    assert store.open(out).select(split="train").height == N


def _features(tmp_path, feats, name="bad.h5"):
    path = tmp_path / name
    with h5py.File(path, "w") as f:
        f.create_dataset("train_features", data=feats)
    return path


def test_non_finite_rows_become_failures_named_by_row(tmp_path, cup):
    """NaN/inf rows are never stored; the message names them and advises
    --dtype float32 only when that would keep them."""
    h5, csv, feats, _ = cup
    big = feats.copy()
    big[40, 3] = 1e6  # overflows float16 to inf
    rep = import_h5(_features(tmp_path, big), csv, out=tmp_path / "a", shard_size=10)
    s = store.open(tmp_path / "a")
    assert len(s) == N - 1 and rep["non_finite_rows"] == [40]
    assert s.failures["error"].to_list() == ["non_finite"] and s.failures["path"].to_list() == [f"/data/cup/train/0040.jpg"]
    assert "rows 40)" in rep["non_finite_message"] and "--dtype float32" in rep["non_finite_message"]
    assert np.isfinite(s.load()[0]).all()

    big[7, 0] = np.nan  # a real NaN: float32 would not help
    rep = import_h5(_features(tmp_path, big, "nan.h5"), csv, out=tmp_path / "b", shard_size=10)
    assert rep["non_finite_rows"] == [7, 40] and "rows 7, 40)" in rep["non_finite_message"]
    assert "float32" not in rep["non_finite_message"]
    rep = import_h5(_features(tmp_path, big, "nan.h5"), csv, out=tmp_path / "c", dtype="float32")
    assert rep["non_finite_rows"] == [7] and "float32" not in rep["non_finite_message"]  # already float32
    assert len(store.open(tmp_path / "c")) == N - 1

    r = invoke("import-h5", _features(tmp_path, big, "nan.h5"), "--csv", csv, "--out", tmp_path / "d")
    assert r.exit_code == 0 and "2 rows of dataset 'train_features' have NaN or inf values (rows 7, 40)" in r.output


KILL_AFTER_TWO_SHARDS = """
import os, signal, sys
from dfclip.store import writer
from dfclip.store.importer import import_h5
real, done = writer.ShardWriter.flush, []
def flush(self):
    path = real(self)
    if path is not None:
        done.append(path)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return path
writer.ShardWriter.flush = flush
import_h5(sys.argv[1], sys.argv[2], out=sys.argv[3], shard_size=10, split=sys.argv[4])
"""


def test_killed_import_is_invisible_and_cleaned_by_the_next_writer(tmp_path, cup):
    """After SIGKILL half-way, readers see none of the import (alone or beside an
    earlier import), and a re-run imports everything once."""
    h5, csv, feats, _ = cup
    out = tmp_path / "emb"

    def killed(split):
        r = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_SHARDS, h5, csv, out, split],
                           capture_output=True, text=True, env={**os.environ})
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert len(list(out.glob("shard-*.h5"))) >= 2  # two of the five shards landed ...

    killed("train")
    with pytest.raises(UserError, match="has no shards"):  # ... and count for nothing
        store.open(out)
    import_h5(h5, csv, out=out, shard_size=10, split="val")
    s = store.open(out)
    assert len(s) == N and set(s.meta["split"]) == {"val"} and len(s.shards) == 5
    assert len(list(out.glob("shard-*.h5"))) == 5  # the killed import's shards were deleted

    killed("train")  # a killed import beside a complete one hides nothing and adds nothing
    s = store.open(out)
    assert len(s) == N and set(s.meta["split"]) == {"val"} and s.info()["unfinished_import_shards"] == 2


def _fails(tmp_path, args, *must_contain):
    r = invoke("import-h5", *args)
    assert r.exit_code != 0 and isinstance(r.exception, UserError), r.output
    msg = str(r.exception)
    assert "\n" not in msg and all(s in msg for s in must_contain), msg
    assert not list(tmp_path.glob("emb/shard-*"))  # nothing written
    return msg


def test_user_errors(tmp_path, cup):
    h5, csv, _, _ = cup
    emb = tmp_path / "emb"
    _fails(tmp_path, [h5, "--csv", csv, "--out", emb, "--dataset", "features"],
           "no dataset 'features'", "train_features (45, 24)", "meta/ids (45,)", "--dataset")
    short = tmp_path / "short.csv"
    pl.read_csv(csv).head(40).write_csv(short)
    _fails(tmp_path, [h5, "--csv", short, "--out", emb], "45 rows", "has 40")
    _fails(tmp_path, [h5, "--csv", csv, "--out", emb, "--column", "label=Label"],
           "no column 'Label' (for label)", "available: Image Path, Target, Gen", "--column")
    nolabel = tmp_path / "nolabel.csv"
    pl.read_csv(csv).drop("Target").write_csv(nolabel)
    _fails(tmp_path, [h5, "--csv", nolabel, "--out", emb], "'Target' (for label)")
    odd = tmp_path / "odd.csv"
    pl.read_csv(csv).with_columns(pl.col("Target").cast(pl.Utf8).replace("1", "yes")).write_csv(odd)
    _fails(tmp_path, [h5, "--csv", odd, "--out", emb], "not 0, 1 or -1", "'yes'")
    _fails(tmp_path, [h5, "--csv", tmp_path / "nope.csv", "--out", emb], "nope.csv does not exist")
    _fails(tmp_path, [h5, "--csv", csv, "--out", emb, "--target-means", "maybe"], "fake", "real")
    _fails(tmp_path, [h5, "--csv", csv, "--out", emb, "--feature", "image"], "'image'", "proj", "pre")
    (tmp_path / "notes.h5").write_text("not hdf5")
    _fails(tmp_path, [tmp_path / "notes.h5", "--csv", csv, "--out", emb], "not a readable HDF5 file")
    _fails(tmp_path, [h5, "--csv", csv, "--out", emb, "--dataset", "meta/ids"], "not an N x D float matrix")


def test_import_into_a_store_of_another_model_is_refused_before_writing(tmp_path, cup):
    h5, csv, _, _ = cup
    import_h5(h5, csv, out=tmp_path / "emb")
    before = sorted((tmp_path / "emb").glob("shard-*"))
    with pytest.raises(UserError, match="model=ViT-L-14.*model=ViT-B-32"):
        import_h5(h5, csv, out=tmp_path / "emb", model="ViT-B-32")
    assert sorted((tmp_path / "emb").glob("shard-*")) == before


def test_entry_point_prints_one_line_without_traceback(tmp_path, cup):
    h5, csv, _, _ = cup
    r = subprocess.run([sys.executable, "-c", "from dfclip import cli; cli.dfembed_main()", "import-h5", str(h5), "--csv", str(csv),
                        "--out", str(tmp_path / "emb"), "--dataset", "nope"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no dataset 'nope'" in lines[0], r.stderr


def test_labels_follow_the_manifest_rules(tmp_path, cup):
    """One label parser for manifests and labels CSVs: words never flip, numbers do."""
    h5, csv, _, _ = cup
    words = ["fake", "Real", " 1 ", "0.0", "", "unknown", "-1", "authentic"] + ["1"] * (N - 8)
    labelled = tmp_path / "words.csv"
    pl.read_csv(csv).with_columns(Target=pl.Series(words)).write_csv(labelled)
    import_h5(h5, labelled, out=tmp_path / "a")
    import_h5(h5, labelled, out=tmp_path / "b", target_means="real")
    got = {k: store.open(tmp_path / k).meta.sort("row")["label"].to_list()[:8] for k in "ab"}
    assert got["a"] == [1, 0, 1, 0, -1, -1, -1, 0]
    assert got["b"] == [1, 0, 0, 1, -1, -1, -1, 0]


def test_duplicate_paths_report_the_live_rows(tmp_path, cup):
    h5, csv, feats, target = cup
    table = pl.read_csv(csv)
    paths = [f"/data/cup/train/{i // 2:04d}.jpg" for i in range(N)]  # every path twice (the last once)
    table.with_columns(pl.Series("Image Path", paths)).write_csv(csv)
    live = len(set(paths))
    rep = import_h5(h5, csv, out=tmp_path / "emb")
    assert rep["rows"] == live == len(store.open(tmp_path / "emb")) and rep["duplicate_paths"] == N - live
    last = {p: t for p, t in zip(paths, target)}  # the last row of each path is kept
    assert rep["labels"]["1"] == sum(last.values()) and rep["labels"]["0"] == live - sum(last.values())
    r = invoke("import-h5", h5, "--csv", csv, "--out", tmp_path / "emb2")
    assert r.exit_code == 0 and f"imported {live} rows" in r.output and f"of {N} in" in " ".join(r.output.split())


def test_unknown_split_values_in_the_labels_csv_are_refused_or_mapped(tmp_path, cup):
    h5, csv, feats, target = cup
    pl.read_csv(csv).with_columns(Fold=pl.Series(["training"] * (N - 1) + ["val"])).write_csv(csv)
    with pytest.raises(UserError, match=r"'training' \(44\).*--split-map training=train"):
        import_h5(h5, csv, out=tmp_path / "emb", columns={"split": "Fold"})
    with pytest.raises(UserError, match=r"'dev'"):
        import_h5(h5, csv, out=tmp_path / "emb", split="dev")
    assert not (tmp_path / "emb").exists()
    import_h5(h5, csv, out=tmp_path / "emb", columns={"split": "Fold"}, split_map={"training": "train"})
    assert store.open(tmp_path / "emb").meta.group_by("split").len().sort("split").rows() == [("train", 44), ("val", 1)]
