"""FID feature modes (issue 13): the edm mode is EDM's / StyleGAN's pipeline (uint8 at native size into the
network's own TF1 resize_bilinear), proved against TensorFlow 1's formula written here independently in numpy;
stats files record their mode and resolution and a mismatch is refused; `fid --images` scores any folder / zip /
npz like `fid --ckpt` scores the checkpoint that generated them; `fid --ref A --ref B`; clean-fid parity of the
clean mode; bad input."""

import json
import re

import numpy as np
import pytest
import torch
from runs import invoke, ok

import dsd_fast.evaluation.features as features_module
from dsd_fast.cli import main
from dsd_fast.evaluation import save_reference
from dsd_fast.metrics import FIDInceptionV3, InceptionFeatures, frechet_distance, load_inception, load_stats
from dsd_fast.metrics.fid import RESIZE_MODES


def tf1_resize_bilinear(img, out_h, out_w):
    """TensorFlow 1's tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False) of a [H, W] float
    image, from its definition: output pixel (y, x) reads the input at (y * H/out_h, x * W/out_w), the lower
    neighbour floor(.), the upper one min(floor(.) + 1, size - 1), linear weights; top/bottom rows are
    interpolated first, then left/right (float64 here)."""
    img = np.asarray(img, dtype=np.float64)
    H, W = img.shape
    out = np.empty((out_h, out_w))
    for y in range(out_h):
        in_y = y * (H / out_h)
        y0 = int(np.floor(in_y))
        y1 = min(y0 + 1, H - 1)
        dy = in_y - y0
        for x in range(out_w):
            in_x = x * (W / out_w)
            x0 = int(np.floor(in_x))
            x1 = min(x0 + 1, W - 1)
            dx = in_x - x0
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[y, x] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize("H, W", [(28, 28), (32, 32), (64, 64), (100, 100), (28, 64)])
def test_edm_resize_is_tf1_resize_bilinear(H, W):
    u8 = torch.randint(0, 256, (1, 3, H, W), dtype=torch.uint8)
    got = FIDInceptionV3().preprocess(u8.float()) * 128 + 128  # undo the network's (x - 128) / 128
    for c in (0, 2):
        want = tf1_resize_bilinear(u8[0, c].numpy(), 299, 299)
        assert np.abs(got[0, c].double().numpy() - want).max() <= 1e-4 * 255


@pytest.fixture(scope="module")
def inception():
    try:
        return load_inception()
    except FileNotFoundError as e:
        pytest.skip(f"no FID Inception weights: {e}")


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3), (64, 3)])
def test_edm_features_are_the_networks_own_forward(inception, size, channels):
    """edm mode: the features of uint8 images are exactly the network's forward on those uint8 values (grey
    repeated to RGB, as EDM's fid.py does), no resize before it."""
    u8 = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    got = InceptionFeatures(inception, mode="edm", batch_size=2)(u8)
    with torch.no_grad():
        want = inception(u8.expand(-1, 3, -1, -1).float())
    assert torch.equal(got, want)


def test_default_mode_is_edm():
    assert InceptionFeatures(torch.nn.Identity()).mode == "edm" and RESIZE_MODES[0] == "edm"
    modes = {p.name: p for p in main.commands["fid"].params}["mode"]  # the CLI's choices come from RESIZE_MODES
    assert tuple(modes.type.choices) == RESIZE_MODES


def test_clean_mode_matches_cleanfid():
    """Our clean resize against clean-fid's own resizer (`pip install clean-fid --no-deps`), to 1e-3 of 255."""
    resize = pytest.importorskip("cleanfid.resize")
    fn = resize.make_resizer("PIL", False, "bicubic", (299, 299))
    for H, W in ((28, 28), (32, 32), (64, 48)):
        u8 = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8)
        ours = InceptionFeatures(torch.nn.Flatten(), mode="clean", batch_size=2)(u8).view(2, 3, 299, 299)
        for b in range(2):
            theirs = fn(u8[b].permute(1, 2, 0).numpy())  # [299, 299, 3] float32
            assert np.abs(ours[b].permute(1, 2, 0).numpy() - theirs).max() <= 1e-3 * 255


# ---------------------------------------------------------------- the CLI, with a cheap feature network

def cheap_features(images):
    """Deterministic 12-d features: 2x2 block means per channel, grey repeated to RGB."""
    x = images.float().expand(-1, 3, -1, -1) / 255
    return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


@pytest.fixture
def cheap(monkeypatch):
    monkeypatch.setattr(features_module, "feature_network", lambda *args, **kwargs: cheap_features)


