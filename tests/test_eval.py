"""`dsd-fast eval RUN_DIR` on tiny trained runs (noise, blur + noise, already-noisy data): eval.md, eval.json and a
grid per row, every number checked against a direct computation; bad input. A cheap deterministic feature network
replaces the FID InceptionV3 (tests/test_fid_cli.py covers the real one)."""

import glob
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import dsd_fast.evaluation.features as features_module
from dsd_fast.cli import main
from dsd_fast.data import to_float, to_uint8
from dsd_fast.evaluation import fid_from_features, proximal_corrupt, save_reference
from dsd_fast.evaluation.table import NO_CLEAN
from dsd_fast.generation import load_sampler
from dsd_fast.metrics import feature_stats
from dsd_fast.rundir import to_uint8_grid
from dsd_fast.training import Options

N_DATA, NUM = 12, 3
# --num, --grid-images and --batch equal: a row's FID images are one batch, the batch of its grid too. On the CPU
# convolutions round differently at other batch sizes, and the teacher samplers (starting at sigma_max = 80) can turn
# that into 1-level differences in a few uint8 pixels.
EVAL_ARGS = ["--num", NUM, "--steps", 2, "--grid-images", NUM, "--batch", NUM]


def cheap_features(images):
    """Deterministic 18-d features: 2x2 block means and mean vertical/horizontal differences per channel."""
    x = images.float().expand(-1, 3, -1, -1) / 255
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((2, 3))
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean((2, 3))
    return torch.cat([torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1), dy, dx], 1)


@pytest.fixture(autouse=True)
def cheap(monkeypatch):
    monkeypatch.setattr(features_module, "feature_network", lambda *args, **kwargs: cheap_features)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from runs import smooth_images

    path = tmp_path_factory.mktemp("evaldata") / "data.npz"
    np.savez(path, x=smooth_images(N_DATA).numpy())
    return str(path)


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory, data):
    from runs import make_run

    return make_run(tmp_path_factory.mktemp("eval") / "noise", dataset=data)


@pytest.fixture(scope="module")
def blur_run(tmp_path_factory, data):
    from runs import make_run

    return make_run(tmp_path_factory.mktemp("eval") / "blur", corruption="blur", dataset=data)


def copy_run(src, dst, ckpt="last.pt", **changes):
    """options.json (with changes) and a checkpoint of src as a new run directory dst."""
    os.makedirs(dst)
    options = {**json.load(open(os.path.join(src, "options.json"))), **changes}
    json.dump(options, open(os.path.join(dst, "options.json"), "w"))
    shutil.copy(glob.glob(os.path.join(src, ckpt))[0], os.path.join(dst, "last.pt"))
    return str(dst)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_eval(run_dir, *flags):
    r = invoke("eval", run_dir, *EVAL_ARGS, *flags)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output, json.load(open(os.path.join(run_dir, "eval.json"))), open(os.path.join(run_dir, "eval.md")).read()


def expected_samples(run_dir, keys_samplers):
    """(row key -> its images, observation model, clean data), computed directly: the observations corrupted image
    by image as the run does, each sampler's seeds 0..NUM-1."""
    o = Options.from_dict(json.load(open(os.path.join(run_dir, "options.json"))))
    x = torch.from_numpy(np.load(o.dataset)["x"])
    corruption = o.make_corruption()
    y = x if o.noisy_data else torch.cat([to_uint8(corruption.corrupt(to_float(x[i:i + 1]), o.seed, torch.tensor([i])))
                                          for i in range(x.shape[0])])
    samples = {"observation": y}
    for key, kind in keys_samplers:
        samples[key] = load_sampler(run_dir, kind, steps=2).images(range(NUM))
    return samples, corruption, x


def expected_numbers(samples, corruption, clean, corrupted):
    """row key -> (FID against clean stats or None, Proximal FID against corrupted stats)."""
    out = {}
    for key, images in samples.items():
        proximal = proximal_corrupt(images, corruption, range(images.shape[0]))  # keyed by image index / seed
        out[key] = (fid_from_features(cheap_features(images), clean) if clean is not None else None,
                    fid_from_features(cheap_features(proximal), corrupted))
    return out


