"""Image data sets -> uint8 NCHW tensors, and EDM-format dataset zips.

Formats read by load_images and convert_dataset (order is deterministic: sorted names):
  EDM zip or folder of images  any PIL format, recursive, sorted by relative path; dataset.json (labels)
                               is ignored. Modes L and RGB are kept; 1/LA become L; P/RGBA/CMYK/... become
                               RGB (alpha dropped); 16-bit and float images are rejected.
  .npz / .npy                  uint8 arrays NHWC, NCHW or NHW (grey); .npz key 'x', 'images' or its only
                               array. Float arrays are rejected: the range convention would be a guess.
  idx / idx.gz                 Fashion-MNIST (or MNIST) idx3-ubyte files, or a directory holding
                               train-images-idx3-ubyte[.gz] (the 60k training split).
  .tar.gz / .tgz               the CIFAR-10 python tarball (cifar-10-python.tar.gz): the 50k training images
                               in EDM dataset_tool's order (data_batch_1 .. 5).
Images must be square with 1 or 3 channels; convert_dataset center-crops and resizes anything else.
"""

import codecs
import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL.Image
import torch

ENV_DATA = "DSD_FAST_DATA"
FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
IDX_TRAIN_IMAGES = ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")
_CONVERT = ("then convert it: python -c \"from dsd_fast.data import convert_dataset; "
            "convert_dataset('{src}', '$DSD_FAST_DATA/{name}.zip', resolution={res})\" "
            "(or NVlabs/edm's dataset_tool.py --source={src} --dest={name}.zip --resolution={res}x{res})")
# What to download for each data set name (the network presets of the same name set the resolution).
DATASETS = {
    "fashion-mnist": "apt-get install dataset-fashion-mnist (Debian; installs /usr/share/datasets/fashion-mnist), "
                     "or download train-images-idx3-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist "
                     "into $DSD_FAST_DATA/fashion-mnist/ (no conversion needed)",
    "cifar10": "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (it loads as is: save it as "
               "$DSD_FAST_DATA/cifar10.tar.gz; or build EDM's zip with NVlabs/edm's dataset_tool.py "
               "--source=cifar-10-python.tar.gz --dest=cifar10.zip)",
    "afhq": "download AFHQv2 (https://github.com/clovaai/stargan-v2, afhq_v2) to downloads/afhqv2, "
            + _CONVERT.format(src="downloads/afhqv2", name="afhq", res=64),
    "ffhq": "download FFHQ images1024x1024 (https://github.com/NVlabs/ffhq-dataset) to downloads/ffhq, "
            + _CONVERT.format(src="downloads/ffhq", name="ffhq", res=64),
    "celebahq": "download CelebA-HQ (https://github.com/tkarras/progressive_growing_of_gans) as images to "
                "downloads/celebahq, "
                + _CONVERT.format(src="downloads/celebahq", name="celebahq", res=64),
}
DATA_SUFFIXES = ("", ".zip", ".npz", ".npy", ".tar.gz")  # looked for as $DSD_FAST_DATA/<name><suffix>
_ARRAY_KINDS = ("npz", "npy", "idx", "idx-dir", "cifar")
_KEEP_MODES = {"L": "L", "RGB": "RGB", "1": "L", "LA": "L", "La": "L", "P": "RGB", "PA": "RGB", "RGBA": "RGB",
               "RGBa": "RGB", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


def to_float(images):
    """uint8 [0, 255] -> float32 [-1, 1]: x = u/127.5 - 1 (the one conversion every path uses)."""
    return images.to(torch.float32) / 127.5 - 1


def to_uint8(x):
    """float [-1, 1] -> uint8, rounded and clipped (values outside [-1, 1] saturate)."""
    return (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)


def resolve_source(dataset, data=None):
    """Where the images of `dataset` are: `data` if given, else $DSD_FAST_DATA/<name>[.zip|.npz|.npy|.tar.gz],
    else (fashion-mnist only) the Debian package's directory. A dataset that is not a known name is a path."""
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"data: {path} does not exist")
        return path
    if dataset not in DATASETS:
        path = Path(dataset)
        if not path.exists():
            raise FileNotFoundError(f"dataset: expected one of {sorted(DATASETS)} or an existing path, "
                                    f"got {dataset!r}")
        return path
    root = os.environ.get(ENV_DATA)
    candidates = [Path(root) / f"{dataset}{suffix}" for suffix in DATA_SUFFIXES] if root else []
    if dataset == "fashion-mnist":
        candidates.append(FASHION_MNIST_SYSTEM)
    for path in candidates:
        if path.exists():
            return path
    looked = [f"looked at {', '.join(str(p) for p in candidates)}"] if candidates else []
    looked += [] if root else [f"${ENV_DATA} is not set"]
    raise FileNotFoundError(
        f"dataset {dataset!r}: no data found ({'; '.join(looked)}). To get it: {DATASETS[dataset]}. "
        f"Put it at ${ENV_DATA}/{dataset} (a directory) or ${ENV_DATA}/{dataset}.zip / .npz, "
        f"or pass its path with --data PATH.")


