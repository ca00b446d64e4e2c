"""Data sets (every format round-trips to identical uint8 tensors, clear errors) and the GPU-resident loader
(seeded permutations, fixed per-image corruption, world-size independence, x-flips)."""

import gzip
import io
import os
import pickle
import random
import struct
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import dsd_fast.data.datasets as datasets
from dsd_fast.corruption import BlurNoiseCorruption, NoiseCorruption
from dsd_fast.data import (
    DATASETS,
    GPUData,
    convert_dataset,
    epoch_permutation,
    load_images,
    resolve_source,
    to_float,
    to_uint8,
    xflip_mask,
)
from dsd_fast.reference.philox import corrupt_noise


def _images(n, c, h, w=None):
    return torch.randint(0, 256, (n, c, h, h if w is None else w), dtype=torch.uint8)


def _seed_value():
    return random.getrandbits(64)


def _write_pngs(folder, x, ext=".png"):
    """x uint8 [N, C, H, W] -> folder/{sub}/img{i}{ext}, nested so the loader must recurse."""
    for i, img in enumerate(x.permute(0, 2, 3, 1).numpy()):
        path = folder / f"{i // 3:02d}" / f"img{i:03d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(path)


def _write_idx(path, x):
    """x uint8 [N, H, W] -> an idx3-ubyte file (gzipped if path ends in .gz)."""
    data = struct.pack(">BBBB3I", 0, 0, 8, 3, *x.shape) + x.numpy().tobytes()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("c", [1, 3])
def test_png_folder_and_edm_zip_round_trip(tmp_path, c):
    x = _images(7, c, 5)
    _write_pngs(tmp_path / "pngs", x)
    (tmp_path / "pngs" / "dataset.json").write_text('{"labels": null}')  # ignored, not an image
    assert torch.equal(load_images(tmp_path / "pngs"), x)
    assert torch.equal(load_images(tmp_path / "pngs", resolution=5, channels=c, max_images=4), x[:4])
    dest = convert_dataset(tmp_path / "pngs", tmp_path / "out.zip")
    with zipfile.ZipFile(dest) as z:
        names = sorted(z.namelist())
        assert names == ["00000/img00000000.png"] + [f"00000/img{i:08d}.png" for i in range(1, 7)] + ["dataset.json"]
        assert z.read("dataset.json") == b'{"labels": null}'
    assert torch.equal(load_images(dest), x)


def test_edm_zip_folders_of_1000(tmp_path):
    x = _images(1003, 1, 2)
    np.save(tmp_path / "x.npy", x.numpy())
    dest = convert_dataset(tmp_path / "x.npy", tmp_path / "out.zip")
    with zipfile.ZipFile(dest) as z:
        names = set(z.namelist())
    assert {"00000/img00000999.png", "00001/img00001000.png", "00001/img00001002.png"} <= names
    assert torch.equal(load_images(dest), x)


