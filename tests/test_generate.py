"""`dsd-fast generate` and the seeded generation under it: seed -> latents -> image is independent of batch size,
order, neighbours and world size; the directory / zip / npz outputs hold the right images; bad input fails cleanly
with nothing written."""

import glob
import json
import os
import re
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from runs import TOL, assert_uint8_matches, make_run, tol, torchrun

from dsd_fast.cli import main
from dsd_fast.data import load_images, to_uint8
from dsd_fast.data.datasets import _encode_png
from dsd_fast.generation import LATENT_KEY, MAX_SEED, batches, load_sampler, parse_seeds, seed_latents
from dsd_fast.reference.philox import corrupt_noise


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory with a Phase II last.pt, its Phase I checkpoint)."""
    path = make_run(tmp_path_factory.mktemp("gen") / "run")
    return path, glob.glob(os.path.join(path, "pretrain-*.pt"))[0]


@pytest.fixture(scope="module")
def blur_ckpt(run, tmp_path_factory):
    """A Phase I checkpoint of a blur + noise run (the noise run's weights under blur options: the network does not
    know its process, the samplers do)."""
    state = torch.load(run[1], weights_only=False)
    state["options"] = {**state["options"], "corruption": "blur", "blur": 0.7}
    path = tmp_path_factory.mktemp("blur") / "blur.pt"
    torch.save(state, path)
    return str(path)


def _seeds(n):
    """n distinct random seeds in random order, spread over the whole seed range."""
    seeds = list(dict.fromkeys(torch.randint(0, MAX_SEED + 1, (2 * n,), dtype=torch.int64).tolist()))[:n]
    assert len(seeds) == n
    return seeds


def _generate(*args):
    return CliRunner().invoke(main, ["generate", *map(str, args)])


def _npz(path):
    with np.load(path) as f:
        return torch.from_numpy(f["images"]).permute(0, 3, 1, 2), f["seeds"]


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("7") == [7]
    assert parse_seeds("5,1, 10-12") == [5, 1, 10, 11, 12]  # order kept
    assert parse_seeds(f"{MAX_SEED - 1}-{MAX_SEED}") == [MAX_SEED - 1, MAX_SEED]
    assert parse_seeds([3, 2]) == [3, 2] and parse_seeds(range(2)) == [0, 1]
    assert parse_seeds(torch.tensor([4, 9])) == [4, 9]


@pytest.mark.parametrize("spec, match", [
    ("", "expected a list like"), ("a", "expected a list like"), ("1-", "expected a list like"),
    ("1,,2", "expected a list like"), ("-1", "expected a list like"), ("1.5", "expected a list like"),
    ("3-1", "ends before it starts"), ("1,0-2", "distinct"), (f"{MAX_SEED}-{MAX_SEED + 1}", r"in \[0, 4294967295\]"),
    ([], "at least one seed"), ([-1], r"in \[0, 4294967295\]"), (["x"], "a list of ints"), (5, "a list of ints"),
])
def test_parse_seeds_errors(spec, match):
    with pytest.raises(ValueError, match=f"^seeds: .*{match}"):
        parse_seeds(spec)


@pytest.mark.parametrize("chw", [(3, 8, 8), (1, 5, 7)])
def test_seed_latents(chw):
    seeds = _seeds(6) + [0, MAX_SEED]
    z = seed_latents(seeds, chw)
    assert z.shape == (len(seeds), *chw) and z.dtype == torch.float32
    # Each row is the reference Philox stream of its seed alone ...
    for b, s in enumerate(seeds):
        assert torch.equal(z[b], corrupt_noise(LATENT_KEY, torch.tensor([s]), chw)[0])
        assert torch.equal(z[b], seed_latents([s], chw)[0])
    # ... whatever its neighbours and their order.
    perm = torch.randperm(len(seeds))
    assert torch.equal(seed_latents([seeds[i] for i in perm], chw), z[perm])
    assert torch.equal(seed_latents(torch.tensor(seeds[2:5]), chw), z[2:5])
    flat = z.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(len(seeds)) for j in range(i))


@pytest.mark.parametrize("kind", ["one-step", "heun"])
def test_same_seed_same_image_any_batch(kind, run):
    """Batch sizes 7 and 64 over 66 seeds (both end in a partial batch), batch 1 over the first 4 (a batch-1
    forward costs as much as a batch-64 one here)."""
    sampler = load_sampler(run[0] if kind == "one-step" else run[1], kind, steps=2)
    seeds = _seeds(66)
    floats = {b: torch.cat([sampler(seed_latents(c, sampler.chw)) for c in batches(seeds, b)]) for b in (7, 64)}
    floats[1] = torch.cat([sampler(seed_latents([s], sampler.chw)) for s in seeds[:4]])
    for x in (floats[1], floats[64]):
        torch.testing.assert_close(x, floats[7][:len(x)], rtol=TOL, atol=tol(floats[7]))
        assert_uint8_matches(to_uint8(x), floats[7][:len(x)])


def test_cli_same_seed_same_image_any_batch(run, tmp_path):
    """The CLI's npz at batch sizes 1, 7 and 64 (the same sampler path for every sampler kind)."""
    sampler = load_sampler(run[0])
    seeds = _seeds(66)
    x = torch.cat([sampler(seed_latents(c, sampler.chw)) for c in batches(seeds, 7)])
    for b, n in ((1, 4), (7, 66), (64, 66)):
        r = _generate("--ckpt", run[0], "--seeds", ",".join(map(str, seeds[:n])), "--batch", b,
                      "--out", tmp_path / f"b{b}.npz")
        assert r.exit_code == 0, r.output
        images, got = _npz(tmp_path / f"b{b}.npz")
        assert got.dtype == np.int64 and got.tolist() == seeds[:n]
        assert_uint8_matches(images, x[:n])
        if b == 7:  # the same batching in and out of the CLI: the same bits
            assert torch.equal(images, to_uint8(x))


