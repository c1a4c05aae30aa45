"""Settings are validated where they are defined, naming the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from twamerge.config import FitConfig, OutputConfig, ReadConfig


def test_bits_3_is_rejected():
    with pytest.raises(ValueError, match="bits=3"):
        FitConfig(bits=3)


@pytest.mark.parametrize("field, value, allowed", [
    ("optimizer", "adam", "adamw or sgd"),
    ("bn_recalibrate", "yes", "auto, on or off"),
    ("init", "worst", "uniform, greedy or best"),
    ("select", "all", "twa or best"),
    ("coordinates", "polar", "candidates or weights"),
    ("schedule", "linear", "cosine, step or constant"),
    ("blocks", "size:0", "global, layer or size:N"),
])
def test_choices_name_the_field_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=f"{field}={value!r} is invalid; expected {allowed}"):
        FitConfig(**{field: value})


def test_init_needs_the_baseline_it_starts_from():
    with pytest.raises(ValueError, match="candidate scores, which --no-candidates turns off"):
        FitConfig(init="best", eval_candidates=False)
    with pytest.raises(ValueError, match="the greedy soup, which --no-greedy turns off"):
        FitConfig(init="greedy", greedy=False)
    FitConfig(init="greedy", eval_candidates=False)  # the soup scores the candidates itself


def test_select_best_needs_held_out_rows():
    with pytest.raises(ValueError, match=r"select='best' is invalid; expected held-out rows to choose on"):
        FitConfig(select="best", holdout=0.0)


def test_cli_choices_come_from_the_config():
    """The CLI's choices are the config's Literals and the kernels' bit widths, not copies."""
    from twamerge.kernels.layout import SUPPORTED_BITS
    from typer.testing import CliRunner

    from twamerge import cli
    from twamerge.config import Coordinates, Init, Optimizer, Schedule, Toggle, choices

    def values(enum):
        return tuple(e.value for e in enum)

    assert values(cli.Bits) == tuple(str(b) for b in SUPPORTED_BITS)
    assert values(cli.Optimizer) == choices(Optimizer) and values(cli.Init) == choices(Init)
    assert values(cli.Coordinates) == choices(Coordinates) and values(cli.Toggle) == choices(Toggle)
    assert values(cli.Schedule) == choices(Schedule) and FitConfig().schedule == "cosine"
    r = CliRunner().invoke(cli.app, ["fit", "x.safetensors", "--val", "v", "-o", "m.safetensors",
                                     "--optimizer", "adam"])
    assert r.exit_code == 2 and "adamw" in r.output and "sgd" in r.output


def test_output_and_read_configs():
    out = OutputConfig.of("m.safetensors")
    assert out.path.name == "m.safetensors" and not out.force and out.report is None
    assert OutputConfig.of(out) is out
    assert OutputConfig("m.pt", report="r.json").report.name == "r.json"
    with pytest.raises(ValueError, match="max_shard_size"):
        OutputConfig("m.safetensors", max_shard_size=0)
    with pytest.raises(ValueError, match="keys='some'"):
        ReadConfig(keys="some")
