"""csrc/ compiles for sm_90 wherever nvcc is, GPU or not (issue 14): CI has no GPU, so without this test a
C++/CUDA error in the optional extension would only show on a GPU machine.

The build is setup.py's own: its CUDAExtension (sources, flags) and build_ext class (torch's BuildExtension, with
ninja) are taken from setup.py in a child process, and every translation unit is compiled to an object file,
stopping before the link (a CPU torch wheel has no CUDA libraries to link against). Nothing runs.
What a CPU wheel and a pip-installed toolkit lack is supplied: torch.version.cuda and CUDA_HOME (setup.py and
BuildExtension refuse a CPU torch), TORCH_CUDA_ARCH_LIST=9.0 (no GPU to ask), the CUDA torch build's generated
c10/cuda/impl/cuda_cmake_macros.h (a define that matters only on Windows), and the cuBLAS/cuSPARSE/cuSOLVER headers
that ATen/cuda/CUDAContext.h includes, from NVIDIA's pip wheels (PIP_HEADERS). Then the objects' symbols are
checked: each dsd_fast:: function that one object calls must be defined in another (a declaration in
bindings.cpp that drifted from noise.cu would link, and fail only at import on a GPU machine).

No nvcc: skipped. nvcc but a missing header or a compile error: fails, with the compiler's error lines.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
ARCH = "9.0"  # TORCH_CUDA_ARCH_LIST: -gencode=arch=compute_90,code=sm_90 (H100/H200)

# The headers ATen/cuda/CUDAContextLight.h includes beyond the CUDA runtime's, and the pip wheels (no deps: only
# their include/ is used) that carry them for CUDA 13, the versions of the CUDA 13.0 release.
PIP_HEADERS = {
    "cublas_v2.h": "nvidia-cublas==13.0.0.19",
    "cublasLt.h": "nvidia-cublas==13.0.0.19",
    "cusparse.h": "nvidia-cusparse==12.6.2.49",
    "cusolverDn.h": "nvidia-cusolver==12.0.3.29",
}
PIP_INSTALL = "pip install --no-deps " + " ".join(sorted(set(PIP_HEADERS.values())))

# Run in a child process (it patches torch and setuptools): argv = repo root, build dir, JSON config.
CHILD = r"""
import json, os, runpy, sys
root, build, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
os.chdir(root)  # setup.py's sources are relative to its folder
os.environ["DSD_FAST_BUILD_CUDA"] = "1"  # forced: a CUDA extension that cannot be set up raises, unskipped
os.environ["TORCH_CUDA_ARCH_LIST"] = cfg["arch"]
import setuptools
import torch
from torch.utils import cpp_extension
torch.version.cuda = cfg["cuda_version"]
cpp_extension.CUDA_HOME = cfg["cuda_home"]
kw = {}
setuptools.setup = lambda **k: kw.update(k)
runpy.run_path(os.path.join(root, "setup.py"), run_name="setup")
(ext,) = kw["ext_modules"]
ext.include_dirs = ext.include_dirs + cfg["include_dirs"]


class CompileOnly(kw["cmdclass"]["build_ext"]):
    def build_extension(self, ext):  # setuptools' build_extension, up to (not including) the link
        macros = ext.define_macros + [(u,) for u in ext.undef_macros]
        self.compiler.compile(sorted(ext.sources), output_dir=self.build_temp, macros=macros,
                              include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=ext.extra_compile_args,
                              depends=ext.depends)


dist = setuptools.Distribution({"name": "dsd-fast-csrc", "ext_modules": [ext], "cmdclass": {"build_ext": CompileOnly}})
cmd = dist.get_command_obj("build_ext")
cmd.build_temp, cmd.build_lib = build, os.path.join(build, "lib")
dist.run_command("build_ext")
print("compiled:", json.dumps(sorted(ext.sources)))
"""


def _nvcc():
    """(nvcc, CUDA home, 'major.minor'), or None without nvcc: $CUDA_HOME/bin/nvcc as torch would, else PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    version = re.search(r"release (\d+\.\d+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                              text=True).stdout)
    assert version, f"{nvcc} --version: no 'release X.Y'"
    if not home:  # PATH may hold a wrapper (/usr/local/bin/nvcc here): ask nvcc where its toolkit is
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True)
        top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.M)
        assert top, f"{nvcc} --dryrun: no TOP=, cannot tell the CUDA home"
        home = os.path.realpath(top.group(1).strip())  # "<home>/bin/.."
    return nvcc, home, version.group(1)


def _header_dirs(cuda_home, major):
    """Include dirs that hold PIP_HEADERS (the toolkit's own, else NVIDIA's wheels), and the headers not found."""
    toolkit = [Path(cuda_home, "include"), Path(cuda_home, "targets", "x86_64-linux", "include")]
    wheels = []
    for site in map(Path, sys.path):
        wheels += [site / "nvidia" / f"cu{major}" / "include", *sorted(site.glob("nvidia/*/include"))]
    found, missing = [], []
    for header in PIP_HEADERS:
        where = next((d for d in toolkit + wheels if (d / header).is_file()), None)
        if where is None:
            missing.append(header)
        elif where not in toolkit and str(where) not in found:
            found.append(str(where))
    return found, missing