def check_table(run_dir, result, md, expected, samples):
    assert [row["key"] for row in result["rows"]] == list(expected)
    for row in result["rows"]:
        fid, proximal = expected[row["key"]]
        assert row["proximal_fid"] == pytest.approx(proximal, rel=1e-9), row
        assert (row["fid"] is None) if fid is None else row["fid"] == pytest.approx(fid, rel=1e-9), row
        assert row["num_images"] == (N_DATA if row["key"] == "observation" else NUM)
        line = next(line for line in md.splitlines() if line.startswith(f"| {row['name']} |"))
        assert (NO_CLEAN if fid is None else f"{fid:.2f}") in line and f"{proximal:.2f}" in line
        grid = np.asarray(Image.open(os.path.join(run_dir, row["grid"])))
        np.testing.assert_array_equal(grid, to_uint8_grid(to_float(samples[row["key"]][:NUM])))


NOISE_ROWS = [("ambient-full", "ambient-full"), ("ambient-truncated", "ambient-truncated"), ("dsd", "one-step")]


def test_eval_noise_run(noise_run):
    out, result, md = run_eval(noise_run)
    samples, corruption, x = expected_samples(noise_run, NOISE_ROWS)
    expected = expected_numbers(samples, corruption, feature_stats(cheap_features(x)),
                                feature_stats(cheap_features(samples["observation"])))
    check_table(noise_run, result, md, expected, samples)
    assert [row["name"] for row in result["rows"]] == ["Observation", "Ambient-Full", "Ambient-Truncated",
                                                        "DSD (one-step)"]
    assert result["references"]["clean"] == {"source": "data", "num_images": N_DATA}
    assert result["steps"] == 2 and result["num"] == NUM and result["floors"]["num_images"] == N_DATA // 2
    assert md in out and f"seeds 0..{NUM - 1}" in md


def test_eval_blur_run(blur_run):
    _, result, md = run_eval(blur_run)
    samples, corruption, x = expected_samples(blur_run, [("dct-ode", "dct-ode"), ("dsd", "one-step")])
    expected = expected_numbers(samples, corruption, feature_stats(cheap_features(x)),
                                feature_stats(cheap_features(samples["observation"])))
    check_table(blur_run, result, md, expected, samples)
    assert result["rows"][1]["name"] == "Teacher DCT PF-ODE (Ambient-Full analogue)"
    assert "PF-ODE" in md and "BlurNoiseCorruption" in md


def test_eval_data_images(noise_run, tmp_path):
    """--data-images N: the first N data images make the reference stats and the Observation row."""
    run_dir = copy_run(noise_run, tmp_path / "copy")
    n = int(torch.randint(4, N_DATA, ()))
    _, result, _ = run_eval(run_dir, "--data-images", n)
    samples, corruption, x = expected_samples(run_dir, [])
    obs = samples["observation"][:n]
    assert result["data_images"] == n and result["references"]["clean"]["num_images"] == n
    row = result["rows"][0]
    assert row["key"] == "observation" and row["num_images"] == n
    proximal = proximal_corrupt(obs, corruption, range(n))
    assert row["fid"] == pytest.approx(fid_from_features(cheap_features(obs), feature_stats(cheap_features(x[:n]))),
                                       rel=1e-9)
    assert row["proximal_fid"] == pytest.approx(
        fid_from_features(cheap_features(proximal), feature_stats(cheap_features(obs))), rel=1e-9)
    r = invoke("eval", run_dir, *EVAL_ARGS, "--data-images", N_DATA + 1)
    assert r.exit_code == 1 and f"data_images: expected at most the {N_DATA} images" in r.output


def test_eval_loader_dali(noise_run, data, tmp_path):
    """--loader dali: the data images stream from an EDM zip through DALI in --inception-batch chunks; the table,
    the grids and --data-images are the resident loader's (checked against the direct computation)."""
    pytest.importorskip("nvidia.dali")
    from dsd_fast.data import convert_dataset

    run_dir = copy_run(noise_run, tmp_path / "copy", dataset=str(convert_dataset(data, tmp_path / "data.zip")))
    out, result, md = run_eval(run_dir, "--loader", "dali", "--inception-batch", 5)
    assert "loader dali: --loader dali" in out and result["loader"] == "dali: --loader dali"
    samples, corruption, x = expected_samples(noise_run, NOISE_ROWS)
    expected = expected_numbers(samples, corruption, feature_stats(cheap_features(x)),
                                feature_stats(cheap_features(samples["observation"])))
    check_table(run_dir, result, md, expected, samples)
    n = int(torch.randint(4, N_DATA, ()))
    _, result, _ = run_eval(run_dir, "--loader", "dali", "--inception-batch", 5, "--data-images", n)
    obs = samples["observation"][:n]
    assert result["data_images"] == n and result["rows"][0]["fid"] == pytest.approx(
        fid_from_features(cheap_features(obs), feature_stats(cheap_features(x[:n]))), rel=1e-9)


