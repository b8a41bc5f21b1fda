"""Folder walk and manifest reading: label/source/split rules, schema, and every user error."""

import os
from pathlib import Path

import polars as pl
import pytest

from dfclip.embed.sources import (
    ACCEPTED_EXTENSIONS,
    IMAGE_EXTENSIONS,
    load_inputs,
    read_manifest,
    scan_folder,
)
from dfclip.errors import UserError
from dfclip.store.format import ROW_SCHEMA, parse_column_map


def touch(root: Path, rel: str, content: bytes = b"x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def by_path(rows: pl.DataFrame) -> dict[str, dict]:
    return {row["path"]: row for row in rows.iter_rows(named=True)}


# ---------------------------------------------------------------- folder walk


@pytest.mark.parametrize(
    "folder, label",
    [("real", 0), ("REAL", 0), ("0_real", 0), ("Authentic", 0),
     ("fake", 1), ("Fake", 1), ("1_FAKE", 1), ("synthetic", 1), ("Generated", 1),
     ("faces", -1), ("realistic", -1)],
)
def test_label_spellings(tmp_path, folder, label):
    touch(tmp_path, f"{folder}/img.jpg")
    rows = scan_folder(tmp_path)
    assert rows["label"].to_list() == [label]


def test_label_source_split_rules(tmp_path):
    expected = {
        # path: (label, source, split)
        "fake/stylegan2/a.png": (1, "stylegan2", ""),
        "fake/stylegan2/deeper/b.png": (1, "stylegan2", ""),
        "fake/c.png": (1, "", ""),
        "real/d.jpg": (0, "", ""),
        "real/ffhq/e.jpg": (0, "ffhq", ""),
        "misc/f.jpg": (-1, "", ""),
        "g.jpg": (-1, "", ""),
        # the deepest label folder wins; the source is the folder right under it
        "real/x/fake/sd/h.webp": (1, "sd", ""),
        "fake/x/Real/i.webp": (0, "", ""),
        # split folders above or below the label folder; split names are skipped as sources
        "train/fake/sd15/j.jpg": (1, "sd15", "train"),
        "fake/Val/dalle/k.jpg": (1, "dalle", "val"),
        "valid/real/l.jpg": (0, "", "val"),
        "VALIDATION/m.jpg": (-1, "", "val"),
        "test/1_fake/midjourney/n.jpg": (1, "midjourney", "test"),
        "train/x/test/o.jpg": (-1, "", "test"),
        # a file *named* like a label or split does not count; only folders do
        "p/fake.jpg": (-1, "", ""),
        "q/train.png": (-1, "", ""),
    }
    for rel in expected:
        touch(tmp_path, rel)
    got = by_path(scan_folder(tmp_path))
    assert set(got) == set(expected)
    for rel, (label, source, split) in expected.items():
        row = got[rel]
        assert (row["label"], row["source"], row["split"], row["group"]) == (label, source, split, ""), rel


def test_extensions_case_insensitive_and_hidden_skipped(tmp_path):
    images = [f"a{ext}" for ext in sorted(IMAGE_EXTENSIONS)]
    images += [f"b{ext.upper()}" for ext in sorted(IMAGE_EXTENSIONS)] + ["c.JpG"]
    for name in images:
        touch(tmp_path, f"fake/gen/{name}")
    for name in ["notes.txt", "meta.json", "noext", "archive.jpg.zip", ".hidden.jpg", "._x.jpg"]:
        touch(tmp_path, f"fake/gen/{name}")
    touch(tmp_path, ".cache/fake/secret.jpg")
    touch(tmp_path, "fake/.thumbs/t.jpg")
    rows = scan_folder(tmp_path)
    assert sorted(rows["path"].to_list()) == sorted(f"fake/gen/{n}" for n in images)
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS


def test_schema_sorted_unique_size_mtime(tmp_path):
    names = ["z/9.png", "a/b/1.jpg", "A/2.jpg", "m.jpg", "a/10.jpg", "a/2.jpg"]
    for i, rel in enumerate(names):
        touch(tmp_path, rel, b"y" * (i + 3))
    os.utime(tmp_path / "m.jpg", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    rows = scan_folder(tmp_path)
    assert rows.schema == pl.Schema(ROW_SCHEMA)
    paths = rows["path"].to_list()
    assert paths == sorted(names) and rows["path"].n_unique() == len(names)
    for row in rows.iter_rows(named=True):
        st = os.stat(tmp_path / row["path"])
        assert row["size"] == names.index(row["path"]) + 3 == st.st_size
        assert row["mtime_ns"] == st.st_mtime_ns
    assert by_path(rows)["m.jpg"]["mtime_ns"] == 1_600_000_000_123_456_789


def test_relative_root_and_posix_paths(tmp_path, monkeypatch):
    touch(tmp_path, "data/fake/gen/x.png")
    monkeypatch.chdir(tmp_path)
    rows, root = load_inputs("data")
    assert root == tmp_path / "data" and root.is_absolute()
    assert rows["path"].to_list() == ["fake/gen/x.png"]


def test_symlinks_followed_and_loops_stop(tmp_path):
    outside = tmp_path / "elsewhere"
    touch(outside, "big.png", b"z" * 50)
    touch(tmp_path / "single", "other.png", b"w" * 20)
    data = tmp_path / "data"
    touch(data, "fake/gen/a.png")
    (data / "fake/gen/link.png").symlink_to(tmp_path / "single" / "other.png")
    (data / "fake/gen/dangling.png").symlink_to(outside / "gone.png")
    (data / "real").mkdir()
    (data / "real/linked_dir").symlink_to(outside, target_is_directory=True)
    (data / "fake/gen/loop").symlink_to(data / "fake", target_is_directory=True)
    (data / "zz_link").symlink_to(data / "fake", target_is_directory=True)
    got = by_path(scan_folder(data))
    # Loops and second links are walked once, and the real path wins over a linked one.
    assert set(got) == {"fake/gen/a.png", "fake/gen/link.png", "real/linked_dir/big.png"}
    assert got["fake/gen/link.png"]["size"] == 20  # size of the target, not the link
    assert got["real/linked_dir/big.png"]["label"] == 0


def labelled_view(tmp_path: Path) -> Path:
    """raw/ holds the images; fake/sd15 and real/ffhq are symlinks into it: a labelled view of raw/."""
    view = tmp_path / "lk"
    for rel in ("raw/sd15/a.png", "raw/sd15/b.png", "raw/ffhq/c.png"):
        touch(view, rel)
    (view / "fake").mkdir()
    (view / "real").mkdir()
    (view / "fake/sd15").symlink_to("../raw/sd15", target_is_directory=True)
    (view / "real/ffhq").symlink_to("../raw/ffhq", target_is_directory=True)
    return view


def test_symlinked_label_folders_win_over_the_unlabelled_path(tmp_path, capsys):
    got = by_path(scan_folder(labelled_view(tmp_path)))
    assert {p: (r["label"], r["source"]) for p, r in got.items()} == {
        "fake/sd15/a.png": (1, "sd15"), "fake/sd15/b.png": (1, "sd15"), "real/ffhq/c.png": (0, "ffhq")}
    err = " ".join(capsys.readouterr().err.split())
    assert "3 files are reachable under several paths" in err and "raw/sd15/a.png -> fake/sd15/a.png" in err


def test_one_file_under_two_paths_of_one_label_is_kept_once(tmp_path):
    view = labelled_view(tmp_path)
    (view / "fake/gen").symlink_to("../raw/sd15", target_is_directory=True)
    (view / "zz").symlink_to("fake", target_is_directory=True)  # an unlabelled view of fake/: loses
    got = by_path(scan_folder(view))
    # Among labelled paths of one label the first in path order is kept (fake/gen before fake/sd15).
    assert {p: (r["label"], r["source"]) for p, r in got.items()} == {
        "fake/gen/a.png": (1, "gen"), "fake/gen/b.png": (1, "gen"), "real/ffhq/c.png": (0, "ffhq")}


def test_a_file_under_two_labels_is_one_line_naming_both_paths(tmp_path):
    view = labelled_view(tmp_path)
    (view / "real/sd").symlink_to("../raw/sd15", target_is_directory=True)
    with pytest.raises(UserError) as err:
        scan_folder(view)
    message = str(err.value)
    assert "\n" not in message and "fake/sd15/a.png" in message and "real/sd/a.png" in message
    assert "two labels" in message
    # A linked single file counts too.
    other = tmp_path / "other"
    touch(other, "real/x.png")
    (other / "fake").mkdir()
    (other / "fake/y.png").symlink_to(other / "real/x.png")
    with pytest.raises(UserError, match=r"fake/y\.png.*real/x\.png|real/x\.png.*fake/y\.png"):
        scan_folder(other)


def test_every_extension_pillow_opens_is_accepted_and_others_are_counted(tmp_path, capsys):
    from PIL import Image, features

    assert {".jfif", ".jpe", ".apng"} <= IMAGE_EXTENSIONS and IMAGE_EXTENSIONS <= ACCEPTED_EXTENSIONS
    if features.check("avif"):
        assert ".avif" in IMAGE_EXTENSIONS
    for name in ("a.jfif", "b.JPE", "c.avif", "d.heic", "e.heic", "f.txt", "noext", "g.jpg"):
        touch(tmp_path, f"fake/gen/{name}")
    got = set(scan_folder(tmp_path)["path"].to_list())
    accepted = {f"fake/gen/{n}" for n in ("a.jfif", "b.JPE", "g.jpg")}
    assert accepted <= got and not any(p.endswith((".heic", ".txt", "noext")) for p in got)
    err = " ".join(capsys.readouterr().err.split())
    skipped = 4 + (".avif" not in IMAGE_EXTENSIONS)
    assert f"skipped {skipped} files with other extensions (.heic 2, " in err
    assert ".txt 1" in err and "(no extension) 1" in err
    assert ".heic" not in IMAGE_EXTENSIONS or Image.registered_extensions().get(".heic")


def test_no_image_error_names_the_skipped_extensions(tmp_path):
    touch(tmp_path, "fake/a.heic")
    with pytest.raises(UserError, match=r"no images found.*skipped 1 files with other extensions \(\.heic 1\)"):
        scan_folder(tmp_path)


def test_sources_differing_only_in_case_are_warned_about(tmp_path, capsys):
    touch(tmp_path, "fake/GAN/a.png")
    touch(tmp_path, "fake/gan/b.png")
    touch(tmp_path, "fake/sd/c.png")
    rows, _ = load_inputs(tmp_path)
    assert sorted(set(rows["source"])) == ["GAN", "gan", "sd"]  # kept apart, as named
    err = " ".join(capsys.readouterr().err.split())
    assert "differ only in case (GAN / gan)" in err


def test_scan_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    touch(tmp_path, "file.jpg")
    with pytest.raises(UserError, match="not a folder"):
        scan_folder(tmp_path / "file.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no images found.*\.jpg.*\.webp"):
        scan_folder(tmp_path / "empty")
    touch(tmp_path, "docs/readme.txt")
    with pytest.raises(UserError, match="no images found") as err:
        scan_folder(tmp_path / "docs")
    assert "\n" not in str(err.value)


def test_non_utf8_file_name(tmp_path):
    os.makedirs(os.path.join(os.fsencode(tmp_path), b"fake"))
    open(os.path.join(os.fsencode(tmp_path), b"fake", b"caf\xe9.jpg"), "wb").close()
    with pytest.raises(UserError, match=r"not valid UTF-8: 'fake/caf.*rename"):
        scan_folder(tmp_path)


# ---------------------------------------------------------------- manifests


def write_images(root: Path, rels: list[str]) -> None:
    for i, rel in enumerate(rels):
        touch(root, rel, b"p" * (10 + i))


def test_manifest_csv_relative_to_its_folder(tmp_path):
    write_images(tmp_path, ["imgs/b.png", "imgs/a.jpg", "imgs/c.webp"])
    (tmp_path / "m.csv").write_text(
        "path,label,source,split,group\n"
        "imgs/b.png,1,sd15,train,v1\n"
        "./imgs/a.jpg,0,ffhq,validation,v2\n"
        "imgs/x/../c.webp,-1,,,\n"
    )
    rows = read_manifest(tmp_path / "m.csv")
    assert rows.schema == pl.Schema(ROW_SCHEMA)
    assert rows.to_dicts()[0] | {"size": None, "mtime_ns": None} == {
        "path": "imgs/a.jpg", "label": 0, "source": "ffhq", "split": "val", "group": "v2",
        "size": None, "mtime_ns": None,
    }
    assert rows["path"].to_list() == ["imgs/a.jpg", "imgs/b.png", "imgs/c.webp"]
    assert rows["label"].to_list() == [0, 1, -1]
    assert rows["source"].to_list() == ["ffhq", "sd15", ""]
    assert rows["group"].to_list() == ["v2", "v1", ""]
    for row in rows.iter_rows(named=True):
        st = os.stat(tmp_path / row["path"])
        assert (row["size"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns)


def test_manifest_parquet_and_explicit_root(tmp_path):
    images = tmp_path / "images"
    write_images(images, ["fake/1.png", "real/2.png"])
    manifest = tmp_path / "meta" / "m.parquet"
    manifest.parent.mkdir()
    pl.DataFrame({"path": ["real/2.png", "fake/1.png"], "label": [0, 1], "extra": [7, 8]}).write_parquet(manifest)
    rows = read_manifest(manifest, root=images)
    assert rows["path"].to_list() == ["fake/1.png", "real/2.png"]
    assert rows["label"].to_list() == [1, 0]
    assert rows["source"].to_list() == ["", ""] and rows["split"].to_list() == ["", ""]
    assert rows["size"].to_list() == [10, 11]
    rows2, root = load_inputs(manifest, root=images)
    assert rows2.equals(rows) and root == images
    # Without root, paths resolve next to the manifest, where they do not exist.
    with pytest.raises(UserError, match="2 of 2 manifest files not found"):
        read_manifest(manifest)


def test_sp_cup_style_column_mapping_and_target_means(tmp_path):
    write_images(tmp_path, ["train/0001.jpg", "train/0002.jpg", "train/0003.jpg"])
    (tmp_path / "train.csv").write_text(
        "Image Path,Target,Extra\ntrain/0001.jpg,1,a\ntrain/0002.jpg,0,b\ntrain/0003.jpg,1,c\n"
    )
    columns = parse_column_map(["path=Image Path", "label=Target"])
    assert columns == {"path": "Image Path", "label": "Target"}
    rows = read_manifest(tmp_path / "train.csv", columns=columns)
    assert rows["label"].to_list() == [1, 0, 1]
    flipped = read_manifest(tmp_path / "train.csv", columns=columns, target_means="real")
    assert flipped["label"].to_list() == [0, 1, 0]
    assert flipped["split"].to_list() == ["", "", ""]  # the train/ folder is not read in manifests
    with pytest.raises(UserError, match="target_means"):
        read_manifest(tmp_path / "train.csv", columns=columns, target_means="1")


def test_string_labels_and_words_never_flip(tmp_path):
    rels = [f"{i}.png" for i in range(8)]
    write_images(tmp_path, rels)
    raw = ["Real", "FAKE", " fake ", "unknown", "", "1.0", "-1", "authentic"]
    pl.DataFrame({"path": rels, "label": raw}).write_csv(tmp_path / "m.csv")
    assert read_manifest(tmp_path / "m.csv")["label"].to_list() == [0, 1, 1, -1, -1, 1, -1, 0]
    flipped = read_manifest(tmp_path / "m.csv", target_means="real")["label"].to_list()
    assert flipped == [0, 1, 1, -1, -1, 0, -1, 0]


def test_parquet_boolean_and_float_labels(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    pl.DataFrame({"path": ["a.png", "b.png"], "label": [True, False]}).write_parquet(tmp_path / "b.parquet")
    pl.DataFrame({"path": ["a.png", "b.png"], "label": [1.0, 0.0]}).write_parquet(tmp_path / "f.parquet")
    assert read_manifest(tmp_path / "b.parquet")["label"].to_list() == [1, 0]
    assert read_manifest(tmp_path / "f.parquet")["label"].to_list() == [1, 0]


def test_absolute_paths(tmp_path):
    write_images(tmp_path, ["root/fake/a.png", "root/real/b.png", "other/c.png"])
    root = tmp_path / "root"
    manifest = tmp_path / "m.csv"
    pl.DataFrame({"path": [str(root / "fake/a.png"), "real/b.png"], "label": [1, 0]}).write_csv(manifest)
    rows = read_manifest(manifest, root=root)
    assert rows["path"].to_list() == ["fake/a.png", "real/b.png"]
    pl.DataFrame({"path": [str(tmp_path / "other/c.png"), "../other/c.png"], "label": [1, 1]}).write_csv(manifest)
    with pytest.raises(UserError, match=r"2 manifest paths are outside the root .*other/c\.png.*--root"):
        read_manifest(manifest, root=root)
    # '..' paths escape any --root they are read from: the message must say so, not just "pass --root"
    with pytest.raises(UserError, match=r"may not climb out of it with '\.\.'"):
        read_manifest(manifest, root=tmp_path)


def test_manifest_errors(tmp_path):
    write_images(tmp_path, [f"img{i}.png" for i in range(3)])
    with pytest.raises(UserError, match="manifest file does not exist"):
        read_manifest(tmp_path / "missing.csv")
    (tmp_path / "m.xlsx").write_text("x")
    with pytest.raises(UserError, match=r"unsupported manifest type '\.xlsx'.*\.csv.*\.parquet"):
        read_manifest(tmp_path / "m.xlsx")

    (tmp_path / "nolabel.csv").write_text("file,y\nimg0.png,1\n")
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path / "nolabel.csv")
    message = str(err.value)
    assert "'path'" in message and "available columns: file, y" in message and "--column path=NAME" in message
    with pytest.raises(UserError, match=r"no 'label' column.*available columns: file, y.*--column label=NAME"):
        read_manifest(tmp_path / "nolabel.csv", columns={"path": "file"})
    with pytest.raises(UserError, match=r"no 'Origin' column for source.*--column source=NAME"):
        read_manifest(tmp_path / "nolabel.csv", columns={"path": "file", "label": "y", "source": "Origin"})

    (tmp_path / "bad.csv").write_text("path,label\nimg0.png,2\nimg1.png,maybe\nimg2.png,2\n")
    with pytest.raises(UserError, match=r"3 manifest labels .* \(e\.g\. '2', 'maybe'\)"):
        read_manifest(tmp_path / "bad.csv")

    rows = "".join(f"gone{i}.png,1\n" for i in range(5))
    (tmp_path / "gone.csv").write_text("path,label\nimg0.png,0\n" + rows)
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path / "gone.csv")
    message = str(err.value)
    assert "5 of 6 manifest files not found" in message
    assert "gone0.png, gone1.png, gone2.png)" in message and "gone3.png" not in message

    (tmp_path / "dup.csv").write_text("path,label\nimg0.png,0\n./img0.png,1\nimg1.png,1\n")
    with pytest.raises(UserError, match=r"1 paths appear more than once.*img0\.png.*one row per image"):
        read_manifest(tmp_path / "dup.csv")

    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(UserError, match="no rows"):
        read_manifest(tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_text("path,label\nimg0.png,1\n,0\n")
    with pytest.raises(UserError, match="1 manifest rows have an empty path"):
        read_manifest(tmp_path / "blank.csv")
    (tmp_path / "dir.csv").write_text("path,label\nimg0.png,1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/x.csv").write_text("path,label\n..,1\n")
    with pytest.raises(UserError, match="outside the root"):
        read_manifest(tmp_path / "sub/x.csv")
    (tmp_path / "sub/d.png").mkdir()  # a folder named like an image is not an image file
    (tmp_path / "sub/y.csv").write_text("path,label\nd.png,1\n")
    with pytest.raises(UserError, match="1 of 1 manifest files not found"):
        read_manifest(tmp_path / "sub/y.csv")


def test_parse_column_map():
    assert parse_column_map([]) == {}
    assert parse_column_map([" Label = Target ", "split=Fold=A"]) == {"label": "Target", "split": "Fold=A"}
    for bad, pattern in [
        (["path"], "OURS=THEIRS"),
        (["path="], "OURS=THEIRS"),
        (["=Image Path"], "OURS=THEIRS"),
        (["file=Image Path"], r"unknown column 'file'.*path, label, source, split, group"),
        (["path=a", "path=b"], "mapped twice"),
    ]:
        with pytest.raises(UserError, match=pattern):
            parse_column_map(bad)


def test_load_inputs_dispatch_and_errors(tmp_path):
    write_images(tmp_path, ["fake/gen/a.png"])
    rows, root = load_inputs(tmp_path)
    assert root == tmp_path and rows["source"].to_list() == ["gen"]
    with pytest.raises(UserError, match="only apply to manifests"):
        load_inputs(tmp_path, columns={"path": "x"})
    with pytest.raises(UserError, match="does not exist"):
        load_inputs(tmp_path / "nothing")


def test_unknown_split_values_are_refused_listing_them_or_mapped(tmp_path):
    write_images(tmp_path, [f"img{i}.png" for i in range(6)])
    splits = ["training", "training", "Valid", "TEST", "", "holdout"]
    lines = "".join(f"img{i}.png,1,{s}\n" for i, s in enumerate(splits))
    (tmp_path / "m.csv").write_text("path,label,split\n" + lines)
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path / "m.csv")
    message = str(err.value)
    assert "\n" not in message and "'training' (2)" in message and "'holdout' (1)" in message
    assert "--split-map training=train" in message and "Valid" not in message
    rows = read_manifest(tmp_path / "m.csv", split_map={"Training": "train", "holdout": "test"})
    assert rows["split"].to_list() == ["train", "train", "val", "test", "", "test"]
    with pytest.raises(UserError, match=r"--split-map holdout=.*'later'.*train, val, test"):
        read_manifest(tmp_path / "m.csv", split_map={"training": "train", "holdout": "later"})


def test_parse_split_map():
    from dfclip.store.format import parse_split_map

    assert parse_split_map([]) == {}
    assert parse_split_map(["training=train", " Dev = VALIDATION ", "none="]) == {
        "training": "train", "dev": "val", "none": ""}
    for bad in (["training"], ["=train"], ["a=b"], ["a=train", "A=val"]):
        with pytest.raises(UserError):
            parse_split_map(bad)
