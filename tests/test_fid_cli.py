"""`dsd-fast fid ref` and `dsd-fast fid` through the CLI: reference stats (clean, corrupted as a training run
corrupts its data, from a run's options), FID repeats over disjoint seed ranges, Proximal FID, the stats markers,
torchrun, and bad input. A cheap deterministic feature network replaces the FID InceptionV3 except in one test
that runs the real network on 24 small images (the Proximal FID sanity check)."""

import json
import os
import random
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from runs import assert_uint8_matches, invoke, ok

import dsd_fast.evaluation.features as features_module
from dsd_fast.cli import main
from dsd_fast.corruption import BlurNoiseCorruption, NoiseCorruption
from dsd_fast.data import convert_dataset, to_float, to_uint8
from dsd_fast.evaluation import data_features, fid_from_features, proximal_corrupt, save_reference
from dsd_fast.generation import load_sampler, seed_latents, split_seeds
from dsd_fast.metrics import InceptionFeatures, feature_stats, load_inception, load_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DATA = 12
RECORD = "DSD_FAST_TEST_RECORD"  # where the torchrun ranks of test_fid_torchrun save their images


def cheap_features(images):
    """Deterministic 18-d features of uint8 images: 2x2 block means and mean vertical/horizontal differences per
    channel (noise and blur move the latter a lot)."""
    x = images.float().expand(-1, 3, -1, -1) / 255
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((2, 3))
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean((2, 3))
    return torch.cat([F.adaptive_avg_pool2d(x, 2).flatten(1), dy, dx], 1)


class Recorder:
    """cheap_features, remembering every non-empty batch it saw (in order)."""

    def __init__(self):
        self.seen = []

    def __call__(self, images):
        if images.shape[0]:
            self.seen.append(images.cpu())
        return cheap_features(images)

    def images(self):
        return torch.cat(self.seen) if self.seen else torch.zeros(0, dtype=torch.uint8)


@pytest.fixture
def cheap(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(features_module, "feature_network", lambda *args, **kwargs: rec)
    return rec


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained noise run whose options.json names a small data set file; returns (run dir, data path)."""
    from runs import make_run, smooth_images

    path = tmp_path_factory.mktemp("fidcli")
    np.savez(path / "data.npz", x=smooth_images(N_DATA).numpy())
    return make_run(path / "run", dataset=str(path / "data.npz")), str(path / "data.npz")


def data_images(path):
    return torch.from_numpy(np.load(path)["x"])


def corrupt_one_by_one(x, corruption, seed, start=0):
    """The training run's observation of image i, computed image by image (index start + i)."""
    return torch.cat([to_uint8(corruption.corrupt(to_float(x[i:i + 1]), seed, torch.tensor([start + i])))
                      for i in range(x.shape[0])])


def assert_stats(path, feats):
    mu, sigma = load_stats(path)
    ref_mu, ref_sigma = feature_stats(feats)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-12, atol=1e-12)


def markers(path):
    with np.load(path) as z:
        return {k: z[k].item() for k in z.files if k not in ("mu", "sigma")}


# ---------------------------------------------------------------- fid ref

def test_ref_clean(cheap, run, tmp_path):
    _, data = run
    x = data_images(data)
    out = ok("fid", "ref", "--data", data, "--out", tmp_path / "clean.npz")
    assert str(tmp_path / "clean.npz") in out and f"{N_DATA} images" in out
    assert_stats(tmp_path / "clean.npz", cheap_features(x))
    m = markers(tmp_path / "clean.npz")
    assert m["corrupted"] is False and m["num_images"] == N_DATA and m["feature_dim"] == 18
    assert m["resize_mode"] == "edm" and m["resolution"] == 32
    ok("fid", "ref", "--data", data, "--max-images", 5, "--mode", "clean", "--out", tmp_path / "five.npz")
    assert_stats(tmp_path / "five.npz", cheap_features(x[:5]))
    m = markers(tmp_path / "five.npz")
    assert m["num_images"] == 5 and m["resize_mode"] == "clean"


