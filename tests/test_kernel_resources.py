"""Every Triton kernel compiles for sm_90 (the H100) at the launch configurations the ops choose for the
training shapes (32^2 and 64^2, 3 channels, float32 and bfloat16, batch 512 and a small batch 8 whose
reductions are chunked), and fits the H100's shared memory per
block: compile only (bench/kernel_resources.py), no GPU. The interpreter tests check the kernels' math;
this checks what the interpreter cannot (dot shapes and precisions, shared memory, registers)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent


def test_every_kernel_compiles_and_fits_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "bench/kernel_resources.py", "--arch", "90", "--sizes", "32", "64",
                           "--channels", "3", "--json", str(out), "--md", str(tmp_path / "kernels.md")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    rows = json.loads(out.read_text())["kernels"]
    bad = [(r["kernel"], r["ops"], r["meta"], r.get("error") or f"{r['shared']} B shared") for r in rows
           if not r["fits"]]
    assert not bad, f"kernels that do not compile or fit sm_90: {bad}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Every launchable kernel in kernels/ was reached: a new kernel cannot dodge this check.
    defined = {m for f in (ROOT / "kernels").glob("*.py")
               for m in re.findall(r"^def (\w+_kernel)\(", f.read_text(), flags=re.M)}
    assert defined and defined == {r["kernel"] for r in rows}
    compiled_dtypes = {d for r in rows for d in r["dtypes"]}
    assert {"*fp32", "*bf16"} <= compiled_dtypes