def _image_extensions():
    PIL.Image.init()
    return {ext.lower() for ext in PIL.Image.registered_extensions()}


def _kind(source):
    if source.is_dir():
        return "idx-dir" if any((source / name).is_file() for name in IDX_TRAIN_IMAGES) else "folder"
    if not source.is_file():
        raise FileNotFoundError(f"source: {source} does not exist")
    name = source.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".npy"):
        return "npy"
    if "idx3-ubyte" in name or name.endswith((".idx", ".idx.gz")):
        return "idx"
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return "cifar"
    raise ValueError(f"source: {source} is not a supported data set (expected a directory of images or of "
                     f"idx files, an EDM .zip, a .npz/.npy uint8 array, an idx3-ubyte[.gz] file or the CIFAR-10 "
                     f"python tarball)")


def _read_idx(path):
    """An idx3-ubyte file (optionally gzipped) -> uint8 [N, H, W, 1]."""
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
        data = f.read()
    if len(data) < 16 or data[:3] != b"\x00\x00\x08" or data[3] != 3:
        raise ValueError(f"source: {path} is not an idx3-ubyte file (expected magic 0x00000803, "
                         f"got {data[:4].hex() or 'an empty file'})")
    n, h, w = struct.unpack(">3I", data[4:16])
    if len(data) - 16 != n * h * w:
        raise ValueError(f"source: {path} is truncated: header says {n}x{h}x{w} = {n * h * w} bytes of "
                         f"pixels, found {len(data) - 16}")
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, h, w, 1)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles: allow only what a dict of numpy arrays needs (a pickle from an
    untrusted download must not import and call arbitrary functions)."""

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
               ("numpy.core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
               ("numpy._core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0]}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return self.ALLOWED[module, name]


def _read_cifar(path):
    """The CIFAR-10 python tarball -> uint8 [50000, 32, 32, 3], data_batch_1 .. 5 in order (as EDM)."""
    try:
        with tarfile.open(path) as tar:
            members = sorted((m for m in tar.getmembers() if os.path.basename(m.name).startswith("data_batch_")),
                             key=lambda m: os.path.basename(m.name))
            if not members:
                raise ValueError(f"source: {path} holds no data_batch_* members; expected the CIFAR-10 python "
                                 f"tarball (cifar-10-python.tar.gz)")
            batches = [_CifarUnpickler(tar.extractfile(m), encoding="latin1").load()["data"] for m in members]
    except (tarfile.TarError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as e:
        raise ValueError(f"source: cannot read {path} as the CIFAR-10 python tarball ({type(e).__name__}: {e})") from e
    for m, x in zip(members, batches, strict=True):
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3 * 32 * 32):
            raise ValueError(f"source: {path}:{m.name} is not a CIFAR-10 batch (expected 'data' uint8 [n, 3072])")
    return np.concatenate(batches).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _to_nhwc(x, label):
    if x.dtype != np.uint8:
        raise ValueError(f"source: {label} holds {x.dtype} values; expected uint8 images in [0, 255] "
                         f"(from floats x in [-1, 1]: ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8))")
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise ValueError(f"source: {label} has shape {x.shape}; expected NHWC, NCHW or NHW")
    nchw, nhwc = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
    if nchw == nhwc:
        raise ValueError(f"source: {label} has shape {x.shape}; cannot tell NCHW from NHWC (expected 1 or 3 "
                         f"channels on exactly one of axes 1 and 3)")
    return x.transpose(0, 2, 3, 1) if nchw else x


def _read_array(source, kind):
    """An array data set -> (uint8 [N, H, W, C] numpy array, label for messages)."""
    if kind == "idx-dir":
        source = next(source / name for name in IDX_TRAIN_IMAGES if (source / name).is_file())
        kind = "idx"
    if kind == "idx":
        return _read_idx(source), str(source)
    if kind == "cifar":
        return _read_cifar(source), str(source)
    if kind == "npy":
        return _to_nhwc(np.load(source, mmap_mode="r", allow_pickle=False), str(source)), str(source)
    with np.load(source, allow_pickle=False) as f:
        keys = list(f.files)
        key = next((k for k in ("x", "images") if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(f"source: {source} holds arrays {keys}; expected one named 'x' or 'images', "
                             f"or a single array")
        label = f"{source}[{key!r}]"
        return _to_nhwc(f[key], label), label


@contextmanager
def _image_entries(source, kind):
    """Image files of a folder or zip, sorted by name: a list of (label, read() -> bytes)."""
    extensions = _image_extensions()
    if kind == "folder":
        files = sorted((p for p in source.rglob("*") if p.suffix.lower() in extensions and p.is_file()),
                       key=lambda p: p.relative_to(source).as_posix())
        yield [(str(p), p.read_bytes) for p in files]
        return
    try:
        archive = zipfile.ZipFile(source)
    except zipfile.BadZipFile as e:
        raise ValueError(f"source: {source} is not a readable zip file ({e})") from e
    with archive:
        names = sorted(n for n in archive.namelist() if os.path.splitext(n)[1].lower() in extensions)
        yield [(f"{source}:{n}", lambda n=n: archive.read(n)) for n in names]


def _decode(label, data):
    """Encoded image bytes -> uint8 [H, W, C] (C = 1 or 3)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = _KEEP_MODES.get(img.mode)
            if mode is not None:
                x = np.array(img if img.mode == mode else img.convert(mode))  # a writable copy
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable / truncated files
        raise ValueError(f"source: cannot decode image file {label} ({type(e).__name__}: {e})") from e
    if mode is None:
        raise ValueError(f"source: {label} is a {img.mode!r} image; expected 8-bit grey or colour")
    return x if x.ndim == 3 else x[..., None]


