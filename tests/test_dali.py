"""The DALI loader (dsd_fast.data.dali): exactly GPUData's batches from zip, folder and array data sets, across
epoch ends, per rank, after a resume; prefetch and stats; clear errors on bad input and without DALI; and
choose_loader. CPU pipelines (device_id=None); tests that build one skip without nvidia-dali."""

import io
import random
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import dsd_fast.data.dali as dali
from dsd_fast.corruption import BlurNoiseCorruption, NoiseCorruption
from dsd_fast.data import GPUData, convert_dataset, load_images


def _images(n, c, r):
    return torch.randint(0, 256, (n, c, r, r), dtype=torch.uint8)


def _png(x, fmt="png", mode=None):
    """uint8 [C, H, W] -> encoded bytes (optionally converted to a PIL mode first)."""
    a = x.permute(1, 2, 0).numpy()
    img = PIL.Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)
    buf = io.BytesIO()
    (img if mode is None else img.convert(mode)).save(buf, format=fmt, **({"quality": 90} if fmt == "jpeg" else {}))
    return buf.getvalue()


def _write_folder(folder, x, fmt="png"):
    """x uint8 [N, C, H, W] -> folder/{sub}/img{i}.{fmt}, nested so the loader recurses."""
    for i, img in enumerate(x):
        path = folder / f"{i // 4:02d}" / f"img{i:03d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(img, fmt))
    return folder


