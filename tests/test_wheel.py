"""A plain (non-editable) wheel contains ``twamerge.kernels`` and imports it from the installed copy.

The editable install used for development maps ``twamerge.kernels`` to ``kernels/`` through a finder,
which would hide a broken package-dir mapping; so the wheel is built from a copy of the sources,
unpacked into a scratch site folder, and imported by a fresh interpreter with that folder first on the
path (torch still comes from the current environment: reinstalling it would take minutes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_twamerge_kernels(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("twamerge\n")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "twamerge", src / "twamerge", ignore=ignore)
    shutil.copytree(ROOT / "kernels", src / "kernels", ignore=ignore)
    dist = tmp_path / "dist"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = dist.glob("twamerge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twamerge/kernels/dispatch.py" in names and "twamerge/py.typed" in names
    assert "twamerge/kernels/native.c" in names  # the C kernels' source, compiled on first use
    # A top-level ``kernels`` package would collide with the PyPI project of that name.
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import twamerge, twamerge.kernels.dispatch, twamerge.cli;"
        "from twamerge.kernels import native; ok, why = native.status(); assert ok, why;"
        "print(twamerge.__file__); print(twamerge.kernels.dispatch.__file__)"
    )
    env = {**os.environ, "TWAMERGE_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    pkg, kern = (Path(p) for p in res.stdout.split())
    assert pkg.is_relative_to(site) and kern == site / "twamerge" / "kernels" / "dispatch.py"
