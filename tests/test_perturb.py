"""Robustness stores: `dfembed extract --perturb`, and `dfhead eval RUN --store A --store B ...`."""

import io
import json

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageFilter

from dfclip import store
from dfclip.embed.perturb import Perturb, canonical, parse_perturb
from dfclip.errors import UserError
from dfclip.heads.config import make_config
from dfclip.heads.run import evaluate_run, evaluate_stores, fit
from dfclip.store.synthetic import make_synthetic_store, rewrite_store

TINY = ["--model", "dfclip-tiny"]


def _image(seed: int, size=(70, 50)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_each_step_is_what_pil_does_and_composes_left_to_right():
    image = _image(0)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=75)
    jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Perturb("jpeg:75")(image, "a.png")), jpeg)
    assert Perturb("resize:0.5")(image, "a.png").size == (35, 25)
    np.testing.assert_array_equal(np.asarray(Perturb("blur:1.5")(image, "a.png")),
                                  np.asarray(image.filter(ImageFilter.GaussianBlur(1.5))))
    both = Perturb("resize:0.5+blur:1")(image, "a.png")
    np.testing.assert_array_equal(np.asarray(both), np.asarray(
        image.resize((35, 25), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1))))


def test_noise_is_seeded_per_path_and_has_the_asked_spread():
    image = Image.new("RGB", (200, 200), (128, 128, 128))
    noise = Perturb("noise:0.02")
    a1, a2, b = (np.asarray(noise(image, p), dtype=np.float64) for p in ("x/a.png", "x/a.png", "x/b.png"))
    np.testing.assert_array_equal(a1, a2)  # the same path: the same noise, in any process
    assert not np.array_equal(a1, b)
    assert abs((a1 - 128).std() - 0.02 * 255) < 0.3 and abs((a1 - 128).mean()) < 0.2


@pytest.mark.parametrize("spec, steps, text", [
    ("jpeg:75", [("jpeg", 75.0)], "jpeg:75"), ("JPEG:75.0 + resize:0.50", [("jpeg", 75.0), ("resize", 0.5)],
                                                "jpeg:75+resize:0.5"),
    ("", [], ""), ("none", [], ""), ("noise:0.02+blur:1", [("noise", 0.02), ("blur", 1.0)], "noise:0.02+blur:1")])
def test_parse_and_canonical(spec, steps, text):
    assert parse_perturb(spec) == steps and canonical(spec) == text


@pytest.mark.parametrize("spec", ["jpeg:0", "jpeg:75.5", "resize:2", "blur:0", "noise:x", "jpg:75", "jpeg", "blur:nan"])
def test_bad_specs_are_refused(spec):
    with pytest.raises(UserError, match="bad --perturb"):
        parse_perturb(spec)


def test_perturbed_store_records_it_differs_and_refuses_to_mix(tmp_path, tiny_checkpoint, dfembed):
    images = tmp_path / "images"
    for i, label in enumerate(["real", "fake", "fake", "real"]):
        (images / label / "s").mkdir(parents=True, exist_ok=True)
        _image(i, (64 + 16 * i, 64)).save(images / label / "s" / f"i{i}.png")
    base = ("extract", images, *TINY, "--pretrained", tiny_checkpoint, "--workers", 0, "--no-progress")
    assert dfembed(*base, "--out", tmp_path / "clean")[0] == 0
    assert dfembed(*base, "--out", tmp_path / "noisy", "--perturb", "noise:0.05+jpeg:60")[0] == 0
    assert dfembed(*base, "--out", tmp_path / "noisy2", "--perturb", "noise:0.05+jpeg:60", "--workers", 2)[0] == 0
    clean, noisy = store.open(tmp_path / "clean"), store.open(tmp_path / "noisy")
    assert noisy.provenance["perturb"] == "noise:0.05+jpeg:60" and clean.provenance["perturb"] == ""
    assert noisy.provenance["embed_config"]["perturb"] == "noise:0.05+jpeg:60"
    x_clean, x_noisy = clean.load()[0], noisy.load()[0]
    assert not np.allclose(x_clean, x_noisy)
    # Deterministic: another run (with worker processes this time) gives the same rows.
    np.testing.assert_array_equal(x_noisy, store.open(tmp_path / "noisy2").load()[0])
    code, stdout, _ = dfembed("info", tmp_path / "noisy")
    assert code == 0 and "noise:0.05+jpeg:60" in stdout
    code, _, err = dfembed(*base, "--out", tmp_path / "noisy")  # clean images into the perturbed store
    assert code == 2 and "perturb=noise:0.05+jpeg:60" in err and "perturb=none" in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def clean_and_shifted(tmp_path_factory):
    """A synthetic store, a copy of it (another perturbation recorded) and a copy with half its labels flipped."""
    root = tmp_path_factory.mktemp("robust")
    clean = make_synthetic_store(root / "clean", n=800, dim=16, signal=3, fake_rate=0.5, seed=1)
    s = store.open(clean)
    prov = {**s.provenance, "perturb": "jpeg:75"}
    same = rewrite_store(clean, root / "jpeg75", provenance=prov)
    labels = s.meta["label"].to_numpy().copy()
    labels[::2] = 1 - labels[::2]
    flipped = rewrite_store(clean, root / "blur1", provenance={**s.provenance, "perturb": "blur:1"}, label=labels)
    run = fit(clean, make_config(epochs=3, batch_size=64), runs_dir=root / "runs", name="r", device="cpu",
              log=lambda _: None)
    return run, [clean, same, flipped]


def test_eval_over_several_stores_writes_the_table_and_plot(clean_and_shifted):
    run, stores = clean_and_shifted
    # Every row, the run's training rows too: synthetic stores record no input folder, so only the clean
    # store's training rows would be recognised, and the comparison below needs the same rows in each.
    table = evaluate_stores(run, stores, device="cpu", include_train=True)
    assert table["store"].to_list() == ["clean", "jpeg75", "blur1"]
    assert table["perturb"].to_list() == ["none", "jpeg:75", "blur:1"]
    for row, s in zip(table.iter_rows(named=True), stores):
        single = evaluate_run(run, s, device="cpu", include_train=True)
        assert {k: row[k] for k in ("n", "auc", "ap", "eer", "acc")} == {k: single[k] for k in ("n", "auc", "ap", "eer", "acc")}
    assert table["auc"][0] == table["auc"][1] > 0.8 and abs(table["auc"][2] - 0.5) < 0.1
    assert pl.read_parquet(run / "robustness.parquet").equals(table)
    assert (run / "robustness.png").stat().st_size > 1000


def test_dfhead_eval_prints_one_table(clean_and_shifted, dfhead, monkeypatch):
    from dfclip import cli

    monkeypatch.setattr(cli.out, "width", 200)
    run, stores = clean_and_shifted
    code, out, err = dfhead("eval", run, "--store", stores[0], "--store", stores[2], "--device", "cpu")
    assert code == 0, err
    assert "robustness" in out and "blur:1" in out and "jpeg" not in out
    assert len([line for line in out.splitlines() if "│ clean" in line or "│ blur1" in line]) == 2
    code, out, _ = dfhead("eval", run, "--store", stores[0], "--store", stores[1], "--json", "--device", "cpu")
    assert code == 0 and [r["store"] for r in json.loads(out)] == ["clean", "jpeg75"]
    code, _, err = dfhead("eval", run, "--store", stores[0], "--store", stores[1], "--split", "test", "--device", "cpu")
    assert code == 2 and "no labelled rows in split 'test'" in err