@pytest.mark.parametrize("flags, corruption", [
    (("--sigma", "0.3"), NoiseCorruption(0.3)),
    (("--corruption", "blur", "--blur", "0.8", "--sigma", "0.1"), BlurNoiseCorruption(0.8, 0.1)),
])
def test_ref_corrupt_as_training(cheap, run, tmp_path, flags, corruption):
    """--corrupt: image i as a training run with that seed corrupts it, corruption.corrupt(x_i, seed, i)."""
    _, data = run
    x, seed = data_images(data), random.getrandbits(24)
    ok("fid", "ref", "--data", data, "--corrupt", *flags, "--seed", seed, "--out", tmp_path / "y.npz")
    expected = cheap_features(corrupt_one_by_one(x, corruption, seed))
    assert_stats(tmp_path / "y.npz", expected)
    assert_stats(tmp_path / "y.npz", data_features(x, cheap_features, corruption=corruption, seed=seed))
    assert markers(tmp_path / "y.npz")["corrupted"] is True
    assert np.abs(load_stats(tmp_path / "y.npz")[0] - feature_stats(cheap_features(x))[0]).max() > 1e-3
    ok("fid", "ref", "--data", data, "--corrupt", *flags, "--seed", seed + 1, "--out", tmp_path / "y1.npz")
    assert not np.allclose(load_stats(tmp_path / "y1.npz")[1], load_stats(tmp_path / "y.npz")[1])


def test_ref_from_run(cheap, run, tmp_path):
    """--run takes data, corruption and seed from options.json: corrupted by default, --clean for the clean data."""
    run_dir, data = run
    options = json.load(open(os.path.join(run_dir, "options.json")))
    x = data_images(data)
    ok("fid", "ref", "--run", run_dir, "--out", tmp_path / "prox.npz")
    assert_stats(tmp_path / "prox.npz",
                 cheap_features(corrupt_one_by_one(x, NoiseCorruption(options["sigma"]), options["seed"])))
    assert markers(tmp_path / "prox.npz")["corrupted"] is True
    ok("fid", "ref", "--run", run_dir, "--clean", "--max-images", 4, "--out", tmp_path / "clean.npz")
    assert_stats(tmp_path / "clean.npz", cheap_features(x[:4]))
    assert markers(tmp_path / "clean.npz")["corrupted"] is False


def test_ref_loaders(cheap, run, tmp_path):
    """--loader dali streams the data set through DALI in --inception-batch chunks (a short last one) and writes the
    resident loader's stats exactly, from an npz and an EDM zip, clean and corrupted as the run corrupts; the
    choice is printed (auto: resident without an accelerator)."""
    pytest.importorskip("nvidia.dali")
    run_dir, data = run
    options = json.load(open(os.path.join(run_dir, "options.json")))
    x = data_images(data)
    y = corrupt_one_by_one(x, NoiseCorruption(options["sigma"]), options["seed"])
    out = ok("fid", "ref", "--data", data, "--out", tmp_path / "auto.npz")
    assert "loader resident: no accelerator" in out
    assert "loader resident: --loader resident" in ok("fid", "ref", "--data", data, "--loader", "resident",
                                                      "--out", tmp_path / "resident.npz")
    zipped = convert_dataset(data, tmp_path / "data.zip")
    for source in (data, zipped):
        out = ok("fid", "ref", "--data", source, "--loader", "dali", "--inception-batch", 5, "--out",
                 tmp_path / "dali.npz")
        assert "loader dali: --loader dali" in out and f"{N_DATA} images" in out
        assert_stats(tmp_path / "dali.npz", cheap_features(x))
        assert np.array_equal(np.load(tmp_path / "dali.npz")["sigma"], np.load(tmp_path / "auto.npz")["sigma"])
    run_zip = tmp_path / "run"
    os.makedirs(run_zip)
    json.dump({**options, "dataset": str(zipped)}, open(run_zip / "options.json", "w"))
    ok("fid", "ref", "--run", run_zip, "--loader", "dali", "--inception-batch", 5, "--out", tmp_path / "prox.npz")
    assert_stats(tmp_path / "prox.npz", cheap_features(y))
    ok("fid", "ref", "--run", run_zip, "--loader", "dali", "--max-images", 7, "--clean", "--out", tmp_path / "c7.npz")
    assert_stats(tmp_path / "c7.npz", cheap_features(x[:7]))


