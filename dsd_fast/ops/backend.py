"""Backend choice for the fused ops: cuda_ext -> triton -> reference.

DSD_FAST_BACKEND=auto (default) picks the first eligible backend for the inputs; naming one
(cuda_ext, triton, reference) forces it, and a forced backend that cannot run raises instead of
falling back. Triton is eligible for CUDA tensors, and for CPU tensors only under TRITON_INTERPRET=1
(the interpreter is a correctness tool, far too slow for real work).
"""

import importlib
import os

import torch

BACKENDS = ("cuda_ext", "triton", "reference")


def requested():
    name = os.environ.get("DSD_FAST_BACKEND", "auto").strip().lower()
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"DSD_FAST_BACKEND: expected one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


# Module-level caches, not functools.cache: torch.compile traces through a cache wrapper into importlib, which it
# cannot trace (a graph break in every op). Filled on first use, and at import where a GPU is present, so a step
# compiled from its first call never imports.
_IMPORTED = {}


def _optional(name):
    if name not in _IMPORTED:
        try:
            _IMPORTED[name] = importlib.import_module(name)
        except ImportError:
            _IMPORTED[name] = None
    return _IMPORTED[name]


def _has_triton():
    return _optional("triton") is not None


def cuda_ext():
    """The compiled extension module dsd_fast._C, or None when it was not built."""
    return _optional("dsd_fast._C")


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(backend, op, device):
    """None if `backend` can run `op` on `device`, else the reason (for errors and fallbacks)."""
    if backend == "reference":
        return None
    if backend == "triton":
        if device.type != "cuda" and not _interpreting():
            return f"triton needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
        if not _has_triton():
            return "triton is not installed"
        return None
    if backend == "cuda_ext":
        if device.type != "cuda":  # first: a CPU tensor never imports the extension (see _IMPORTED)
            return f"the CUDA extension needs CUDA tensors, got device {device}"
        ext = cuda_ext()
        if ext is None:
            return "the CUDA extension dsd_fast._C was not built"
        if not hasattr(ext, op):
            return f"the CUDA extension has no kernel for {op}"
        return None
    raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")


def choose(op, device, supported=BACKENDS):
    """The backend to run `op` on `device`. `supported` lists the backends that implement `op`."""
    name = requested()
    if name != "auto":
        reason = why_not(name, op, device) if name in supported else f"no {name} implementation of {op}"
        if reason is not None:
            raise RuntimeError(f"DSD_FAST_BACKEND={name} cannot run {op}: {reason}")
        return name
    for backend in supported:
        if backend == "triton" and device.type != "cuda":
            continue  # auto never picks the interpreter
        if why_not(backend, op, device) is None:
            return backend
    return "reference"


if torch.cuda.is_available():  # see _IMPORTED
    _has_triton(), cuda_ext()