def _write_zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _sources(tmp_path, x):
    """The same images as an EDM zip, a folder of PNGs, an .npz and an .npy."""
    np.savez(tmp_path / "x.npz", x=x.permute(0, 2, 3, 1).numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    return {"zip": convert_dataset(tmp_path / "x.npz", tmp_path / "x.zip"),
            "folder": _write_folder(tmp_path / "pngs", x),
            "npz": tmp_path / "x.npz", "npy": tmp_path / "x.npy"}


def _loader(source, **kw):
    return dali.DALIData(source, device="cpu", **{"num_threads": 1, **kw})


def _assert_same(batches, ref):
    for (y, index), (y0, index0) in zip(batches, ref, strict=True):
        assert torch.equal(index, index0)
        assert torch.equal(y, y0)


@pytest.fixture(scope="module")
def have_dali():
    pytest.importorskip("nvidia.dali")


# ---------------------------------------------------------------------------------------------- choose_loader


def test_choose_loader(monkeypatch):
    monkeypatch.setattr(dali, "dali_available", lambda: True)
    assert dali.choose_loader("auto", 50, 100, 0.5) == (
        "resident", "the uint8 data set (0.00 GB) fits in 0.5 of the free device memory (0.00 GB of 0.00 GB)")
    kind, reason = dali.choose_loader("auto", 60 * 10**9, 100 * 10**9, 0.5)
    assert kind == "dali"
    assert reason == ("the uint8 data set (60.00 GB) exceeds 0.5 of the free device memory (50.00 GB of 100.00 GB): "
                      "streaming it through DALI")
    assert dali.choose_loader("auto", 10**12, None, 0.5)[0] == "resident"  # no accelerator
    assert dali.choose_loader("auto", 100, 100, 1)[0] == "resident"  # fits exactly
    assert dali.choose_loader("resident", 10**12, 1, 0.5) == ("resident", "--loader resident")
    monkeypatch.setattr(dali, "dali_available", lambda: False)
    kind, reason = dali.choose_loader("auto", 60 * 10**9, 100 * 10**9, 0.5)
    assert kind == "resident" and "DALI is not installed" in reason and "dsd-fast[dali]" in reason


@pytest.mark.parametrize("args, match", [
    (("dal", 1, 1, 0.5), r"loader: expected one of \('auto', 'resident', 'dali'\), got 'dal'"),
    (("auto", -1, 1, 0.5), r"dataset_bytes: expected an int >= 0, got -1"),
    (("auto", 1.5, 1, 0.5), r"dataset_bytes: expected an int >= 0, got 1.5"),
    (("auto", 1, -2, 0.5), r"free_device_bytes: expected an int >= 0, got -2"),
    (("auto", 1, 1, 0), r"fraction: expected > 0.0, got 0"),
    (("auto", 1, 1, 1.5), r"fraction: expected a number in \(0, 1\], got 1.5"),
    (("auto", 1, 1, True), r"fraction: expected a finite number > 0.0, got True"),
])
def test_choose_loader_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        dali.choose_loader(*args)


def test_without_dali_a_clear_error(tmp_path, monkeypatch):
    for name in ("nvidia.dali", "nvidia.dali.fn", "nvidia.dali.types"):
        monkeypatch.setitem(sys.modules, name, None)  # import of it raises ImportError
    np.save(tmp_path / "x.npy", _images(3, 1, 4).numpy())
    with pytest.raises(ImportError, match=r"NVIDIA DALI is not installed .*pip install 'dsd-fast\[dali\]' "
                                          r"\(the nvidia-dali-cuda130 wheel"):
        dali.DALIData(tmp_path / "x.npy", batch_size=2)
    with pytest.raises(ImportError, match=r"--loader resident"):
        dali.choose_loader("dali", 1, 1, 0.5)
    assert not dali.dali_available()
    assert dali.choose_loader("auto", 10**12, 10**9, 0.5)[0] == "resident"


# ---------------------------------------------------------------------------------------------- same batches


@pytest.mark.parametrize("c", [1, 3])
def test_same_batches_as_gpudata(tmp_path, have_dali, c):
    """zip, folder, npz, npy: GPUData's (y, index) bit for bit over 2.5 epochs (11 images, batch 4), with the
    fixed noise corruption and x-flips."""
    x = _images(11, c, 6)
    seed, corruption = random.getrandbits(64), NoiseCorruption(0.2)
    ref = GPUData(x, device="cpu", corruption=corruption, seed=seed)
    expected = [ref.batch(k, 4) for k in range(7)]
    for kind, source in _sources(tmp_path, x).items():
        with _loader(source, batch_size=4, corruption=corruption, seed=seed) as loader:
            assert (len(loader), loader.channels, loader.resolution) == (11, c, 6), kind
            _assert_same([loader.batch(k) for k in range(7)], expected)


def test_two_ranks_blur_and_shuffle_seed(tmp_path, have_dali):
    """world_size 2: each rank's loader gives GPUData.batch(k, 3, rank, 2), across epoch ends (global 6 of 7)."""
    x = _images(7, 3, 8)
    seed, shuffle = random.getrandbits(64), random.getrandbits(64)
    corruption = BlurNoiseCorruption(1.0, 0.1)
    ref = GPUData(x, device="cpu", corruption=corruption, seed=seed, shuffle_seed=shuffle)
    source = _sources(tmp_path, x)["zip"]
    for rank in (0, 1):
        loader = _loader(source, batch_size=3, rank=rank, world_size=2, corruption=corruption, seed=seed,
                         shuffle_seed=shuffle)
        _assert_same([next(loader) for _ in range(5)], [ref.batch(k, 3, rank, 2) for k in range(5)])


def test_noisy_data_and_no_flips(tmp_path, have_dali):
    x = _images(5, 1, 4)
    seed = random.getrandbits(64)
    source = _sources(tmp_path, x)["folder"]
    for kw in ({"noisy": True}, {"xflip": False}):
        ref = GPUData(x, device="cpu", seed=seed, **kw)
        loader = _loader(source, batch_size=7, seed=seed, **kw)  # each step spans 2 or 3 epochs of 5
        _assert_same([loader.batch(k) for k in range(4)], [ref.batch(k, 7) for k in range(4)])


def test_resume_restart_and_other_geometry(tmp_path, have_dali):
    """A loader built at step k gives batch k as one that iterated there; an out-of-sequence step restarts the
    stream; another batch size / rank is decoded directly; all equal GPUData's."""
    x = _images(9, 3, 5)
    seed, corruption = random.getrandbits(64), NoiseCorruption(0.3)
    ref = GPUData(x, device="cpu", corruption=corruption, seed=seed)
    source = _sources(tmp_path, x)["zip"]
    k = random.randrange(3, 12)
    resumed = _loader(source, batch_size=4, start_step=k, corruption=corruption, seed=seed)
    _assert_same([resumed.batch(k), resumed.batch(k + 1)], [ref.batch(k, 4), ref.batch(k + 1, 4)])
    _assert_same([resumed.batch(1), resumed.batch(2)], [ref.batch(1, 4), ref.batch(2, 4)])
    assert (resumed.restarts, resumed.step) == (1, 3)
    _assert_same([resumed.batch(0, 6), resumed.batch(2, 2, 1, 3)], [ref.batch(0, 6), ref.batch(2, 2, 1, 3)])
    assert resumed.direct == 2 and resumed.step == 3  # the stream is where it was
    _assert_same([resumed.batch(3)], [ref.batch(3, 4)])
    index = torch.randperm(9)[:4]
    assert torch.equal(resumed.images_at(index), x[index])


def test_modes_and_jpeg(tmp_path, have_dali):
    """Files in the modes DALI decodes as PIL does (1, LA -> grey; P, RGBA, CMYK -> colour) and JPEG: the
    loader's uint8 images equal load_images'."""
    grey, colour = _images(3, 1, 8), _images(4, 3, 8)
    folders = {"grey": {"a.png": _png(grey[0], mode="LA"), "b.png": _png(grey[1], mode="1"),
                        "c.jpg": _png(grey[2], "jpeg")},
               "colour": {"a.png": _png(colour[0], mode="P"), "b.png": _png(colour[1], mode="RGBA"),
                          "c.jpg": _png(colour[2], "jpeg"), "d.jpg": _png(colour[3], "jpeg", mode="CMYK")}}
    for name, files in folders.items():
        folder = tmp_path / name
        folder.mkdir()
        for file, data in files.items():
            (folder / file).write_bytes(data)
        x = load_images(folder)
        loader = _loader(folder, batch_size=len(files), xflip=False)
        y, index = loader.batch(0)
        assert torch.equal(y, GPUData(x, device="cpu", xflip=False).batch(0, len(files))[0]), name
        assert torch.equal(loader.images_at(index), x[index])


@pytest.mark.gpu
def test_cuda_same_batches(tmp_path, have_dali):
    """On the GPU (decoders.image device="mixed"; PNG decodes on DALI's CPU threads, then copies): the batches
    of GPUData on the same device, bit for bit, for a zip and an array set."""
    x = _images(13, 3, 16)
    seed, corruption = random.getrandbits(64), NoiseCorruption(0.2)
    ref = GPUData(x, device="cuda", corruption=corruption, seed=seed)
    sources = _sources(tmp_path, x)
    for kind in ("zip", "npy"):
        loader = dali.DALIData(sources[kind], batch_size=5, device="cuda", corruption=corruption, seed=seed)
        batches = [loader.batch(k) for k in range(6)]
        assert batches[0][0].device.type == "cuda", kind
        _assert_same(batches, [ref.batch(k, 5) for k in range(6)])


# ---------------------------------------------------------------------------------------------- prefetch, stats


def test_prefetch_and_stats(tmp_path, have_dali):
    source = _sources(tmp_path, _images(6, 1, 4))["npy"]
    loader = _loader(source, batch_size=2, prefetch=3)
    assert loader._fed == 0 and loader.stats().images == 0  # the pipeline fills on the first batch
    loader.batch(0)
    assert loader._fed == 3  # steps 1 and 2 are already decoding while step 0 trains
    for k in range(1, 5):
        loader.batch(k)
    assert loader._fed == 7
    stats = loader.stats(reset=True)
    assert stats.images == 10 and 0 < stats.wait_s <= stats.seconds
    assert stats.img_per_s == pytest.approx(10 / stats.seconds) and stats.wait_fraction == pytest.approx(
        stats.wait_s / stats.seconds)
    assert 0 < loader.last_wait_s <= stats.wait_s
    assert loader.stats().images == 0 and loader.stats().seconds == 0.0  # a new window starts at the next batch
    loader.batch(5, 3)  # another geometry: not the stream, not counted
    assert loader.stats().images == 0


def test_dataset_shape(tmp_path, have_dali):
    x = _images(5, 3, 4)
    for kind, source in _sources(tmp_path, x).items():
        assert dali.dataset_shape(source) == (5, 3, 4, 4), kind
        assert dali.dataset_shape(source, max_images=2, resolution=4, channels=3) == (2, 3, 4, 4), kind
    with pytest.raises(ValueError, match="resolution: expected 8x8 images, found 4x4"):
        dali.dataset_shape(tmp_path / "x.zip", resolution=8)


# ---------------------------------------------------------------------------------------------- bad input


def _edm_members(x):
    return {f"00000/img{i:08d}.png": _png(img) for i, img in enumerate(x)}


def test_corrupt_png_names_the_member(tmp_path, have_dali):
    members = _edm_members(_images(6, 3, 4))
    good = members["00000/img00000003.png"]
    cases = {"truncated": good[:len(good) // 2], "garbage": b"not a png" * 8,
             "bad crc": good[:-20] + bytes([good[-20] ^ 0xFF]) + good[-19:]}
    for name, data in cases.items():
        path = _write_zip(tmp_path / f"{name.replace(' ', '_')}.zip", {**members, "00000/img00000003.png": data})
        member = f"{path}:00000/img00000003.png"
        with pytest.raises(ValueError, match=f"source: cannot decode image file {member} "):
            _loader(path, batch_size=2)
        # Unchecked: DALI's decoder fails on the step holding it, and the error still names the member.
        loader = _loader(path, batch_size=2, check=False)
        with pytest.raises(ValueError, match=f"source: cannot decode image file {member} "):
            for k in range(3):
                loader.batch(k)


def test_mixed_sizes_and_channels(tmp_path, have_dali):
    rgb, grey = _images(3, 3, 4), _images(1, 1, 4)
    big = _png(_images(1, 3, 6)[0])
    mixed_res = _write_zip(tmp_path / "res.zip", {**_edm_members(rgb), "00000/img00000003.png": big})
    mixed_c = _write_zip(tmp_path / "c.zip", {**_edm_members(rgb), "00000/img00000003.png": _png(grey[0])})
    with pytest.raises(ValueError, match=rf"source: {mixed_res}:00000/img00000003.png is 6x6x3 \(HxWxC\) but "
                                         rf"{mixed_res}:00000/img00000000.png is 4x4x3; all images must match"):
        _loader(mixed_res, batch_size=2)
    with pytest.raises(ValueError, match=r"img00000003.png is 4x4x1 \(HxWxC\) but .*img00000000.png is 4x4x3"):
        _loader(mixed_c, batch_size=2)
    # Unchecked: found on the step holding it (DALI's decoder would silently turn grey into RGB).
    for path, shape in ((mixed_res, "6x6x3"), (mixed_c, "4x4x1")):
        with pytest.raises(ValueError, match=rf"img00000003.png is {shape} \(HxWxC\) but .*img00000000.png is 4x4x3"):
            _loader(path, batch_size=4, check=False).batch(0)
    with pytest.raises(ValueError, match="resolution: expected 8x8 images, found 4x4"):
        _loader(mixed_c, batch_size=2, resolution=8)
    with pytest.raises(ValueError, match="channels: expected 1, found 3"):
        _loader(mixed_c, batch_size=2, channels=1)


def test_empty_and_unsupported_inputs(tmp_path, have_dali):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "dataset.json").write_text("{}")
    with pytest.raises(ValueError, match=r"source: no image files found in .*empty"):
        _loader(tmp_path / "empty", batch_size=2)
    np.save(tmp_path / "none.npy", np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="holds no images"):
        _loader(tmp_path / "none.npy", batch_size=2)
    gif = _write_zip(tmp_path / "gif.zip", {"a.gif": _png(_images(1, 3, 4)[0], "gif")})
    for check in (True, False):
        with pytest.raises(ValueError, match=r"gif.zip:a.gif is a GIF image in mode 'P'; the DALI loader reads "
                                             r"BMP/JPEG/.*or use --loader resident"):
            _loader(gif, batch_size=1, check=check).batch(0)
    buf = io.BytesIO()
    PIL.Image.fromarray(np.zeros((4, 4), np.uint16)).save(buf, format="png")
    deep = _write_zip(tmp_path / "deep.zip", {"a.png": buf.getvalue()})
    with pytest.raises(ValueError, match=r"deep.zip:a.png is a 'I;16' image; expected 8-bit grey or colour"):
        _loader(deep, batch_size=2)


@pytest.mark.parametrize("kw, match", [
    ({"batch_size": 0}, r"batch_size: expected an int >= 1, got 0"),
    ({"batch_size": 2, "rank": 2, "world_size": 2}, r"rank: expected an int in \[0, 1\], got 2"),
    ({"batch_size": 2, "prefetch": 1}, r"prefetch: expected an int >= 2, got 1"),
    ({"batch_size": 2, "start_step": -1}, r"start_step: expected an int >= 0, got -1"),
    ({"batch_size": 2, "num_threads": 0}, r"num_threads: expected an int >= 1, got 0"),
    ({"batch_size": 2, "noisy": True, "corruption": NoiseCorruption(0.1)}, r"corruption: expected None when noisy"),
    ({"batch_size": 2, "max_images": 0}, r"max_images: expected None or a positive int, got 0"),
])
def test_bad_arguments(tmp_path, have_dali, kw, match):
    np.save(tmp_path / "x.npy", _images(3, 1, 4).numpy())
    with pytest.raises(ValueError, match=match):
        _loader(tmp_path / "x.npy", **kw)
    loader = _loader(tmp_path / "x.npy", batch_size=2)
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 2\], got 3"):
        loader.batch(0, 2, 3, 3)


