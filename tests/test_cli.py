import subprocess
import sys

from click.testing import CliRunner

import dsd_fast
from dsd_fast.cli import main


def test_version_and_help():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and dsd_fast.__version__ in r.output
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "Denoising Score Distillation" in r.output


def test_info_lists_backends():
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 0, r.output
    for name in ("cuda_ext", "triton", "reference"):
        assert name in r.output


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "dsd_fast", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and dsd_fast.__version__ in out.stdout
