"""Build script: pure-Python package plus an optional CUDA extension (dsd_fast._C) from csrc/.

DSD_FAST_BUILD_CUDA=1 forces the extension (an error if it cannot be built), =0 skips it; unset,
it is built only when torch with CUDA is importable at build time and nvcc is found.
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
PACKAGES = ["dsd_fast"] + [f"dsd_fast.{p.name}" for p in sorted((ROOT / "dsd_fast").iterdir())
                           if (p / "__init__.py").exists()] + ["dsd_fast.kernels"]


def _warn(msg):
    print(f"dsd-fast: {msg}", file=sys.stderr)


def _optional(build_ext, force):
    """Unless forced, a failed CUDA build warns and leaves the pure-Python package installable."""
    if force:
        return build_ext

    class OptionalBuild(build_ext):
        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any compiler/toolkit failure
                _warn(f"the optional CUDA extension failed to build ({e}); continuing without it")

    return OptionalBuild


def cuda_extensions():
    mode = os.environ.get("DSD_FAST_BUILD_CUDA", "auto").lower()
    if mode in ("0", "false", "no", "off"):
        return [], {}
    force = mode in ("1", "true", "yes", "on")
    # Translation units only: "*.c[pu]*" also matched the header philox.cuh, which nvcc refuses as a source.
    sources = sorted(str(p.relative_to(ROOT)) for pattern in ("*.cu", "*.cpp") for p in (ROOT / "csrc").glob(pattern))
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable at build time (use pip install --no-build-isolation)"
    else:
        if not sources:
            reason = "no sources in csrc/"
        elif torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None:
            reason = "no CUDA toolkit found (set CUDA_HOME)"
        else:
            ext = CUDAExtension(
                "dsd_fast._C", sources,
                # No --use_fast_math: Box-Muller must use accurate logf/cosf to match tl.randn to 1e-6.
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            )
            return [ext], {"build_ext": _optional(BuildExtension, force).with_options(use_ninja=True)}
    if force:
        raise RuntimeError(f"DSD_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    _warn(f"skipping the optional CUDA extension: {reason}")
    return [], {}


ext_modules, cmdclass = cuda_extensions()
setup(
    packages=PACKAGES,
    package_dir={"dsd_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
