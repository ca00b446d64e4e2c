"""Argument checks shared by every module: one argument order (name, value, bounds), one wording of the error.

Each returns the checked value in its canonical type, or raises ValueError naming the argument, the expected
value and what it got. Tensor-shaped arguments of the ops are checked where they are used (functional.py,
corruption.py); these are the scalar ones.
"""

import math
import numbers
import operator
import os

import torch


def number(name, value, low=0.0, *, strict=False):
    """A finite real >= low (> low when strict), from a Python number or a one-element tensor, as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    op = ">" if strict else ">="
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number {op} {low}, got {value!r}")
    if not (value > low if strict else value >= low):
        raise ValueError(f"{name}: expected {op} {low}, got {value!r}")
    return float(value)


def integer(name, value, low=0, high=None):
    """An int (anything with __index__ but bool) in [low, high] (high None: no upper bound), as an int."""
    try:
        v = operator.index(value)
    except TypeError:
        v = None
    if v is None or isinstance(value, bool) or v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an int {bound}, got {value!r}")
    return v


def choice(name, value, choices):
    """One of choices (a tuple), as it is."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def device(name, value):
    """A torch device that exists here (CUDA only where it is available), as a torch.device."""
    try:
        dev = torch.device(value)
    except RuntimeError as e:
        raise ValueError(f"{name}: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {value!r} requested but CUDA is not available here")
    return dev


def reads_values(t):
    """Whether checks that read tensor t's values (finite, > sigma, ...) run: on the CPU, where they are free; on
    a device only with DSD_FAST_CHECKS=1 (each is a device-to-host sync, so a training step stays free of them);
    never while torch.compile traces (a data-dependent branch would break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("DSD_FAST_CHECKS") == "1"