# ---------------------------------------------------------------------------------------------- in training


def _train_cli(tmp_path, source, name, *flags):
    """A tiny Phase I + Phase II run through `dsd-fast train`; (options.json, Phase I losses, metrics lines)."""
    import json

    from runs import ok

    out = tmp_path / name
    ok("train", "--dataset", source, "--preset", "cpu-tiny", "--batch", 4, "--pretrain-kimg", 0.016,
       "--distill-kimg", 0.008, "--lr-rampup-kimg", 0, "--log-every", 1, "--grid-images", 4, "--sample-steps", 2,
       "--seed", 7, "--outdir", out, *flags)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["phase"] == "pretrain" and "loss" in r]
    return json.loads((out / "options.json").read_text()), losses, lines


def test_train_with_dali_equals_resident(tmp_path, have_dali):
    """`dsd-fast train --loader dali` (the CPU pipeline) runs Phase I and II end to end and trains exactly as the
    resident loader does (same batches, so the same losses); its choice is in options.json, its rate in
    metrics.jsonl. auto on a CPU keeps the data resident and says why."""
    x = torch.nn.functional.interpolate(torch.rand(12, 3, 4, 4), size=32, mode="bilinear")
    source = convert_dataset(_sources(tmp_path, (x * 255).round().to(torch.uint8))["npz"], tmp_path / "d.zip")
    o_dali, dali_losses, lines = _train_cli(tmp_path, source, "dali", "--loader", "dali")
    o_auto, auto_losses, _ = _train_cli(tmp_path, source, "auto")
    assert o_dali["loader_choice"].startswith("dali: --loader dali") and o_auto["loader_choice"].startswith(
        "resident: no accelerator")
    assert len(dali_losses) == 4 and dali_losses == auto_losses
    pretrain = [r for r in lines if r["phase"] == "pretrain" and "loss" in r]
    assert all(r["loader_img_per_s"] > 0 and 0 <= r["loader_wait_fraction"] <= 1 for r in pretrain[1:])


