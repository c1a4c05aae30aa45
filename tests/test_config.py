"""Settings are validated where they are defined, naming the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from twamerge.config import AverageConfig, EvalConfig, FitConfig, InspectConfig, OutputConfig, ReadConfig
from twamerge.errors import InvalidArgumentError


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
    import typing

    from twamerge.kernels.layout import SUPPORTED_BITS
    from typer.testing import CliRunner

    from twamerge import cli
    from twamerge.cli_options import Fields
    from twamerge.config import Backend, Coordinates, Init, Optimizer, Precision, Schedule, Select, Toggle, choices

    def option_choices(name):
        [p] = [p for p in Fields(FitConfig, "Fit", (name,)).parameters()]
        kind = typing.get_args(p.annotation)[0]  # Annotated[type, typer.Option(...)]
        if typing.get_origin(kind) is typing.Union:  # Optional[Literal[...]]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        return tuple(str(v) for v in typing.get_args(kind))

    assert option_choices("bits") == tuple(str(b) for b in SUPPORTED_BITS)
    assert option_choices("optimizer") == choices(Optimizer) and option_choices("init") == choices(Init)
    assert option_choices("coordinates") == choices(Coordinates) and option_choices("bn_recalibrate") == choices(Toggle)
    assert option_choices("schedule") == choices(Schedule) and option_choices("select") == choices(Select)
    assert option_choices("precision") == choices(Precision) and option_choices("backend") == choices(Backend)
    r = CliRunner().invoke(cli.app, ["fit", "x.safetensors", "--val", "v", "-o", "m.safetensors",
                                     "--optimizer", "adam"])
    assert r.exit_code == 2 and "adamw" in r.output and "sgd" in r.output


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_accepts_a_cuda_index(device):
    assert FitConfig(device=device).device == EvalConfig(device=device).device == device


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", "cuda:1:2", "CPU"])
def test_an_unknown_device_is_refused(device):
    for cls in (FitConfig, EvalConfig):
        with pytest.raises(ValueError, match=f"device={device!r} is invalid; expected auto, cpu, cuda or cuda:N"):
            cls(device=device)


def test_backend_names_every_backend():
    assert FitConfig(backend="native").backend == "native"
    with pytest.raises(ValueError, match="backend='cuda' is invalid; expected auto, triton, native or torch"):
        FitConfig(backend="cuda")


def test_command_defaults_that_are_not_the_fit_s():
    """eval scores with larger batches than a fit step; inspect estimates memory at the fit's group size."""
    assert EvalConfig().batch_size == 64 and EvalConfig().device == FitConfig().device
    assert InspectConfig().group_size == FitConfig().group_size and InspectConfig().similarity
    with pytest.raises(ValueError, match="batch_size=0"):
        EvalConfig(batch_size=0)


def test_average_settings_follow_the_merge_s_rule():
    """AverageConfig checks with methods.data_free_weights, the rule average_checkpoints applies."""
    assert AverageConfig() == AverageConfig(weights=None, ema=None, normalize=True)
    assert AverageConfig(weights=(1.0, 2.0)).weights == (1.0, 2.0) and AverageConfig(ema=0.9).ema == 0.9
    with pytest.raises(InvalidArgumentError, match="give either weights or an EMA decay, not both"):
        AverageConfig(weights=(1.0, 1.0), ema=0.5)
    with pytest.raises(InvalidArgumentError, match="sum to 0"):
        AverageConfig(weights=(1.0, -1.0))
    assert AverageConfig(weights=(1.0, -1.0), normalize=False).weights == (1.0, -1.0)


def test_output_and_read_configs():
    out = OutputConfig.of("m.safetensors")
    assert out.path.name == "m.safetensors" and not out.force and out.report is None
    assert OutputConfig.of(out) is out
    assert OutputConfig("m.pt", report="r.json").report.name == "r.json"
    with pytest.raises(ValueError, match="max_shard_size"):
        OutputConfig("m.safetensors", max_shard_size=0)
    with pytest.raises(ValueError, match="keys='some'"):
        ReadConfig(keys="some")