def test_different_seeds_different_images(run):
    sampler = load_sampler(run[0])
    s = int(torch.randint(0, MAX_SEED - 16, ()))
    x = sampler(seed_latents(range(s, s + 16), sampler.chw)).flatten(1)
    gaps = (x[:, None] - x[None]).abs().mean(-1)
    assert gaps[~torch.eye(16, dtype=torch.bool)].min() > 0.1 * x.std()


def test_outputs_dir_zip_npz(run, tmp_path):
    sampler = load_sampler(run[0])
    seeds = _seeds(9)
    want = torch.cat([sampler.images(c) for c in batches(seeds, 4)])  # the CLI's batching: identical bits
    spec = ",".join(map(str, seeds))
    for out in ("pngs", "sub/s.zip", "s.npz"):
        r = _generate("--ckpt", run[0], "--seeds", spec, "--batch", 4, "--out", tmp_path / out)
        assert r.exit_code == 0, r.output
        assert f"Wrote 9 images (one-step) to {tmp_path / out}" in r.output and "img/s" in r.output
    assert sorted(os.listdir(tmp_path / "pngs")) == sorted(f"{s:06d}.png" for s in seeds)
    for s, x in zip(seeds, want, strict=True):
        png = np.array(PIL.Image.open(tmp_path / "pngs" / f"{s:06d}.png"))
        assert torch.equal(torch.from_numpy(png).permute(2, 0, 1), x)
    assert torch.equal(load_images(tmp_path / "sub/s.zip"), want)
    with zipfile.ZipFile(tmp_path / "sub/s.zip") as z:
        assert z.namelist()[:2] == ["00000/img00000000.png", "00000/img00000001.png"]
        assert json.loads(z.read("dataset.json")) == {"labels": None, "seeds": seeds}
    images, got = _npz(tmp_path / "s.npz")
    assert torch.equal(images, want) and got.tolist() == seeds
    assert torch.equal(load_images(tmp_path / "s.npz"), want)
    assert not glob.glob(str(tmp_path / "**" / "*.tmp"), recursive=True)

    # Existing outputs are kept unless --overwrite; a directory refuses only PNGs of the requested seeds.
    before = (tmp_path / "s.npz").read_bytes()
    for out, seeds_ in (("s.npz", "0-2"), ("pngs", f"{seeds[0]},{seeds[0] + 1}")):
        r = _generate("--ckpt", run[0], "--seeds", seeds_, "--out", tmp_path / out)
        assert r.exit_code == 1 and "--overwrite" in r.output, r.output
    assert (tmp_path / "s.npz").read_bytes() == before
    r = _generate("--ckpt", run[0], "--seeds", "0-2", "--out", tmp_path / "s.npz", "--overwrite")
    assert r.exit_code == 0, r.output
    assert _npz(tmp_path / "s.npz")[1].tolist() == [0, 1, 2]
    r = _generate("--ckpt", run[0], "--seeds", f"{MAX_SEED}", "--out", tmp_path / "pngs")
    assert r.exit_code == 0 and len(os.listdir(tmp_path / "pngs")) == 10, r.output