# ---------------------------------------------------------------- fid

@pytest.fixture(scope="module")
def refs(run, tmp_path_factory):
    """(clean stats, corrupted stats) of the run's data with the cheap features, as `fid ref` writes them."""
    run_dir, data = run
    options = json.load(open(os.path.join(run_dir, "options.json")))
    x, path = data_images(data), tmp_path_factory.mktemp("refs")
    save_reference(path / "clean.npz", cheap_features(x), corrupted=False, resize_mode="edm")
    y = corrupt_one_by_one(x, NoiseCorruption(options["sigma"]), options["seed"])
    save_reference(path / "prox.npz", cheap_features(y), corrupted=True, resize_mode="edm")
    return path / "clean.npz", path / "prox.npz"


def test_fid_repeats_seed_ranges(cheap, run, refs, tmp_path):
    """Repeat r measures exactly the images of seeds r*num .. (r+1)*num - 1; mean ± sample std; the same images
    again at another batch size (up to a rounding flip: see runs.TOL)."""
    run_dir, _ = run
    clean, _ = refs
    out = ok("fid", "--ckpt", run_dir, "--ref", clean, "--num", 3, "--repeats", 3, "--batch", 2,
             "--json", tmp_path / "a.json")
    sampler = load_sampler(run_dir)
    x = sampler(seed_latents(range(9), sampler.chw))
    seen = cheap.images()
    assert_uint8_matches(seen, x)  # seeds 0-2, 3-5, 6-8 in order: disjoint
    assert len({bytes(im.numpy()) for im in seen}) == 9
    result = json.load(open(tmp_path / "a.json"))
    assert [r["seeds"] for r in result["repeats"]] == ["0-2", "3-5", "6-8"]
    fids = [r["fid"] for r in result["repeats"]]
    ref = load_stats(clean)
    for k, fid in enumerate(fids):
        assert fid == pytest.approx(fid_from_features(cheap_features(seen[3 * k:3 * k + 3]), ref), rel=1e-9)
    assert result["mean"] == pytest.approx(statistics.fmean(fids)) and result["metric"] == "fid"
    assert result["std"] == pytest.approx(statistics.stdev(fids))
    assert f"{result['mean']:.4f} ± {result['std']:.4f}" in out and "0-2" in out and "6-8" in out
    assert result["ref_markers"]["num_images"] == N_DATA and result["sampler"] == "one-step"

    ok("fid", "--ckpt", run_dir, "--ref", clean, "--num", 3, "--repeats", 3, "--batch", 5,
       "--json", tmp_path / "b.json")
    seen = cheap.images()[9:]
    assert_uint8_matches(seen, x)
    for k, r in enumerate(json.load(open(tmp_path / "b.json"))["repeats"]):
        assert r["fid"] == pytest.approx(fid_from_features(cheap_features(seen[3 * k:3 * k + 3]), ref), rel=1e-9)

    out = ok("fid", "--ckpt", run_dir, "--ref", clean, "--num", 3, "--repeats", 1, "--json", tmp_path / "c.json")
    single = json.load(open(tmp_path / "c.json"))
    assert single["std"] is None and "±" not in out
    assert single["mean"] == pytest.approx(fid_from_features(cheap_features(cheap.images()[18:]), ref), rel=1e-9)


