"""The optional CUDA build: skipped with a one-line warning unless forced, forced fails loudly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _setup(mode):
    env = {**os.environ, "DSD_FAST_BUILD_CUDA": mode}
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                          text=True)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only build path")
def test_cuda_extension_skipped_with_warning_on_cpu_torch():
    out = _setup("auto")
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("dsd-fast:")]
    assert warnings == [f"dsd-fast: skipping the optional CUDA extension: torch {torch.__version__} is a CPU build"]
    assert out.stdout.strip() == "dsd-fast"


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only build path")
def test_forced_cuda_build_fails_loudly():
    out = _setup("1")
    assert out.returncode != 0
    assert "DSD_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built" in out.stderr


def test_skipped_cuda_build_is_silent():
    out = _setup("0")
    assert out.returncode == 0, out.stderr
    assert "dsd-fast:" not in out.stderr


def test_kernels_subpackage_installs_as_dsd_fast_kernels():
    pytest.importorskip("triton")
    from dsd_fast.kernels import dct, losses, noise

    assert all(m.__name__.startswith("dsd_fast.kernels.") for m in (dct, losses, noise))