def _iter_images(source, max_images=None):
    """(label, uint8 [H, W, C]) for every image of source, in the data set's order."""
    kind = _kind(source)
    if kind in _ARRAY_KINDS:
        x, label = _read_array(source, kind)
        for i in range(len(x) if max_images is None else min(len(x), max_images)):
            yield f"{label}[{i}]", np.asarray(x[i])
        return
    with _image_entries(source, kind) as entries:
        for label, read in entries[:max_images]:
            yield label, _decode(label, read())


def _check_count(value, name):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}: expected None or a positive int, got {value!r}")


def _check_shape(label, shape, resolution, channels):
    H, W, C = shape
    if resolution is not None and (H, W) != (resolution, resolution):
        raise ValueError(f"resolution: expected {resolution}x{resolution} images, found {H}x{W} in {label} "
                         f"(convert_dataset(..., resolution={resolution}) center-crops and resizes)")
    if H != W:
        raise ValueError(f"source: images must be square, found {H}x{W} in {label} "
                         f"(convert_dataset(..., resolution=R) center-crops and resizes)")
    if C not in (1, 3):
        raise ValueError(f"source: expected 1 or 3 channels, found {C} in {label}")
    if channels is not None and C != channels:
        raise ValueError(f"channels: expected {channels}, found {C} in {label}")


def load_images(source, *, resolution=None, channels=None, max_images=None):
    """All images of source (first max_images in order) as a uint8 [N, C, H, W] CPU tensor.

    resolution / channels, if given, are checked (a mismatch raises, nothing is resized: use
    convert_dataset for that). Every image must have the first one's size and channels."""
    source = Path(source)
    for value, name in ((resolution, "resolution"), (channels, "channels"), (max_images, "max_images")):
        _check_count(value, name)
    kind = _kind(source)
    if kind in _ARRAY_KINDS:
        x, label = _read_array(source, kind)
        x = x[:max_images]
        if len(x) == 0:
            raise ValueError(f"source: {label} holds no images")
        _check_shape(label, x.shape[1:], resolution, channels)
        return torch.from_numpy(np.array(x.transpose(0, 3, 1, 2), order="C"))  # a copy: x may be read-only
    with _image_entries(source, kind) as entries:
        entries = entries[:max_images]
        if not entries:
            raise ValueError(f"source: no image files found in {source} (looked for .png, .jpg, ... "
                             f"every format PIL reads)")
        first_label, read = entries[0]
        first = _decode(first_label, read())
        _check_shape(first_label, first.shape, resolution, channels)
        out = torch.empty((len(entries), first.shape[2], *first.shape[:2]), dtype=torch.uint8)
        out[0] = torch.from_numpy(first).permute(2, 0, 1)
        for i, (label, read) in enumerate(entries[1:], start=1):
            x = _decode(label, read())
            if x.shape != first.shape:
                raise ValueError(f"source: {label} is {x.shape[0]}x{x.shape[1]}x{x.shape[2]} (HxWxC) but "
                                 f"{first_label} is {first.shape[0]}x{first.shape[1]}x{first.shape[2]}; all "
                                 f"images must match (convert_dataset(..., resolution=R) unifies sizes)")
            out[i] = torch.from_numpy(x).permute(2, 0, 1)
    return out


