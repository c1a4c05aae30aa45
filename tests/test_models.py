"""--model specs and how checkpoint keys map onto the model (ModelKeys); the --loss spec is in test_tasks.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from digits_run import FAST, fit_digits
from safetensors.torch import load_file, save_file

from twamerge.config import DataConfig, FitConfig, ModelConfig
from twamerge.errors import ModelError
from twamerge.pipeline import fit

_fit = fit_digits


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:build", "cannot import module"),
    (str(Path(__file__).parent / "assets" / "mlp.py") + ":broken", "factory raised RuntimeError"),
    (str(Path(__file__).parent / "assets" / "mlp.py") + ":nothing", "no callable 'nothing'"),
    ("missing_file.py:build", "no such file"),
])
def test_bad_model_spec(run, tmp_path, spec, match):
    out = tmp_path / "m.safetensors"
    with pytest.raises(ModelError, match=match):
        fit(run.checkpoints, val=DataConfig(str(run.val)), model=ModelConfig(spec), output=out, cfg=FitConfig(**FAST))
    assert not out.exists()


def test_unreadable_hf_config_is_a_model_error(tmp_path):
    from twamerge.models import build_model

    (tmp_path / "config.json").write_text('{"model_type": "no_such_architecture_xyz"}')
    with pytest.raises(ModelError, match="config.json cannot be loaded"):
        build_model(None, {}, hf_dir=tmp_path)


def test_checkpoints_that_do_not_fit_the_model(run, tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.raises(ModelError, match=r"missing keys \['fc1.weight'.*unexpected keys \['fc1.kernel'"):
        renamed = []
        for i, p in enumerate(run.checkpoints[:2]):
            sd = load_file(str(p))
            sd["fc1.kernel"] = sd.pop("fc1.weight")
            renamed.append(tmp_path / f"r{i}.safetensors")
            save_file(sd, str(renamed[-1]))
        _fit(run, out, checkpoints=renamed)
    assert not out.exists()
    with pytest.raises(ModelError, match="key fc1.weight: checkpoint shape"):
        _fit(run, out, model_args={"hidden": 16})
    assert not out.exists()