def test_train_dali_not_installed_is_a_usage_error(tmp_path, monkeypatch):
    from runs import invoke

    for name in ("nvidia.dali", "nvidia.dali.fn", "nvidia.dali.types"):
        monkeypatch.setitem(sys.modules, name, None)
    np.save(tmp_path / "x.npy", _images(8, 3, 32).numpy())
    r = invoke("pretrain", "--dataset", tmp_path / "x.npy", "--preset", "cpu-tiny", "--loader", "dali",
               "--outdir", tmp_path / "run")
    assert r.exit_code == 1 and "pip install 'dsd-fast[dali]'" in r.output, r.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- DALIImages


@pytest.mark.parametrize("c", [1, 3])
def test_dali_images_chunks_equal_load_images(tmp_path, have_dali, c):
    """Any index chunks (contiguous, strided, out of order, a short last one), head(n) and take(index) give exactly
    load_images' images, for zip, folder, npz and npy."""
    x = _images(11, c, 8)
    perm = torch.randperm(11)
    layouts = [torch.arange(11).split(4), torch.arange(1, 11, 2).split(2), perm.split(3), [torch.tensor([5])]]
    for kind, source in _sources(tmp_path, x).items():
        ref = load_images(source)
        assert torch.equal(ref, x), kind
        with dali.DALIImages(source, device="cpu", batch_size=4, num_threads=1) as images:
            assert len(images) == 11 and images.shape == tuple(x.shape)
            for chunks in layouts:
                got = list(images.batches(chunks))
                assert len(got) == len(chunks), kind
                for i, b in zip(chunks, got, strict=True):
                    assert b.dtype == torch.uint8 and torch.equal(b, x[i]), (kind, i)
            head = images.head(6)
            assert head.shape == (6, c, 8, 8) and len(images) == 11
            assert torch.equal(torch.cat(list(head.batches(torch.arange(6).split(4)))), x[:6])
            assert torch.equal(images.take(perm[:5]), x[perm[:5]])
            with pytest.raises(IndexError, match="chunks"):
                list(head.batches([torch.tensor([6])]))
            with pytest.raises(ValueError, match="chunks: expected chunks of 1..4"):
                list(images.batches([torch.arange(5)]))
            with pytest.raises(ValueError, match="n: "):
                images.head(12)