@pytest.mark.parametrize("out", ["s.zip", "s.npz", "pngs"])
def test_failed_write_leaves_no_partial_file(out, run, tmp_path, monkeypatch):
    """A failure after some images were written: no zip/npz, no temporary file; a directory keeps only whole PNGs."""
    from dsd_fast import generation

    calls = []

    def encode_fails_on_fourth(x):
        calls.append(x)
        if len(calls) == 4:
            raise OSError("disk full")
        return _encode_png(x)

    def savez_fails(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(generation, "_encode_png", encode_fails_on_fourth)
    monkeypatch.setattr(np, "savez", savez_fails)
    r = _generate("--ckpt", run[0], "--seeds", "0-6", "--batch", 2, "--out", tmp_path / out)
    assert r.exit_code == 1 and "Error: disk full" in r.output, r.output
    if out == "pngs":  # images 2 and 3 encode concurrently: either may be the failing 4th call
        names = sorted(os.listdir(tmp_path / out))
        assert names in (["000000.png", "000001.png"], ["000000.png", "000001.png", "000002.png"]), names
        assert load_images(tmp_path / out).shape == (len(names), 3, 32, 32)
    else:
        assert os.listdir(tmp_path) == []


def test_bf16_close_to_fp32(run, tmp_path):
    spec = ",".join(map(str, _seeds(16)))
    for precision in ("fp32", "bf16"):
        r = _generate("--ckpt", run[0], "--seeds", spec, "--precision", precision,
                      "--out", tmp_path / f"{precision}.npz")
        assert r.exit_code == 0, r.output
    a, b = (_npz(tmp_path / f"{p}.npz")[0].int() for p in ("fp32", "bf16"))
    diff = (a - b).abs()
    # Measured on cpu-tiny: bf16 moves the float image by at most 0.003 (0.4 levels), 2% of pixels by one level.
    # The bounds leave 20x / 8x room for other tiny runs; some pixels must move, or autocast did not engage.
    assert 0 < diff.float().mean() < 0.5 and diff.max() <= 8, (diff.float().mean(), diff.max())


def test_teacher_of_a_blur_run(blur_ckpt, tmp_path):
    r = _generate("--ckpt", blur_ckpt, "--seeds", "3-5", "--steps", 2, "--out", tmp_path / "b.npz")
    assert r.exit_code == 0 and "(dct-ode)" in r.output, r.output
    sampler = load_sampler(blur_ckpt, "dct-ode", steps=2)
    assert torch.equal(_npz(tmp_path / "b.npz")[0], sampler.images([3, 4, 5]))


@pytest.mark.parametrize("case, match", [
    ("unknown sampler", "sampler: expected one of .*got 'foo'"),
    ("one-step on Phase I", "sampler: expected one of .*for a Phase I checkpoint of a 'noise' run, got 'one-step'"),
    ("heun on blur", r"sampler: expected one of \('dct-ode',\) for a Phase I checkpoint of a 'blur' run"),
    ("seeds", "seeds: expected a list like"),
    ("seed range", "seeds: range '9-2' ends before it starts"),
    ("missing ckpt", "ckpt: checkpoint .*nope.pt' does not exist"),
    ("run dir without last.pt", "ckpt: checkpoint .*last.pt' does not exist"),
    ("not a checkpoint", "checkpoint: cannot read"),
    ("foreign torch file", "ckpt: .* is not a dsd-fast training checkpoint"),
    ("out is a file", "out: expected a directory or a path ending in .zip or .npz"),
    ("zip is a directory", "out: expected a zip file"),
    ("device", "device: expected a torch device"),
])
def test_bad_input(case, match, run, blur_ckpt, tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.zip").mkdir()
    (tmp_path / "empty_run").mkdir()
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "out.npz"
    args = {
        "unknown sampler": ["--ckpt", run[0], "--sampler", "foo"],
        "one-step on Phase I": ["--ckpt", run[1], "--sampler", "one-step"],
        "heun on blur": ["--ckpt", blur_ckpt, "--sampler", "heun"],
        "seeds": ["--ckpt", run[0], "--seeds", "1-"],
        "seed range": ["--ckpt", run[0], "--seeds", "0,9-2"],
        "missing ckpt": ["--ckpt", tmp_path / "nope.pt"],
        "run dir without last.pt": ["--ckpt", tmp_path / "empty_run"],
        "not a checkpoint": ["--ckpt", tmp_path / "text.pt"],
        "foreign torch file": ["--ckpt", tmp_path / "foreign.pt"],
        "out is a file": ["--ckpt", run[0], "--out", tmp_path / "file"],
        "zip is a directory": ["--ckpt", run[0], "--out", tmp_path / "dir.zip"],
        "device": ["--ckpt", run[0], "--device", "gpu7"],
    }[case]
    if "--out" not in args:
        args += ["--out", out]
    r = _generate("--seeds", "0-3", *args)
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: ") and re.search(match, r.output), r.output
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "dir.zip") == []



def test_torchrun_two_processes(run, tmp_path):
    """2 processes (gloo): the npz equals the 1-process one (rank 0 gathers and writes in seed order, the ranks'
    step counts differ at the end); PNGs in a directory come from both ranks."""
    sampler = load_sampler(run[0])
    seeds = _seeds(11)  # ranks hold 6 and 5 seeds: with batch 4 rank 1's last step has 1 image, rank 0's 2
    spec = ",".join(map(str, seeds))
    x = sampler(seed_latents(seeds, sampler.chw))
    stdout = torchrun("generate", "--ckpt", run[0], "--seeds", spec, "--batch", 4, "--out", tmp_path / "two.npz")
    assert stdout.count("Wrote 11 images") == 1  # rank 0 reports
    images, got = _npz(tmp_path / "two.npz")
    assert got.tolist() == seeds
    assert_uint8_matches(images, x)
    r = _generate("--ckpt", run[0], "--seeds", spec, "--batch", 4, "--out", tmp_path / "one.npz")
    assert r.exit_code == 0, r.output
    assert_uint8_matches(_npz(tmp_path / "one.npz")[0], x)

    torchrun("generate", "--ckpt", run[0], "--seeds", spec, "--batch", 2, "--out", tmp_path / "pngs")
    assert sorted(os.listdir(tmp_path / "pngs")) == sorted(f"{s:06d}.png" for s in seeds)
    assert_uint8_matches(load_images(tmp_path / "pngs"), x[np.argsort([f"{s:06d}" for s in seeds])])


@pytest.mark.gpu
def test_seed_latents_cuda_kernel_matches_reference():
    """On CUDA the fused Philox kernel draws the latents: the reference stream's values (to the 1e-6 of Triton's
    Box-Muller), for seeds up to MAX_SEED."""
    seeds = [0, 1, 12345, MAX_SEED] + torch.randint(0, MAX_SEED, (4,)).tolist()
    chw = (3, 64, 64)
    z = seed_latents(seeds, chw, "cuda")
    assert z.device.type == "cuda" and z.dtype == torch.float32
    want = corrupt_noise(LATENT_KEY, torch.tensor(seeds), chw)
    assert (z.cpu() - want).abs().max() <= 1e-5
