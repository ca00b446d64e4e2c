import pytest
import torch

from dsd_fast.ops import backend


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("DSD_FAST_BACKEND", raising=False)
    assert backend.choose("ambient_loss", torch.device("cpu")) == "reference"


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("DSD_FAST_BACKEND", "cuda_ext")
    with pytest.raises(RuntimeError, match="DSD_FAST_BACKEND=cuda_ext cannot run ambient_loss"):
        backend.choose("ambient_loss", torch.device("cpu"))
    monkeypatch.setenv("DSD_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="no triton implementation"):
        backend.choose("ambient_loss", torch.device("cpu"), supported=("reference",))


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("DSD_FAST_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="DSD_FAST_BACKEND: expected one of"):
        backend.choose("ambient_loss", torch.device("cpu"))


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("DSD_FAST_BACKEND", "reference")
    assert backend.choose("ambient_loss", torch.device("cpu")) == "reference"