def test_fid_proximal(cheap, run, refs, tmp_path):
    """--proximal corrupts the samples with the run's observation model; the stats markers must agree."""
    run_dir, _ = run
    clean, prox = refs
    ok("fid", "--ckpt", run_dir, "--ref", prox, "--proximal", "--num", 4, "--repeats", 1,
       "--sampler", "ambient-truncated", "--steps", 2, "--json", tmp_path / "p.json")
    sampler = load_sampler(run_dir, "ambient-truncated", steps=2)
    images = sampler.images(range(4))
    expected = proximal_corrupt(images, sampler.corruption, range(4))
    assert cheap.images().equal(expected) and not expected.equal(images)
    result = json.load(open(tmp_path / "p.json"))
    assert result["metric"] == "proximal_fid" and result["steps"] == 2 and result["sampler"] == "ambient-truncated"
    assert result["mean"] == pytest.approx(fid_from_features(cheap_features(expected), load_stats(prox)), rel=1e-9)

    r = invoke("fid", "--ckpt", run_dir, "--ref", prox, "--num", 4, "--repeats", 1)
    assert r.exit_code == 1 and "expected clean-data stats" in r.output
    r = invoke("fid", "--ckpt", run_dir, "--ref", clean, "--proximal", "--num", 4, "--repeats", 1)
    assert r.exit_code == 1 and "expected corrupted-data stats" in r.output
    foreign = tmp_path / "foreign.npz"  # clean-fid / EDM files: only mu and sigma, accepted for either use
    np.savez(foreign, **dict(zip(("mu", "sigma"), load_stats(prox), strict=True)))
    for flags in ((), ("--proximal",)):
        out = ok("fid", "--ckpt", run_dir, "--ref", foreign, *flags, "--mode", "clean", "--num", 2, "--repeats", 1)
        assert "mode clean, assumed for the reference: it records no mode" in out
    r = invoke("fid", "--ckpt", run_dir, "--ref", prox, "--proximal", "--mode", "clean", "--num", 2, "--repeats", 1)
    assert r.exit_code == 1  # the stats' feature mode differs: an error naming both modes and the file
    assert "feature mode 'edm'" in r.output and "mode 'clean'" in r.output and str(prox) in r.output


def test_proximal_fid_halves_real_inception(tmp_path):
    """With the real FID InceptionV3: corrupted data against the stats of a disjoint half of the same corrupted
    data set scores far below clean data against them (measured here: about 100 vs 400 at 8 images each)."""
    n, sigma, seed = 8, 0.2, random.getrandbits(24)
    from runs import smooth_images

    x = smooth_images(2 * n)
    np.savez(tmp_path / "data.npz", x=x.numpy())
    ok("fid", "ref", "--data", tmp_path / "data.npz", "--corrupt", "--sigma", sigma, "--seed", seed,
       "--max-images", n, "--mode", "gpu", "--inception-batch", 8, "--out", tmp_path / "half.npz")
    ref = load_stats(tmp_path / "half.npz")
    assert ref[0].shape == (2048,)
    features = InceptionFeatures(load_inception(), mode="gpu", batch_size=8)
    corrupted = data_features(x[n:], features, corruption=NoiseCorruption(sigma), seed=seed,
                              index=torch.arange(n, 2 * n), progress=False)
    proximal = fid_from_features(corrupted, ref)
    clean = fid_from_features(data_features(x[n:], features, progress=False), ref)
    assert 2 * proximal < clean, (proximal, clean)


# ---------------------------------------------------------------- torchrun

def test_fid_torchrun(cheap, run, refs, tmp_path):
    """2 processes split the seeds (split_seeds) and measure the images of the 1-process run; their features are
    gathered before the FID (this file is the launched script: __main__, recording each rank's images)."""
    run_dir, _ = run
    clean, _ = refs
    args = ["fid", "--ckpt", run_dir, "--ref", clean, "--num", 3, "--repeats", 2, "--batch", 1, "--device", "cpu"]
    ok(*args, "--json", tmp_path / "one.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": "",
           RECORD: str(tmp_path)}
    # "--" ends torchrun's own options: its parser would take --num for an abbreviation of its --numa-binding.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, "--",
           *map(str, args), "--json", str(tmp_path / "two.json")]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("seeds 0-2") == 1  # rank 0 alone reports
    one, two = (json.load(open(tmp_path / f)) for f in ("one.json", "two.json"))
    assert two["world_size"] == 2
    # Different thread counts (1 per rank here) may flip a pixel's rounding, so the processes' own images, not the
    # 1-process run's, make their FIDs.
    sampler = load_sampler(run_dir)
    x = sampler(seed_latents(range(6), sampler.chw))
    ref = load_stats(clean)
    seeds = [[split_seeds(list(range(3 * k, 3 * k + 3)), rank, 2) for k in range(2)] for rank in range(2)]
    mine = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True).split([len(s) for s in seeds[rank]])
            for rank in range(2)]
    for k, repeat in enumerate(two["repeats"]):
        for rank in range(2):
            assert seeds[rank][k], "each rank holds seeds of each repeat"
            assert_uint8_matches(mine[rank][k], x[seeds[rank][k]])
        feats = cheap_features(torch.cat([mine[0][k], mine[1][k]]))
        assert repeat["fid"] == pytest.approx(fid_from_features(feats, ref), rel=1e-9)
        assert repeat["seeds"] == one["repeats"][k]["seeds"]


