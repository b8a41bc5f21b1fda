"""The install exposes one import name, `dfclip`, and nothing generic like `store` or `cli`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_dfclip_package(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "Could not find a version that satisfies" in build.stderr:
        pytest.skip("the build backend (setuptools) cannot be fetched: no package index reachable")
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("dfclip-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"dfclip", wheel.name.split("-py3")[0] + ".dist-info"}
    for must in ("dfclip/cli.py", "dfclip/store/format.py", "dfclip/heads/losses.py", "dfclip/embed/extract.py",
                 "dfclip/embed/model_configs/dfclip-tiny.json", "dfclip/heads/configs/paper.json"):
        assert must in names
    assert not any(n.startswith(("dfclip/tests/", "dfclip/bench/", "dfclip/scripts/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "dfembed = dfclip.cli:dfembed_main" in text and "dfhead = dfclip.cli:dfhead_main" in text


def test_only_dfclip_is_importable_outside_the_checkout(tmp_path):
    code = ("import importlib.util, dfclip.heads.losses, dfclip.cli; "
            "print([m for m in ('store', 'heads', 'embed', 'cli') if importlib.util.find_spec(m)])")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
