"""The checkout's top-level ``kernels/`` folder never stands in for the PyPI package named ``kernels``.

transformers (5.x) imports Hugging Face's ``kernels`` package whenever it is installed. A process started from
the checkout root has the root first on ``sys.path``; the folder's ``__init__`` hands such an import over to the
installed package, or fails as if the folder were not there. These run in subprocesses from the checkout root,
as a user's ``python -m twamerge ...`` or ``python -m pytest`` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from text_fixtures import save_finetunes, sentences, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_import_kernels_from_the_checkout_root_is_never_this_repository():
    r = _python("-c", "import kernels, sys; print(kernels.__file__); print(sys.modules['kernels'] is kernels)")
    if r.returncode != 0:  # no PyPI ``kernels`` installed: the folder must not be found either
        assert "No module named 'kernels'" in r.stderr, r.stderr
        return
    where, same = r.stdout.split()
    assert not Path(where).resolve().is_relative_to(ROOT / "kernels"), where
    assert same == "True"


def test_without_the_pypi_package_kernels_is_no_regular_package_of_this_repository():
    # site-packages removed from the path: the checkout's folder has no __init__.py, so at most an empty
    # namespace portion can answer (no file of this repository runs as a top-level ``kernels``).
    code = ("import sys; sys.path = [p for p in sys.path if 'site-packages' not in p]\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
            "else:\n    print('namespace' if getattr(kernels, '__file__', None) is None else kernels.__file__)")
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() in (["missing", "kernels"], ["namespace"]), r.stdout


def test_twamerge_kernels_is_still_the_folder():
    r = _python("-c", "import twamerge.kernels.dispatch as k; print(k.__file__); print(callable(k.combine))")
    assert r.returncode == 0, r.stderr
    where, ok = r.stdout.split()
    assert Path(where).resolve() == ROOT / "kernels" / "dispatch.py" and ok == "True"


def test_find_spec_of_kernels_from_the_checkout_root_is_the_installed_package():
    """transformers asks importlib.util.find_spec("kernels") whether the package is there: the answer must be
    the installed one (a folder without __init__.py is only a namespace portion, which loses to it)."""
    r = _python("-c", "import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)")
    assert r.returncode == 0, r.stderr
    assert not Path(r.stdout.strip()).resolve().is_relative_to(ROOT / "kernels"), r.stdout


def test_python_m_twamerge_fits_hugging_face_folders_from_the_checkout_root(tmp_path):
    pytest.importorskip("transformers")
    dirs = save_finetunes(tmp_path, "causal-lm", 2)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": t} for t in sentences(16)])
    out = tmp_path / "merged"
    r = _python("-m", "twamerge", "fit", *map(str, dirs), "--val", str(val), "-o", str(out), "--epochs", "1",
                "--batch-size", "8", "--no-greedy", "--holdout", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
