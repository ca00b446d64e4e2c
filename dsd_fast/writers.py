"""Image outputs of `dsd-fast generate`: a directory of {seed:06d}.png, an EDM dataset zip, or an npz array, each
appearing complete or not at all (a temporary file beside it, renamed when the block succeeds)."""

import contextlib
import json
import os
import tempfile
import zipfile

import numpy as np

from .data.datasets import _archive_name


def png_name(seed):
    return f"{seed:06d}.png"  # EDM generate.py's naming


def output_kind(out, seeds, overwrite=False):
    """'dir', 'zip' or 'npz' from out's suffix (anything but .zip / .npz is a directory). Without overwrite, refuses
    an existing zip/npz file or a directory already holding a PNG of one of these seeds (nothing is touched)."""
    out = os.fspath(out)
    kind = {".zip": "zip", ".npz": "npz"}.get(os.path.splitext(out)[1].lower(), "dir")
    if kind == "dir" and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: expected a directory or a path ending in .zip or .npz, but {out!r} is a file")
    if kind != "dir" and os.path.isdir(out):
        raise ValueError(f"out: expected a {kind} file, but {out!r} is a directory")
    if overwrite:
        return kind
    if kind == "dir" and os.path.isdir(out):
        taken = set(os.listdir(out)).intersection(map(png_name, seeds))
        if taken:
            raise ValueError(f"out: {out!r} already holds {len(taken)} of these images (e.g. {min(taken)}); "
                             f"pass --overwrite to replace them")
    elif kind != "dir" and os.path.exists(out):
        raise ValueError(f"out: {out!r} already exists; pass --overwrite to replace it")
    return kind


@contextlib.contextmanager
def _atomic(path):
    """A temporary file beside path, renamed to path when the block succeeds and removed when it fails."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# Writers: context managers yielding write(seeds, images uint8 [n, H, W, C] numpy); a file output appears only when
# the block completes. encode(images) -> PNG bytes of each image. PNGs are stored uncompressed (the dataset zip's
# _encode_png): lossless, and the default zlib level took 2.4x as long per 64x64 image (measured, 1.5 vs 0.62 ms).
@contextlib.contextmanager
def _dir_writer(out, seeds, hwc, encode):
    os.makedirs(out, exist_ok=True)

    def write(chunk, images):
        for seed, png in zip(chunk, encode(images), strict=True):
            with _atomic(os.path.join(out, png_name(seed))) as tmp, open(tmp, "wb") as f:
                f.write(png)
    yield write


@contextlib.contextmanager
def _zip_writer(out, seeds, hwc, encode):
    """EDM dataset_tool's layout (00000/img00000000.png, ... in seed order; dataset.json with labels null) plus
    the seeds in dataset.json, which EDM's loader ignores."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with _atomic(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        count = [0]

        def write(chunk, images):
            for png in encode(images):
                archive.writestr(_archive_name(count[0]), png)
                count[0] += 1
        yield write
        archive.writestr("dataset.json", json.dumps({"labels": None, "seeds": list(seeds)}))


@contextlib.contextmanager
def _npz_writer(out, seeds, hwc, encode):
    """images uint8 [N, H, W, C] (EDM/ADM's NHWC) and seeds int64 [N], in seed order."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    images, count = np.empty((len(seeds), *hwc), dtype=np.uint8), [0]

    def write(chunk, x):
        images[count[0]:count[0] + len(x)] = x
        count[0] += len(x)
    yield write
    with _atomic(out) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, images=images, seeds=np.asarray(seeds, dtype=np.int64))


WRITERS = {"dir": _dir_writer, "zip": _zip_writer, "npz": _npz_writer}