# ---------------------------------------------------------------- bad input

def test_fid_bad_input(cheap, run, refs, tmp_path):
    run_dir, _ = run
    clean, _ = refs
    no_mu = tmp_path / "no_mu.npz"
    np.savez(no_mu, m=np.zeros(3))
    small = tmp_path / "small.npz"
    np.savez(small, mu=np.zeros(5), sigma=np.eye(5))
    out = tmp_path / "out.json"
    cases = [
        (["--ref", no_mu], "ref: .* lacks \\['mu', 'sigma'\\]"),
        (["--ref", small], "ref: the stats have feature dimension 5 but the feature network gives 18"),
        (["--ref", tmp_path / "gone.npz"], "ref: stats file .* does not exist"),
        (["--ref", clean, "--sampler", "foo"], "sampler: expected one of \\('one-step', 'ambient-truncated'"),
        (["--ref", clean, "--sampler", "dct-ode"], "sampler: expected one of"),
        (["--ref", clean, "--json", tmp_path / "nodir" / "x.json"], "json: directory .* does not exist"),
    ]
    for flags, match in cases:
        r = invoke("fid", "--ckpt", run_dir, "--num", 2, "--repeats", 1, "--json", out, *flags)
        assert r.exit_code == 1 and r.output.startswith("Error: "), (flags, r.output)
        assert re.search(match, r.output), (match, r.output)
        assert not out.exists() and not cheap.seen  # failed before generating anything, wrote nothing
    r = invoke("fid", "--ckpt", tmp_path / "nothing.pt", "--ref", clean, "--num", 2)
    assert r.exit_code == 1 and "ckpt: checkpoint" in r.output
    r = invoke("fid", "--ref", clean)
    assert r.exit_code == 2 and "pass one of --ckpt or --images with --ref" in r.output


def test_ref_bad_input(cheap, run, tmp_path):
    run_dir, data = run
    out = tmp_path / "out.npz"
    cases = [
        (["--data", data, "--max-images", N_DATA + 1], f"max_images: expected {N_DATA + 1} images, but .* holds only "
                                                       f"{N_DATA}"),
        (["--data", data, "--sigma", "0.1"], "corrupt: --sigma describe a corruption; add --corrupt"),
        (["--data", data, "--corrupt", "--corruption", "blur"], "blur: expected a blur std > 0"),
        (["--data", data, "--corrupt", "--blur", "1"], "blur: only meaningful with corruption='blur'"),
        (["--data", data, "--resolution", 64], "resolution: expected 64x64 images"),
        (["--data", tmp_path / "gone.npz"], "dataset: expected one of .* or an existing path"),
        (["--run", run_dir, "--sigma", "0.1"], "run: the run's options.json sets the data .* drop --sigma"),
        (["--run", tmp_path], "run: .* is not a run directory"),
    ]
    for flags, match in cases:
        r = invoke("fid", "ref", "--out", out, *flags)
        assert r.exit_code == 1 and r.output.startswith("Error: "), (flags, r.output)
        assert re.search(match, r.output), (match, r.output)
        assert not out.exists() and not cheap.seen
    r = invoke("fid", "ref", "--out", out)
    assert r.exit_code == 2 and "pass --data" in r.output


if __name__ == "__main__":  # launched by test_fid_torchrun under torchrun: the CLI with the cheap feature network,
    # each rank saving the images it saw to $RECORD/rank<r>.pt
    recorder = Recorder()
    features_module.feature_network = lambda *args, **kwargs: recorder
    try:
        main(sys.argv[1:], prog_name="dsd-fast")
    finally:
        torch.save(recorder.images(), os.path.join(os.environ[RECORD], f"rank{os.environ['RANK']}.pt"))
