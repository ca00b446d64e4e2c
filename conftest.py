"""Shared by tests/ and bench/. On a machine without CUDA, Triton kernels run in its interpreter:
TRITON_INTERPRET must be set before triton is first imported (kernels read it when they are decorated),
hence here, at collection."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
