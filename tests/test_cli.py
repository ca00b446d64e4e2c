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


def test_dataset_command_converts_and_corrupts(tmp_path):
    import numpy as np
    import torch

    from dsd_fast.corruption import NoiseCorruption
    from dsd_fast.data import load_images, to_float, to_uint8

    images = np.random.randint(0, 256, size=(5, 12, 10, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    r = CliRunner().invoke(main, ["dataset", "--source", str(tmp_path / "x.npy"), "--dest", str(tmp_path / "c.zip"),
                                  "--resolution", "8"])
    assert r.exit_code == 0, r.output
    assert load_images(tmp_path / "c.zip").shape == (5, 3, 8, 8)
    r = CliRunner().invoke(main, ["dataset", "--source", str(tmp_path / "c.zip"), "--dest", str(tmp_path / "n.zip"),
                                  "--corrupt", "--sigma", "0.3", "--seed", "4"])
    assert r.exit_code == 0, r.output
    clean = load_images(tmp_path / "c.zip")
    y = NoiseCorruption(0.3).corrupt(to_float(clean), 4, torch.arange(5))
    assert torch.equal(load_images(tmp_path / "n.zip"), to_uint8(y))


def test_dataset_command_bad_input(tmp_path):
    r = CliRunner().invoke(main, ["dataset", "--source", str(tmp_path / "missing"), "--dest", str(tmp_path / "o.zip")])
    assert r.exit_code != 0 and "missing" in r.output
    assert not (tmp_path / "o.zip").exists()