def test_eval_noisy_data(noise_run, tmp_path):
    """A run on already-noisy data has no clean data: FID is n/a unless --ref gives clean stats."""
    run_dir = copy_run(noise_run, tmp_path / "noisy", noisy_data=True)
    _, result, md = run_eval(run_dir)
    samples, corruption, x = expected_samples(run_dir, NOISE_ROWS)
    assert samples["observation"].equal(x)  # used as they are
    check_table(run_dir, result, md, expected_numbers(samples, corruption, None, feature_stats(cheap_features(x))),
                samples)
    assert all(row["fid"] is None for row in result["rows"]) and md.count(NO_CLEAN) == 4
    assert result["floors"]["fid"] is None and result["floors"]["proximal_fid"] is not None

    save_reference(tmp_path / "clean.npz", cheap_features(x[:8]), corrupted=False, resize_mode="edm")
    save_reference(tmp_path / "noisy.npz", cheap_features(x[2:]), corrupted=True, resize_mode="edm")
    _, result, md = run_eval(run_dir, "--ref", tmp_path / "clean.npz", "--proximal-ref", tmp_path / "noisy.npz")
    expected = expected_numbers(samples, corruption, feature_stats(cheap_features(x[:8])),
                                feature_stats(cheap_features(x[2:])))
    check_table(run_dir, result, md, expected, samples)
    assert result["references"] == {"clean": {"source": str(tmp_path / "clean.npz"), "num_images": 8},
                                    "corrupted": {"source": str(tmp_path / "noisy.npz"), "num_images": N_DATA - 2}}
    assert NO_CLEAN not in md

    r = invoke("fid", "ref", "--run", run_dir, "--clean", "--out", tmp_path / "x.npz")
    assert r.exit_code == 1 and "already-noisy data" in r.output and not (tmp_path / "x.npz").exists()


def test_eval_bad_input(noise_run, tmp_path):
    run_dir = copy_run(noise_run, tmp_path / "copy")
    teacher_only = copy_run(noise_run, tmp_path / "phase1", ckpt="pretrain-*.pt")
    x = torch.from_numpy(np.load(json.load(open(os.path.join(run_dir, "options.json")))["dataset"])["x"])
    save_reference(tmp_path / "clean.npz", cheap_features(x), corrupted=False, resize_mode="edm")
    save_reference(tmp_path / "corrupted.npz", cheap_features(x), corrupted=True, resize_mode="edm")
    np.savez(tmp_path / "small.npz", mu=np.zeros(5), sigma=np.eye(5))
    cases = [
        (teacher_only, [], "run_dir: eval needs a Phase II checkpoint .* of phase 'pretrain'"),
        (run_dir, ["--ref", tmp_path / "corrupted.npz"], "ref: expected clean-data stats"),
        (run_dir, ["--proximal-ref", tmp_path / "clean.npz"], "proximal_ref: expected corrupted-data stats"),
        (run_dir, ["--ref", tmp_path / "small.npz"], "ref: the stats have feature dimension 5"),
        (run_dir, ["--proximal-ref", tmp_path / "gone.npz"], "proximal_ref: stats file .* does not exist"),
        (tmp_path, [], "run_dir: .* is not a run directory"),
    ]
    for path, flags, match in cases:
        before = sorted(os.listdir(path))
        r = invoke("eval", path, *EVAL_ARGS, *flags)
        assert r.exit_code == 1 and r.output.startswith("Error: "), (flags, r.output)
        assert re.search(match, r.output), (match, r.output)
        assert sorted(os.listdir(path)) == before  # nothing written
