"""Backend choice for the fused ops: cuda_ext -> triton -> reference.

DSD_FAST_BACKEND=auto (default) picks the first eligible backend for the inputs; naming one
(cuda_ext, triton, reference) forces it, and a forced backend that cannot run raises instead of
falling back. Triton is eligible for CUDA tensors, and for CPU tensors only under TRITON_INTERPRET=1
(the interpreter is a correctness tool, far too slow for real work).
"""

import functools
import importlib
import os

BACKENDS = ("cuda_ext", "triton", "reference")


def requested():
    name = os.environ.get("DSD_FAST_BACKEND", "auto").strip().lower()
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"DSD_FAST_BACKEND: expected one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


@functools.cache
def _has_triton():
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@functools.cache
def cuda_ext():
    """The compiled extension module dsd_fast._C, or None when it was not built."""
    try:
        return importlib.import_module("dsd_fast._C")
    except ImportError:
        return None


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(backend, op, device):
    """None if `backend` can run `op` on `device`, else the reason (for errors and fallbacks)."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not _has_triton():
            return "triton is not installed"
        if device.type != "cuda" and not _interpreting():
            return f"triton needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
        return None
    if backend == "cuda_ext":
        ext = cuda_ext()
        if ext is None:
            return "the CUDA extension dsd_fast._C was not built"
        if not hasattr(ext, op):
            return f"the CUDA extension has no kernel for {op}"
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors, got device {device}"
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
