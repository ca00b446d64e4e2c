"""Shared by tests/ and bench/. On a machine without CUDA, Triton kernels run in its interpreter:
TRITON_INTERPRET must be set before triton is first imported (kernels read it when they are decorated),
hence here, at collection."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.gpu tests need CUDA: skipped (with the reason) on CPU-only machines such as CI."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_torch_seed():
    """Fresh random inputs in every test; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
