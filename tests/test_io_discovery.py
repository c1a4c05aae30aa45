"""io.discovery: paths, globs and directories -> ordered candidates (files written by safetensors and huggingface_hub)."""

from __future__ import annotations

import pytest
from ckpt_fixtures import small_state_dict, touch_all

from twamerge.errors import CheckpointError
from twamerge.io import expand_paths


def test_expand_paths_natural_order_globs_and_dirs(tmp_path):
    touch_all(tmp_path, ["epoch10.safetensors", "epoch9.safetensors", "epoch1.safetensors", "epoch2.safetensors"])
    want = ["epoch1", "epoch2", "epoch9", "epoch10"]
    assert [p.stem for p in expand_paths([str(tmp_path / "epoch*.safetensors")])] == want
    assert [p.stem for p in expand_paths([tmp_path])] == want
    # Explicit arguments of one numbered series are put in natural order too (test_numbered_series_...).
    assert [p.stem for p in expand_paths([tmp_path / "epoch9.safetensors", tmp_path / "epoch1.safetensors"])] == [
        "epoch1", "epoch9"]


def test_numbered_series_given_out_of_order_are_put_in_natural_order_and_the_log_says_so(tmp_path, caplog):
    """A shell expands out/checkpoint-* lexically (checkpoint-100 first): the candidates are reordered in the
    places the series occupies, logged once; names that are not one series keep the order given."""
    from twamerge.io.discovery import out_of_natural_order

    names = ["checkpoint-100", "checkpoint-25", "checkpoint-50", "checkpoint-75"]
    files = touch_all(tmp_path, [f"{n}.safetensors" for n in names])
    (final, best) = touch_all(tmp_path, ["final.safetensors", "best.safetensors"])
    lexical = sorted(files, key=str)  # what `ls` and the shell give
    assert [p.stem for p in lexical] == names
    with caplog.at_level("INFO", logger="twamerge"):
        got = expand_paths([final, *lexical, best])
        again = expand_paths([final, *lexical, best])
    assert [p.stem for p in got] == ["final", "checkpoint-25", "checkpoint-50", "checkpoint-75", "checkpoint-100",
                                     "best"]
    assert again == got
    said = [r.getMessage() for r in caplog.records if "natural order" in r.getMessage()]
    assert len(said) == 1 and "checkpoint-100.safetensors was given before" in said[0] and "checkpoint-25" in said[0]
    assert out_of_natural_order([final, *lexical]) == (lexical[0], lexical[1])
    # Unrelated names: the order given, nothing said.
    caplog.clear()
    with caplog.at_level("INFO", logger="twamerge"):
        assert expand_paths([final, best]) == [final, best]
        assert expand_paths(sorted(files, key=lambda p: int(p.stem.split("-")[1]))) == got[1:5]
    assert out_of_natural_order([final, best]) is None
    assert not [r for r in caplog.records if "natural order" in r.getMessage()]


def test_expand_paths_model_dir_and_index_shards(tmp_path):
    from huggingface_hub import save_torch_state_dict

    hf = tmp_path / "hf"
    hf.mkdir()
    save_torch_state_dict(small_state_dict(0), hf, max_shard_size=600)
    (hf / "config.json").write_text("{}")
    assert expand_paths([hf]) == [hf]
    # A glob over the shard folder yields the index, not the shards it covers.
    assert [p.name for p in expand_paths([str(hf / "*")])] == ["model.safetensors.index.json"]


@pytest.mark.parametrize("case", ["duplicate", "missing", "empty-glob", "empty-dir"])
def test_expand_paths_errors(tmp_path, case):
    (p,) = touch_all(tmp_path, ["a.safetensors"])
    (tmp_path / "empty").mkdir()
    args = {
        "duplicate": [p, tmp_path / "." / "a.safetensors"],
        "missing": [tmp_path / "nope.pt"],
        "empty-glob": [str(tmp_path / "*.pt")],
        "empty-dir": [tmp_path / "empty"],
    }[case]
    with pytest.raises(CheckpointError) as e:
        expand_paths(args)
    assert "\n" not in str(e.value)
    if case == "duplicate":
        assert "more than once" in str(e.value)


def test_average_ema_over_a_lexically_listed_series_is_the_ema_in_natural_order(tmp_path):
    """`twamerge average out/checkpoint-* --ema 0.5` as a shell runs it (checkpoint-100 first): the EMA runs over
    checkpoint-25, 50, 75, 100, computed here by its recursion; --weights over such a list is refused."""
    import torch
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from twamerge.cli import app

    steps = [25, 50, 75, 100]
    for n in steps:
        save_file({"w": torch.full((3,), float(n), dtype=torch.float64)}, str(tmp_path / f"checkpoint-{n}.safetensors"))
    lexical = sorted(tmp_path.glob("checkpoint-*.safetensors"), key=str)
    ema = float(steps[0])
    for n in steps[1:]:
        ema = 0.5 * ema + 0.5 * n  # e_j = decay * e_{j-1} + (1 - decay) * c_j
    runner = CliRunner()
    r = runner.invoke(app, ["average", *map(str, lexical), "--ema", "0.5", "-o", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 0, r.output
    assert "candidates put in natural order" in r.stderr
    assert torch.allclose(load_file(str(tmp_path / "m.safetensors"))["w"], torch.full((3,), ema, dtype=torch.float64))
    assert ema == 78.125  # and not the 71.875 of the lexical order
    r = runner.invoke(app, ["average", *map(str, lexical), "--weights", "1,0,0,0",
                            "-o", str(tmp_path / "w.safetensors")])
    assert r.exit_code == 2  # a usage error, as other bad --weights
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint-100.safetensors was given before" in errors[0], r.stderr
    assert not (tmp_path / "w.safetensors").exists()