def test_dali_images_corrupt_png_names_the_member(tmp_path, have_dali):
    """A member that fails to decode mid-stream is named (check=False skips the scan, so DALI meets it first)."""
    x = _images(6, 3, 8)
    members = _edm_members(x)
    name = sorted(n for n in members if n.endswith(".png"))[4]
    members[name] = members[name][:40]
    source = _write_zip(tmp_path / "bad.zip", members)
    with pytest.raises(ValueError, match="bad.zip"):
        dali.DALIImages(source, device="cpu", num_threads=1)
    with dali.DALIImages(source, device="cpu", batch_size=2, num_threads=1, check=False) as images:
        with pytest.raises(ValueError, match=f"source: cannot decode image file {source}:{name} "):
            list(images.batches(torch.arange(6).split(2)))


@pytest.mark.gpu
def test_cuda_dali_images(tmp_path, have_dali):
    """On the GPU: DALIImages' chunks land on the device, equal to load_images' images, for a zip and an array."""
    x = _images(13, 3, 16)
    sources = _sources(tmp_path, x)
    chunks = torch.randperm(13).split(5)
    for kind in ("zip", "npy"):
        with dali.DALIImages(sources[kind], device="cuda", batch_size=5) as images:
            got = list(images.batches(chunks))
        assert all(b.device.type == "cuda" for b in got), kind
        for i, b in zip(chunks, got, strict=True):
            assert torch.equal(b.cpu(), x[i]), (kind, i)