def center_crop(x, resolution=None):
    """uint8 [H, W, C] -> the central square, resized to resolution (PIL Lanczos) unless it is that size
    already: EDM dataset_tool's 'center-crop' transform, keeping the channel count."""
    H, W = x.shape[:2]
    c = min(H, W)
    x = x[(H - c) // 2:(H + c) // 2, (W - c) // 2:(W + c) // 2]
    if resolution is None or c == resolution:
        return x
    img = PIL.Image.fromarray(np.ascontiguousarray(x[..., 0] if x.shape[2] == 1 else x))
    return np.asarray(img.resize((resolution, resolution), PIL.Image.LANCZOS)).reshape(resolution, resolution, -1)


def _encode_png(x):
    buf = io.BytesIO()
    PIL.Image.fromarray(x[..., 0] if x.shape[2] == 1 else x).save(buf, format="png", compress_level=0,
                                                                 optimize=False)
    return buf.getvalue()


def _archive_name(i):
    s = f"{i:08d}"
    return f"{s[:5]}/img{s}.png"  # EDM's layout: folders of 1000 images


def _write_chunk(archive, chunk, start, corruption, seed):
    if corruption is not None:
        x = to_float(torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2))
        index = torch.arange(start, start + len(chunk), dtype=torch.int64)
        chunk = to_uint8(corruption.corrupt(x, seed, index)).permute(0, 2, 3, 1).numpy()
    for i, x in enumerate(chunk):
        archive.writestr(_archive_name(start + i), _encode_png(x))


def convert_dataset(source, dest, *, resolution=None, corruption=None, seed=0, max_images=None, chunk=256):
    """Write source's images to an EDM-format zip at dest (PNGs 00000/img00000000.png, ..., and
    dataset.json with "labels": null), each center-cropped to a square and resized to resolution.

    With a corruption, writes the FIXED corrupted copy y_i = corruption.corrupt(x_i, seed, i) (i = position
    in dest) instead, quantised to uint8: rounding moves values by <= 0.5/127.5 and values outside [-1, 1]
    are clipped (at sigma = 0.2 about half the noise of a black pixel is cut off), so the copy is a lossy,
    saturating observation (like a real camera's), not y itself. Training on clean data with the corruption
    applied on the fly (GPUData) never quantises. Atomic: written to a temporary file beside dest, then
    renamed; on error nothing is left behind and an existing dest is untouched."""
    source, dest = Path(source), Path(dest)
    if dest.suffix.lower() != ".zip":
        raise ValueError(f"dest: expected a path ending in .zip, got {dest}")
    if not dest.parent.is_dir():
        raise ValueError(f"dest: directory {dest.parent} does not exist")
    for value, name in ((resolution, "resolution"), (max_images, "max_images"), (chunk, "chunk")):
        _check_count(value, name)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            n, pending, first = 0, [], None
            for label, x in _iter_images(source, max_images):
                x = center_crop(x, resolution)
                if first is None:
                    _check_shape(label, x.shape, resolution, None)
                    first = (label, x.shape)
                elif x.shape != first[1]:
                    raise ValueError(f"source: {label} gives a {x.shape} (HxWxC) image but {first[0]} gives "
                                     f"{first[1]}; pass resolution= to resize every image to one size")
                pending.append(x)
                if len(pending) == chunk:
                    _write_chunk(archive, pending, n, corruption, seed)
                    n, pending = n + len(pending), []
            if pending:
                _write_chunk(archive, pending, n, corruption, seed)
                n += len(pending)
            if n == 0:
                raise ValueError(f"source: no images found in {source}")
            archive.writestr("dataset.json", json.dumps({"labels": None}))
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise
    return dest