def test_jpeg_and_mode_conversion(tmp_path):
    # Palette and RGBA images become RGB, LA becomes L; JPEGs load (lossy, so compare to PIL's own decode).
    rgb = np.random.randint(0, 256, (6, 6, 3), dtype=np.uint8)
    PIL.Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
    PIL.Image.fromarray(rgb).save(tmp_path / "b.jpg", quality=90)
    x = load_images(tmp_path)
    assert torch.equal(x[0], torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(x[1], torch.from_numpy(np.array(PIL.Image.open(tmp_path / "b.jpg"))).permute(2, 0, 1))
    grey = tmp_path / "grey"
    grey.mkdir()
    PIL.Image.fromarray(rgb[..., 0]).convert("LA").save(grey / "c.png")
    assert torch.equal(load_images(grey)[0, 0], torch.from_numpy(rgb[..., 0]))


@pytest.mark.parametrize("c", [1, 3])
def test_npz_npy_round_trip(tmp_path, c):
    x = _images(3, c, 7)
    nhwc = x.permute(0, 2, 3, 1).numpy()
    np.save(tmp_path / "nchw.npy", x.numpy())
    np.save(tmp_path / "nhwc.npy", nhwc)
    np.savez(tmp_path / "x.npz", labels=np.arange(3), x=nhwc)
    np.savez(tmp_path / "images.npz", images=x.numpy(), other=np.zeros(2))
    np.savez(tmp_path / "only.npz", anything=nhwc)
    for name in ("nchw.npy", "nhwc.npy", "x.npz", "images.npz", "only.npz"):
        assert torch.equal(load_images(tmp_path / name, resolution=7, channels=c), x), name
    if c == 1:
        np.save(tmp_path / "nhw.npy", nhwc[..., 0])
        assert torch.equal(load_images(tmp_path / "nhw.npy"), x)
    assert torch.equal(load_images(tmp_path / "nhwc.npy", max_images=2), x[:2])


def test_idx_round_trip(tmp_path):
    x = _images(5, 1, 28)
    for name in ("train-images-idx3-ubyte.gz", "plain-idx3-ubyte"):
        _write_idx(tmp_path / name, x[:, 0])
        assert torch.equal(load_images(tmp_path / name), x)
    # A directory holding idx files loads the training split (not t10k).
    folder = tmp_path / "fmnist"
    folder.mkdir()
    _write_idx(folder / "train-images-idx3-ubyte.gz", x[:, 0])
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", x[:2, 0])
    assert torch.equal(load_images(folder, resolution=28, channels=1), x)
    dest = convert_dataset(folder, tmp_path / "fm.zip")
    assert torch.equal(load_images(dest), x)


def _add_to_tar(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_cifar_tarball(tmp_path):
    # The python tarball's layout: pickled dicts with 'data' uint8 [n, 3072] (CHW-flattened), batches 1..5.
    x = _images(8, 3, 32)
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for b, part in ((2, x[5:]), (1, x[:5])):  # stored out of order: the batch number decides
            batch = {"labels": [0] * len(part), "data": part.reshape(len(part), -1).numpy()}
            _add_to_tar(tar, f"cifar-10-batches-py/data_batch_{b}", pickle.dumps(batch, protocol=2))
        test = {"data": _images(2, 3, 32).reshape(2, -1).numpy(), "labels": [1, 2]}
        _add_to_tar(tar, "cifar-10-batches-py/test_batch", pickle.dumps(test, protocol=2))
    assert torch.equal(load_images(path, resolution=32, channels=3), x)
    assert torch.equal(load_images(convert_dataset(path, tmp_path / "c.zip")), x)
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        _add_to_tar(tar, "cifar-10-batches-py/data_batch_1", pickle.dumps({"data": os.getcwd}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load .*getcwd"):
        load_images(evil)
    with tarfile.open(evil, "w:gz") as tar:
        batch = pickle.dumps({"data": np.zeros((2, 3072), np.float32)}, protocol=2)
        _add_to_tar(tar, "cifar-10-batches-py/data_batch_1", batch)
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR-10 batch"):
        load_images(evil)


@pytest.mark.skipif(not (datasets.FASHION_MNIST_SYSTEM / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv(datasets.ENV_DATA, raising=False)
    source = resolve_source("fashion-mnist")
    assert source == datasets.FASHION_MNIST_SYSTEM
    x = load_images(source, resolution=28, channels=1)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    # Fashion-MNIST's training-set mean pixel is 0.2860 * 255 = 72.94 (the standard normalisation constant).
    assert abs(x.double().mean().item() - 72.94) < 0.01


# ---------------------------------------------------------------------------------------------- convert


def test_convert_center_crop_and_resize(tmp_path):
    # Non-square images of mixed sizes: center crop then Lanczos resize, as EDM's dataset_tool.
    folder = tmp_path / "src"
    folder.mkdir()
    wide = np.random.randint(0, 256, (6, 10, 3), dtype=np.uint8)
    tall = np.random.randint(0, 256, (9, 4, 3), dtype=np.uint8)
    PIL.Image.fromarray(wide).save(folder / "a.png")
    PIL.Image.fromarray(tall).save(folder / "b.png")
    out = load_images(convert_dataset(folder, tmp_path / "r4.zip", resolution=4))
    assert out.shape == (2, 3, 4, 4)
    expect = np.array(PIL.Image.fromarray(wide[:, 2:8]).resize((4, 4), PIL.Image.LANCZOS))
    assert torch.equal(out[0], torch.from_numpy(expect).permute(2, 0, 1))
    assert torch.equal(out[1], torch.from_numpy(tall[2:6]).permute(2, 0, 1))  # 4x4 crop, no resampling
    grey = _images(3, 1, 8)
    np.save(tmp_path / "g.npy", grey.numpy())
    assert load_images(convert_dataset(tmp_path / "g.npy", tmp_path / "g.zip", resolution=3)).shape == (3, 1, 3, 3)
    with pytest.raises(ValueError, match="resolution="):  # mixed sizes need a resolution
        convert_dataset(folder, tmp_path / "none.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npy", "g.zip", "r4.zip", "src"]


def test_convert_is_atomic(tmp_path, monkeypatch):
    x = _images(700, 1, 4)
    np.save(tmp_path / "x.npy", x.numpy())
    dest = tmp_path / "out.zip"
    dest.write_bytes(b"previous")
    calls = []
    encode = datasets._encode_png

    def failing_encode(img):
        calls.append(1)
        if len(calls) == 300:  # past the first chunk: the temporary zip already holds images
            raise RuntimeError("disk full")
        return encode(img)

    monkeypatch.setattr(datasets, "_encode_png", failing_encode)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_dataset(tmp_path / "x.npy", dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zip", "x.npy"]
    assert dest.read_bytes() == b"previous"
    monkeypatch.setattr(datasets, "_encode_png", encode)
    convert_dataset(tmp_path / "x.npy", dest)
    assert torch.equal(load_images(dest), x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zip", "x.npy"]


@pytest.mark.parametrize("corruption", [NoiseCorruption(0.2), BlurNoiseCorruption(1.5, 0.1)])
def test_convert_corrupted_copy(tmp_path, corruption):
    x = _images(5, 3, 6)
    seed = _seed_value()
    np.save(tmp_path / "x.npy", x.numpy())
    noisy = load_images(convert_dataset(tmp_path / "x.npy", tmp_path / "y.zip", corruption=corruption, seed=seed,
                                        chunk=2))
    y = corruption.corrupt(to_float(x), seed, torch.arange(5))
    assert torch.equal(noisy, to_uint8(y))
    inside = (y > -1) & (y < 1)
    assert (to_float(noisy) - y)[inside].abs().max() <= 0.5 / 127.5 + 1e-6  # quantisation only
    # The loader's noisy=True path serves the copy as is, the clean path reproduces y exactly.
    data = GPUData(noisy, device="cpu", noisy=True, xflip=False)
    yb, index = data.batch(0, 5)
    assert torch.equal(yb, to_float(noisy[index]))
    clean = GPUData(x, device="cpu", corruption=corruption, seed=seed, xflip=False)
    yb, index = clean.batch(0, 5)
    assert torch.equal(yb, y[index])


# ---------------------------------------------------------------------------------------------- resolve


def test_resolve_source(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.ENV_DATA, str(tmp_path))
    (tmp_path / "cifar10.zip").write_bytes(b"")
    (tmp_path / "afhq").mkdir()
    assert resolve_source("cifar10") == tmp_path / "cifar10.zip"
    assert resolve_source("afhq") == tmp_path / "afhq"
    assert resolve_source("ffhq", data=tmp_path / "afhq") == tmp_path / "afhq"
    assert resolve_source(str(tmp_path / "cifar10.zip")) == tmp_path / "cifar10.zip"  # a path, used as is
    with pytest.raises(FileNotFoundError, match="data: .*nope"):
        resolve_source("cifar10", data=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="dataset: expected one of"):
        resolve_source("no-such-dataset")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_missing_dataset_says_what_to_download(tmp_path, monkeypatch, name):
    monkeypatch.setenv(datasets.ENV_DATA, str(tmp_path))
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError) as info:
        resolve_source(name)
    msg = str(info.value)
    assert "$DSD_FAST_DATA" in msg and "--data" in msg and str(tmp_path / name) in msg
    hint = {"fashion-mnist": "apt-get install dataset-fashion-mnist", "cifar10": "cifar-10-python.tar.gz",
            "afhq": "AFHQv2", "ffhq": "FFHQ", "celebahq": "CelebA-HQ"}[name]
    assert hint in msg
    monkeypatch.delenv(datasets.ENV_DATA)
    with pytest.raises(FileNotFoundError, match="DSD_FAST_DATA is not set"):
        resolve_source(name)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path):
    x = _images(2, 3, 6)
    _write_pngs(tmp_path / "ok", x)
    with pytest.raises(ValueError, match="resolution: expected 8x8 images, found 6x6"):
        load_images(tmp_path / "ok", resolution=8)
    with pytest.raises(ValueError, match="channels: expected 1, found 3"):
        load_images(tmp_path / "ok", channels=1)
    with pytest.raises(ValueError, match="max_images"):
        load_images(tmp_path / "ok", max_images=0)
    bad = tmp_path / "bad"
    _write_pngs(bad, x)
    (bad / "zz.png").write_bytes(random.randbytes(64))
    with pytest.raises(ValueError, match="cannot decode image file .*zz.png"):
        load_images(bad)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    buf = io.BytesIO()
    PIL.Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(buf, format="png")
    (truncated / "t.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(ValueError, match="t.png"):
        load_images(truncated)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files found"):
        load_images(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    _write_pngs(mixed, x)
    PIL.Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(mixed / "zz.png")
    with pytest.raises(ValueError, match="zz.png is 5x5x3"):
        load_images(mixed)
    (tmp_path / "rect").mkdir()
    PIL.Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "rect" / "r.png")
    with pytest.raises(ValueError, match="must be square, found 4x6"):
        load_images(tmp_path / "rect")
    PIL.Image.fromarray(np.zeros((6, 6), np.uint16)).save(tmp_path / "ok" / "zz16.png")
    with pytest.raises(ValueError, match="zz16.png is a 'I;16' image"):
        load_images(tmp_path / "ok")


def test_bad_arrays(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 6, 6, 3), np.float32))
    with pytest.raises(ValueError, match="f.npy holds float32 values; expected uint8"):
        load_images(tmp_path / "f.npy")
    np.save(tmp_path / "amb.npy", np.zeros((2, 3, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="NCHW from NHWC"):
        load_images(tmp_path / "amb.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 6, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="holds no images"):
        load_images(tmp_path / "empty.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros(1), b=np.zeros(1))
    with pytest.raises(ValueError, match="expected one named 'x' or 'images'"):
        load_images(tmp_path / "two.npz")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 3, 4, 4) + b"x")
    with pytest.raises(ValueError, match="truncated"):
        load_images(tmp_path / "train-images-idx3-ubyte")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 0))
    with pytest.raises(ValueError, match="not a supported data set"):
        load_images(tmp_path / "t10k-labels-idx1-ubyte")
    (tmp_path / "z.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable zip"):
        load_images(tmp_path / "z.zip")
    with pytest.raises(FileNotFoundError, match="source: .*missing"):
        load_images(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="dest: expected a path ending in .zip"):
        convert_dataset(tmp_path / "f.npy", tmp_path / "out.npz")


# ---------------------------------------------------------------------------------------------- loader


def _epochs(data, batch_size, steps):
    ys, idx = zip(*(data.batch(k, batch_size) for k in range(steps)), strict=True)
    return torch.cat(ys), torch.cat(idx)


def test_epoch_permutations():
    seed, n = _seed_value(), 13
    perms = [epoch_permutation(seed, e, n) for e in range(4)]
    for perm in perms:
        assert torch.equal(perm.sort().values, torch.arange(n))
    assert len({tuple(p.tolist()) for p in perms}) == 4  # 13! orders: a repeat means the epoch is ignored
    assert torch.equal(epoch_permutation(seed, 2, n), perms[2])
    assert not torch.equal(epoch_permutation(seed ^ 1, 0, n), perms[0])
    # Batches run on across epoch ends: positions 0..4n-1 are the concatenated epoch orders.
    data = GPUData(_images(n, 1, 4), device="cpu", seed=seed, xflip=False)
    _, index = _epochs(data, 5, 4 * n // 5)
    assert torch.equal(index, torch.cat(perms)[:len(index)])
    _, index = _epochs(data, 3 * n + 2, 1)  # one batch larger than the data set
    assert torch.equal(index, torch.cat(perms)[:3 * n + 2])


@pytest.mark.parametrize("corruption", [NoiseCorruption(0.3), BlurNoiseCorruption(1.0, 0.2)])
def test_fixed_corruption_per_image(corruption):
    """The issue's test: image i gets the same noise in two epochs, in shuffled order, with another batch size."""
    n, seed = 10, _seed_value()
    x = _images(n, 3, 8)
    data = GPUData(x, device="cpu", corruption=corruption, seed=seed, xflip=False)
    y, index = _epochs(data, 4, 5)  # 20 samples: two epochs of 10, the middle batch straddles them
    first, second = index[:n], index[n:]
    assert not torch.equal(first, second)  # shuffled differently
    y_first, y_second = y[:n][first.argsort()], y[n:][second.argsort()]
    assert torch.equal(y_first, y_second)
    y3, index3 = _epochs(data, 3, 4)  # batch size 3
    assert torch.equal(y3[:n][index3[:n].argsort()], y_first)
    eps = corrupt_noise(seed, torch.arange(n), (3, 8, 8))
    assert torch.allclose(y_first, corruption.A(to_float(x)) + corruption.sigma * eps, atol=1e-6)
    other = GPUData(x, device="cpu", corruption=corruption, seed=seed ^ 1, xflip=False)
    y_other, i_other = _epochs(other, 10, 1)
    assert not torch.allclose(y_other[i_other.argsort()], y_first)
    # Another run (shuffle_seed) sees the same noisy data set in another order.
    run = GPUData(x, device="cpu", corruption=corruption, seed=seed, xflip=False, shuffle_seed=seed ^ 1)
    y_run, i_run = _epochs(run, 10, 1)
    assert not torch.equal(i_run, first)
    assert torch.equal(y_run[i_run.argsort()], y_first)


@pytest.mark.parametrize("b", [1, 3, 7])
def test_world_size_independence(b):
    seed = _seed_value()
    x = _images(11, 1, 5)
    kw = dict(device="cpu", corruption=NoiseCorruption(0.2), seed=seed, xflip=True)
    one, two = GPUData(x, **kw), GPUData(x, **kw)
    for step in (0, 1, 5):
        y, index = one.batch(step, 2 * b)
        shares = [two.batch(step, b, rank=r, world_size=2) for r in (0, 1)]
        assert torch.equal(torch.cat([s[0] for s in shares]), y)
        assert torch.equal(torch.cat([s[1] for s in shares]), index)


def test_xflip():
    seed, n = _seed_value(), 50
    x = _images(n, 1, 4)
    noise = NoiseCorruption(0.5)
    data = GPUData(x, device="cpu", corruption=noise, seed=seed, xflip=True)
    y, index = _epochs(data, 64, 32)
    y_plain = noise.corrupt(to_float(x[index]), seed, index)  # the flip comes after the corruption
    flipped = (y == y_plain.flip(-1)).flatten(1).all(1)
    assert torch.equal(flipped | (y == y_plain).flatten(1).all(1), torch.ones_like(flipped))
    assert abs(flipped.double().mean().item() - 0.5) < 4 * 0.5 / len(flipped) ** 0.5  # 2048 fair coins
    assert torch.equal(flipped, xflip_mask(seed, torch.arange(len(flipped))))
    again, _ = data.batch(3, 64)
    assert torch.equal(again, y[3 * 64:4 * 64])
    assert torch.equal(flipped[:64], xflip_mask(seed, torch.arange(64)))
    off, _ = GPUData(x, device="cpu", corruption=noise, seed=seed, xflip=False).batch(0, 64)
    assert torch.equal(off, y_plain[:64])


def test_loader_properties_and_bad_input():
    x = _images(9, 3, 7)
    data = GPUData(x, device="cpu")
    assert (len(data), data.resolution, data.channels) == (9, 7, 3)
    y, index = data.batch(2, 4)
    assert y.dtype == torch.float32 and y.shape == (4, 3, 7, 7) and index.dtype == torch.int64
    assert y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match="images: expected a non-empty uint8"):
        GPUData(x.float(), device="cpu")
    with pytest.raises(ValueError, match="images: expected square"):
        GPUData(_images(2, 1, 4, 5), device="cpu")
    with pytest.raises(ValueError, match="corruption: expected None when noisy=True"):
        GPUData(x, device="cpu", corruption=NoiseCorruption(0.1), noisy=True)
    with pytest.raises(ValueError, match="seed"):
        GPUData(x, device="cpu", seed=-1)
    for kwargs, name in [(dict(step=-1, batch_size=2), "step"), (dict(step=0, batch_size=0), "batch_size"),
                         (dict(step=0, batch_size=2, rank=2, world_size=2), "rank"),
                         (dict(step=0, batch_size=2, world_size=0), "world_size")]:
        with pytest.raises(ValueError, match=name):
            data.batch(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_cuda_matches_cpu():
    seed = _seed_value()
    x = _images(20, 3, 8)
    kw = dict(corruption=BlurNoiseCorruption(1.0, 0.2), seed=seed)
    y_cpu, i_cpu = GPUData(x, device="cpu", **kw).batch(3, 7)
    y_gpu, i_gpu = GPUData(x, device="cuda", **kw).batch(3, 7)
    assert torch.equal(i_gpu.cpu(), i_cpu)
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-5)
