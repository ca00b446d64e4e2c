"""tools/average_snapshots.py: the averaged G_ema is the mean of the snapshots' (closed form on perturbed copies),
the output is a snapshot `dsd-fast generate` reads (the average of identical copies generates the same images),
and bad input is a clear error that writes nothing."""

import glob
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from runs import make_run

from dsd_fast.cli import main
from dsd_fast.rundir import load_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "average_snapshots.py"
_spec = importlib.util.spec_from_file_location("average_snapshots", SCRIPT)
avg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(avg)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("avg") / "run")
    return glob.glob(os.path.join(run, "distill-*.pt"))[0], glob.glob(os.path.join(run, "pretrain-*.pt"))[0]


def _perturbed(state, scale):
    g = {k: v + scale * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["G_ema"].items()}
    return {**state, "G_ema": g}


def _save(state, path):
    torch.save(state, path)
    return str(path)


def test_mean_of_perturbed_copies(snapshot):
    base = load_checkpoint(snapshot[0])
    states = [_perturbed(base, s) for s in (0.1, 0.3, 1.0)]
    out = avg.average(states, ["a", "b", "c"])
    for k, v in base["G_ema"].items():
        want = sum(s["G_ema"][k].double() for s in states) / 3
        assert out["G_ema"][k].dtype == v.dtype
        torch.testing.assert_close(out["G_ema"][k].double(), want, rtol=1e-6, atol=1e-7)
    assert [a["name"] for a in out["averaged"]] == ["a", "b", "c"]
    assert out["step"] == base["step"] and out["options"] == base["options"]


def test_cli_output_generates_like_the_snapshot(snapshot, tmp_path):
    out = tmp_path / "avg.pt"
    avg.main([str(out), snapshot[0], snapshot[0]])
    assert load_checkpoint(out)["G_ema"].keys() == load_checkpoint(snapshot[0])["G_ema"].keys()
    images = []
    for ckpt in (snapshot[0], out):
        npz = tmp_path / f"{Path(ckpt).stem}.npz"
        r = CliRunner().invoke(main, ["generate", "--ckpt", str(ckpt), "--seeds", "0-3", "--out", str(npz),
                                      "--device", "cpu"])
        assert r.exit_code == 0, r.output
        with np.load(npz) as f:
            images.append(f["images"])
    np.testing.assert_array_equal(images[0], images[1])


def test_bad_input_is_a_clear_error_and_writes_nothing(snapshot, tmp_path):
    base = load_checkpoint(snapshot[0])
    other = {**base, "net_config": {**base["net_config"], "model_channels": base["net_config"]["model_channels"] + 1}}
    cases = [([snapshot[0]], "at least 2"),
             ([snapshot[0], snapshot[1]], "not a Phase II network snapshot"),
             ([snapshot[0], _save(other, tmp_path / "other.pt")], "net_config"),
             ([snapshot[0], str(tmp_path / "missing.pt")], "cannot read")]
    for paths, match in cases:
        out = tmp_path / "out.pt"
        with pytest.raises(SystemExit, match=match):
            avg.main([str(out), *paths])
        assert not out.exists() and not os.path.exists(f"{out}.tmp")
    shrunk = {**base, "G_ema": dict(list(base["G_ema"].items())[1:])}
    with pytest.raises(ValueError, match="other G_ema tensors"):
        avg.average([base, shrunk])