def number(out):
    return float(re.findall(r": (-?\d+\.\d+)\s*$", out.strip(), re.M)[-1])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from runs import make_run, smooth_images

    path = tmp_path_factory.mktemp("modes")
    np.savez(path / "data.npz", x=smooth_images(10).numpy())
    return make_run(path / "run", dataset=str(path / "data.npz")), path / "data.npz"


def test_images_score_like_the_checkpoint(cheap, run, tmp_path):
    """fid --images on a directory, a zip and an npz of generated images gives the number fid --ckpt gives for
    the checkpoint that generated them (same seeds)."""
    run_dir, data = run
    ok("fid", "ref", "--data", data, "--out", tmp_path / "ref.npz")
    ok("fid", "--ckpt", run_dir, "--ref", tmp_path / "ref.npz", "--num", 6, "--repeats", 1, "--json",
       tmp_path / "c.json")
    want = json.load(open(tmp_path / "c.json"))["mean"]
    for out in ("imgs", "imgs.zip", "imgs.npz"):
        ok("generate", "--ckpt", run_dir, "--seeds", "0-5", "--out", tmp_path / out)
        got = ok("fid", "--images", tmp_path / out, "--ref", tmp_path / "ref.npz", "--json", tmp_path / "f.json")
        result = json.load(open(tmp_path / "f.json"))
        assert result["fid"] == pytest.approx(want, rel=1e-12, abs=1e-12), out
        assert "6 images" in got and "mode edm" in got and result["num_images"] == 6 and number(got) >= 0


def test_ref_twice_is_the_distance_between_the_files(cheap, tmp_path):
    a, b = torch.randint(0, 256, (2, 9, 3, 8, 8), dtype=torch.uint8)
    for name, x in (("a", a), ("b", b)):
        save_reference(tmp_path / f"{name}.npz", cheap_features(x), corrupted=False, resize_mode="clean",
                       resolution=8)
    out = ok("fid", "--ref", tmp_path / "a.npz", "--ref", tmp_path / "b.npz", "--json", tmp_path / "d.json")
    got = json.load(open(tmp_path / "d.json"))["fid"]
    assert f"{got:.4f}" in out and "mode clean" in out
    assert got == pytest.approx(frechet_distance(*load_stats(tmp_path / "a.npz"), *load_stats(tmp_path / "b.npz")),
                                rel=1e-12)
    save_reference(tmp_path / "e.npz", cheap_features(b), corrupted=False, resize_mode="edm")
    r = invoke("fid", "--ref", tmp_path / "a.npz", "--ref", tmp_path / "e.npz")
    assert r.exit_code == 1 and "'edm'" in r.output and "'clean'" in r.output and "e.npz" in r.output


def _write_png(path, array):
    import PIL.Image

    PIL.Image.fromarray(array).save(path)


def test_bad_input(cheap, tmp_path):
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    save_reference(tmp_path / "ref.npz", cheap_features(x), corrupted=False, resize_mode="edm", resolution=8)
    ref = tmp_path / "ref.npz"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_png(mixed / "a.png", np.zeros((8, 8, 3), np.uint8))
    _write_png(mixed / "b.png", np.zeros((9, 8, 3), np.uint8))
    r = invoke("fid", "--images", mixed, "--ref", ref)
    assert r.exit_code == 1 and "b.png" in r.output and "a.png" in r.output
    junk = tmp_path / "junk"
    junk.mkdir()
    _write_png(junk / "a.png", np.zeros((8, 8, 3), np.uint8))
    (junk / "b.png").write_bytes(b"not an image")
    r = invoke("fid", "--images", junk, "--ref", ref)
    assert r.exit_code == 1 and "b.png" in r.output
    (tmp_path / "empty").mkdir()
    r = invoke("fid", "--images", tmp_path / "empty", "--ref", ref)
    assert r.exit_code == 1 and "empty" in r.output and "no image files" in r.output
    r = invoke("fid", "--images", tmp_path / "missing", "--ref", ref)
    assert r.exit_code == 1 and "missing" in r.output
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(12))
    r = invoke("fid", "--images", mixed, "--ref", tmp_path / "nomu.npz")
    assert r.exit_code == 1 and "nomu.npz" in r.output and "mu" in r.output
    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        _write_png(good / f"{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
    r = invoke("fid", "--images", good, "--ref", ref, "--mode", "gpu")
    assert r.exit_code == 1 and "ref.npz" in r.output and "'edm'" in r.output and "'gpu'" in r.output
    assert number(ok("fid", "--images", good, "--ref", ref)) >= 0
    for args in (("--ref", ref), ("--images", good, "--ckpt", "x", "--ref", ref),
                 ("--ref", ref, "--ref", ref, "--ref", ref), ("--images", good, "--ref", ref, "--ref", ref)):
        r = invoke("fid", *args)
        assert r.exit_code == 2 and "ref" in r.output.lower(), args