def _shim_dirs(build):
    """A CPU torch wheel lacks the CUDA build's generated c10/cuda/impl/cuda_cmake_macros.h: write its content."""
    if Path(cpp_extension.include_paths()[0], "c10", "cuda", "impl", "cuda_cmake_macros.h").is_file():
        return []
    shim = Path(build, "shim")
    (shim / "c10" / "cuda" / "impl").mkdir(parents=True, exist_ok=True)
    (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
        "#pragma once\n// As generated for a shared-library CUDA build of torch (used by C10_CUDA_API on Windows).\n"
        "#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [str(shim)]


def compile_csrc(root, build):
    """Compile root/setup.py's CUDA extension to objects under build (no link): (returncode, log)."""
    found = _nvcc()
    if found is None:
        pytest.skip("nvcc not found (no $CUDA_HOME/bin/nvcc or nvcc on PATH): csrc/ compile check needs a toolkit")
    _, cuda_home, version = found
    include_dirs, missing = _header_dirs(cuda_home, version.split(".")[0])
    if missing:
        pytest.fail(f"CUDA {version} at {cuda_home} lacks {', '.join(missing)} (included by ATen/cuda/CUDAContext.h); "
                    f"for CUDA 13 install them with: {PIP_INSTALL}", pytrace=False)
    cfg = {"arch": ARCH, "cuda_version": version, "cuda_home": cuda_home,
           "include_dirs": include_dirs + _shim_dirs(build)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(build), json.dumps(cfg)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc.returncode, proc.stdout


# A compiler's error line: nvcc's "file(12): error: ...", gcc's "file:12:3: error: ..." (or "fatal error").
ERROR = re.compile(r"^(?P<file>\S.*?)(?:\(\d+\)|:\d+(?::\d+)?): (?:fatal )?error\b")


def failure_report(log, per_file=6, width=200):
    """The compiler's first errors in each file, each with the source line and caret after it (macro expansions
    clipped to width), and nvcc's error count; without any, the log's last lines (ninja, nvcc fatal, traceback)."""
    clip = lambda line: line if len(line) <= width else line[:width] + " ..."
    lines = log.splitlines()
    out, shown, hidden, seen = [], Counter(), Counter(), set()
    for i, line in enumerate(lines):
        m = ERROR.match(line)
        if m is None:
            if re.search(r"errors? detected in the compilation of|^nvcc fatal", line):
                out.append(clip(line))
            continue
        if shown[m["file"]] == per_file or line in seen:  # a dispatch macro repeats its errors per dtype
            hidden[m["file"]] += 1
            continue
        shown[m["file"]] += 1
        seen.add(line)
        out.append(clip(line))
        for nxt in lines[i + 1:i + 3]:  # the source line and its caret, as both compilers print them
            if not nxt.strip() or ERROR.match(nxt):
                break
            if len(nxt) <= width or set(nxt.strip()) - set("^~|0123456789 "):
                out.append(clip(nxt))
    out += [f"... and {n} more errors in {f}" for f, n in hidden.items()]
    return "\n".join(out or map(clip, lines[-40:]))


def _symbols(obj, *flags):
    """Demangled symbol names of an object file ("[address] TYPE name" lines of nm)."""
    out = subprocess.run(["nm", "-C", *flags, str(obj)], capture_output=True, text=True, check=True).stdout
    return {m.group(1) for m in re.finditer(r"^\s*(?:[0-9a-fA-F]+\s+)?\S\s+(.+)$", out, re.M)}


def test_csrc_compiles_for_sm90(tmp_path):
    rc, log = compile_csrc(ROOT, tmp_path)
    if rc != 0:
        pytest.fail(f"csrc/ does not compile (nvcc/g++ for sm_{ARCH.replace('.', '')}, as setup.py would build "
                    f"it):\n{failure_report(log)}", pytrace=False)
    sources = json.loads(log.rsplit("compiled: ", 1)[1].splitlines()[0])
    objects = sorted(tmp_path.rglob("*.o"))
    assert sorted(o.name.split(".")[0] for o in objects) == sorted(Path(s).stem for s in sources), (sources, objects)
    if shutil.which("nm") is None:
        return
    defined = set().union(*(_symbols(o, "--defined-only") for o in objects))
    called = set().union(*(_symbols(o, "--undefined-only") for o in objects))
    undefined = sorted(s for s in called - defined if s.startswith("dsd_fast::"))
    if undefined:
        ours = sorted(s for s in defined if s.startswith("dsd_fast::") and "(anonymous namespace)" not in s)
        pytest.fail("csrc/ calls dsd_fast:: functions that no csrc/ object defines (a declaration that drifted "
                    "from its definition links, then fails at import):\n  " + "\n  ".join(undefined)
                    + "\ndefined:\n  " + "\n  ".join(ours), pytrace=False)


def test_compile_errors_fail_with_the_compiler_message(tmp_path):
    """The check itself: a broken source in a copy of the layout fails, and the report names file and error."""
    root = tmp_path / "root"
    (root / "csrc").mkdir(parents=True)
    (root / "dsd_fast").mkdir()
    shutil.copy(ROOT / "setup.py", root / "setup.py")
    (root / "csrc" / "broken.cu").write_text("__global__ void k(float* x) { x[0] = not_declared_here; }\n")
    rc, log = compile_csrc(root, tmp_path / "build")
    assert rc != 0, log
    report = failure_report(log)
    assert "broken.cu" in report and "not_declared_here" in report and "error" in report, report
