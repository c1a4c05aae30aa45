"""twamerge/precision.py: which autocast dtype ``--precision`` resolves to on each device, the errors for
a dtype the device cannot run, and the autocast context. No GPU is needed: a CUDA device object is
only compared by type, and ``torch.cuda.is_bf16_supported`` is replaced to play either kind of GPU.
The end-to-end bf16 fit is in tests/test_text.py and tests/test_pipeline.py."""

from __future__ import annotations

import logging
import typing

import pytest
import torch

from twamerge import config
from twamerge.errors import TwamergeError
from twamerge.precision import autocast, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
STORED = [torch.float32, torch.bfloat16, torch.float16, None]  # None: no merged tensor to read a dtype from


@pytest.fixture
def bf16_gpu(monkeypatch):
    """A GPU that runs bfloat16 (any Ampere or later)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.fixture
def old_gpu(monkeypatch):
    """A GPU without bfloat16 (a V100, a T4)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)


@pytest.mark.parametrize("stored", STORED, ids=str)
@pytest.mark.parametrize("device", [CPU, CUDA], ids=str)
def test_fp32_is_no_autocast_anywhere(device, stored, old_gpu):
    assert resolve_precision("fp32", device, stored) is None


@pytest.mark.parametrize("stored", STORED, ids=str)
def test_auto_on_a_cpu_is_float32_whatever_the_candidates(stored):
    assert resolve_precision("auto", CPU, stored) is None


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16], ids=str)
def test_auto_on_a_bf16_gpu_is_bf16_for_16_bit_candidates(stored, bf16_gpu, caplog):
    with caplog.at_level(logging.INFO, logger="twamerge.precision"):
        assert resolve_precision("auto", CUDA, stored) == torch.bfloat16
    # The log says why autocast is on, naming the stored dtype.
    name = str(stored).removeprefix("torch.")
    assert any("bf16 autocast" in r.getMessage() and name in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("stored", [torch.float32, None], ids=str)
def test_auto_on_a_gpu_keeps_float32_candidates_in_float32(stored, bf16_gpu):
    assert resolve_precision("auto", CUDA, stored) is None


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16], ids=str)
def test_auto_on_a_gpu_without_bf16_is_float32(stored, old_gpu):
    assert resolve_precision("auto", CUDA, stored) is None


def test_explicit_choices_on_a_capable_device(bf16_gpu):
    assert resolve_precision("bf16", CPU, torch.float32) == torch.bfloat16
    assert resolve_precision("bf16", CUDA, torch.float32) == torch.bfloat16
    assert resolve_precision("fp16", CUDA, torch.float32) == torch.float16
    assert resolve_precision("fp16", CUDA, None) == torch.float16


def test_fp16_on_a_cpu_is_refused_in_one_line_naming_the_option():
    with pytest.raises(TwamergeError, match=r"--precision fp16: float16 autocast needs a GPU; use bf16 or fp32") as err:
        resolve_precision("fp16", CPU, torch.float16)
    assert "\n" not in str(err.value)


def test_bf16_on_a_gpu_without_it_is_refused_in_one_line(old_gpu):
    with pytest.raises(TwamergeError, match=r"--precision bf16: this GPU does not support bfloat16; use fp16 or fp32"):
        resolve_precision("bf16", CUDA, torch.bfloat16)
    # fp16 still runs there.
    assert resolve_precision("fp16", CUDA, torch.bfloat16) == torch.float16


@pytest.mark.parametrize("device", [CPU, CUDA], ids=str)
@pytest.mark.parametrize("supported", [True, False], ids=["bf16-gpu", "old-gpu"])
def test_every_config_choice_resolves_or_raises_a_twamerge_error(device, supported, monkeypatch):
    """The CLI's choices come from ``config.Precision``: each one must be handled here (a dtype, None or
    a one-line TwamergeError), never fall through to a KeyError."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    choices = typing.get_args(config.Precision)
    assert set(choices) == {"auto", "fp32", "bf16", "fp16"}
    for name in choices:
        for stored in STORED:
            try:
                got = resolve_precision(name, device, stored)
            except TwamergeError:
                continue
            assert got in (None, torch.bfloat16, torch.float16), (name, device, stored, got)


def test_autocast_none_is_a_plain_float32_forward():
    layer = torch.nn.Linear(4, 3)
    with autocast(CPU, None):
        assert not torch.is_autocast_enabled("cpu")
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_autocast_bf16_runs_the_forward_and_backward_in_bf16_and_leaves_the_weights_float32():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast(CPU, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")  # the context ends with the block
    y.float().sum().backward()
    assert layer.weight.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
