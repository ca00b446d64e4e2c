"""Streaming training data through NVIDIA DALI, for data sets that do not fit on the device.

DALIData(source, batch_size=..., rank=..., world_size=...).batch(step) returns exactly GPUData.batch's (y, index)
for the same data set, seeds and step: the same samples (epoch_permutation, the rank's contiguous share), the same
fixed corruption (corruption.corrupt keyed by image index, our Philox: DALI's RNG follows batch position, not
sample identity, so DALI draws no noise) and the same x-flips (xflip_mask, applied after the corruption). DALI's
part: read each step's files (fn.external_source in batch mode, fed in our order), decode them
(fn.decoders.image; "mixed" on a GPU, "cpu" without one), HWC -> CHW, and prefetch (prefetch_queue_depth >= 2):
step k + 1 decodes while step k trains. Arrays (.npz/.npy/idx/CIFAR) are fed as uint8 slices, nothing decoded.

The stream serves consecutive steps of one (batch_size, rank, world_size); another step of that geometry restarts
it there (a resumed run builds its loader at the resume step: start_step); another geometry (e.g. the data grid's
batch(0, 64)) is decoded directly by PIL, slowly, with the same result. Bitwise equality with GPUData holds for
the formats and modes the scan admits (each compared with PIL on DALI's CPU decoder: PNG, BMP, TIFF, PPM/PGM,
lossless WebP, JPEG); JPEG through nvJPEG (device="mixed") may differ from PIL by a level.

choose_loader picks "resident" (GPUData) or "dali" for --loader auto|resident|dali. DALI is optional:
pip install 'dsd-fast[dali]' (nvidia-dali-cuda130).
"""

import collections
import contextlib
import dataclasses
import io
import os
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from dsd_fast import checks

from .datasets import (
    _ARRAY_KINDS,
    _KEEP_MODES,
    _check_count,
    _check_shape,
    _decode,
    _image_entries,
    _kind,
    _read_array,
    to_float,
)
from .loader import epoch_permutation, xflip_mask

LOADERS = ("auto", "resident", "dali")
INSTALL = "pip install 'dsd-fast[dali]' (the nvidia-dali-cuda130 wheel, for CUDA 13)"
# PIL formats that fn.decoders.image reads (DALI 2.4 reads no GIF), and PIL modes whose DALI decode equals
# load_images' (PIL decode + convert), each compared on DALI's CPU decoder.
DALI_FORMATS = ("BMP", "JPEG", "JPEG2000", "PNG", "PPM", "TIFF", "WEBP")
DALI_MODES = ("1", "CMYK", "L", "LA", "P", "RGB", "RGBA")


def _import_dali():
    """The nvidia.dali package, or an ImportError saying how to install it."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn
        import nvidia.dali.types  # noqa: F401 (used as dali.fn, dali.types)
    except ImportError as e:
        raise ImportError(f"loader 'dali': NVIDIA DALI is not installed ({e}). Install it with {INSTALL}, "
                          f"or use the GPU-resident loader (--loader resident)") from e
    return dali


def dali_available():
    """Whether the DALI loader can be built here (nvidia.dali imports)."""
    try:
        _import_dali()
    except ImportError:
        return False
    return True


def _gb(n):
    return f"{n / 1e9:.2f} GB"


def choose_loader(kind, dataset_bytes, free_device_bytes, fraction=0.5):
    """("resident" | "dali", reason) for --loader kind. auto: resident when the uint8 set (dataset_bytes) fits in
    `fraction` of the free device memory (free_device_bytes; None: no accelerator, the set stays in host memory),
    else DALI, but never DALI when it is not installed. dali: DALI, or the install error."""
    checks.choice("loader", kind, LOADERS)
    dataset_bytes = checks.integer("dataset_bytes", dataset_bytes, 0)
    if free_device_bytes is not None:
        free_device_bytes = checks.integer("free_device_bytes", free_device_bytes, 0)
    if checks.number("fraction", fraction, 0.0, strict=True) > 1:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
    if kind == "resident":
        return "resident", "--loader resident"
    if kind == "dali":
        _import_dali()
        return "dali", "--loader dali"
    if free_device_bytes is None:
        return "resident", "no accelerator: the data set stays in host memory"
    budget = fraction * free_device_bytes
    size = f"the uint8 data set ({_gb(dataset_bytes)})"
    room = f"{fraction:g} of the free device memory ({_gb(budget)} of {_gb(free_device_bytes)})"
    if dataset_bytes <= budget:
        return "resident", f"{size} fits in {room}"
    if not dali_available():
        return "resident", f"{size} exceeds {room}, but DALI is not installed ({INSTALL}): trying resident"
    return "dali", f"{size} exceeds {room}: streaming it through DALI"


# ---------------------------------------------------------------------------------------------- image sets


def _header(label, data):
    """(H, W, C) of an encoded image that DALI decodes as load_images does. PIL's verify() checks a PNG's chunk
    CRCs and end marker without inflating it (27 us per 32x32 PNG, 66 us per 256x256, against 61 and 1162 us to
    decode; measured on 2 CPU cores); for JPEG it checks nothing past the header."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            fmt, mode, (W, H) = img.format, img.mode, img.size
            img.verify()
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable / truncated files
        raise ValueError(f"source: cannot decode image file {label} ({type(e).__name__}: {e})") from e
    if mode not in _KEEP_MODES:
        raise ValueError(f"source: {label} is a {mode!r} image; expected 8-bit grey or colour")
    if fmt not in DALI_FORMATS or mode not in DALI_MODES:
        raise ValueError(f"source: {label} is a {fmt} image in mode {mode!r}; the DALI loader reads "
                         f"{'/'.join(DALI_FORMATS)} in modes {', '.join(DALI_MODES)} (convert_dataset writes "
                         f"PNGs it reads), or use --loader resident")
    return H, W, 1 if _KEEP_MODES[mode] == "L" else 3


def _mismatch(label, shape, first_label, first):
    return ValueError(f"source: {label} is {shape[0]}x{shape[1]}x{shape[2]} (HxWxC) but {first_label} is "
                      f"{first[0]}x{first[1]}x{first[2]}; all images must match (convert_dataset(..., "
                      f"resolution=R) unifies sizes)")


class _EncodedSet:
    """A zip or folder of image files in load_images' order: encoded bytes for DALI, PIL for direct reads."""

    encoded = True

    def __init__(self, source, kind, resolution, channels, max_images, check):
        self._files = contextlib.ExitStack()  # the zip stays open while the loader reads it
        try:
            self.entries = self._files.enter_context(_image_entries(source, kind))[:max_images]
            if not self.entries:
                raise ValueError(f"source: no image files found in {source} (looked for .png, .jpg, ... every "
                                 f"format PIL reads)")
            self._scan(resolution, channels, check)
        except BaseException:
            self.close()
            raise

    def _scan(self, resolution, channels, check):
        label, read = self.entries[0]
        self.shape = _header(label, read())
        _check_shape(label, self.shape, resolution, channels)
        if check:
            self.check(range(1, len(self)), decode=False)

    def check(self, index, decode=True):
        """The scan's checks on images `index` (and PIL's decode): raises naming the first bad one."""
        for i in index:
            label, read = self.entries[i]
            data = read()
            shape = _header(label, data)
            if shape != self.shape:
                raise _mismatch(label, shape, self.entries[0][0], self.shape)
            if decode:
                _decode(label, data)

    def __len__(self):
        return len(self.entries)

    def feed(self, index):
        """external_source's batch for images `index` (int64 [B]): their encoded bytes."""
        return [np.frombuffer(self.entries[i][1](), np.uint8) for i in index.tolist()]

    def decode(self, index):
        """uint8 [B, C, H, W] of images `index`, decoded by PIL (load_images' decode)."""
        out = torch.empty((len(index), self.shape[2], *self.shape[:2]), dtype=torch.uint8)
        for j, i in enumerate(index.tolist()):
            label, read = self.entries[i]
            x = _decode(label, read())
            if x.shape != self.shape:
                raise _mismatch(label, x.shape, self.entries[0][0], self.shape)
            out[j] = torch.from_numpy(x).permute(2, 0, 1)
        return out

    def close(self):
        self._files.close()


class _ArraySet:
    """An array data set (npz, npy memory-mapped, idx, CIFAR-10): uint8 [N, H, W, C] slices, nothing to decode."""

    encoded = False

    def __init__(self, source, kind, resolution, channels, max_images):
        x, label = _read_array(source, kind)
        self.x = x[:max_images]
        if len(self.x) == 0:
            raise ValueError(f"source: {label} holds no images")
        _check_shape(label, self.x.shape[1:], resolution, channels)
        self.shape = self.x.shape[1:]

    def __len__(self):
        return len(self.x)

    def feed(self, index):
        return np.ascontiguousarray(self.x[index.numpy()])

    def decode(self, index):
        return torch.from_numpy(self.feed(index).transpose(0, 3, 1, 2).copy())

    def check(self, index):
        pass  # uint8 arrays of one shape: nothing can be wrong with one image

    def close(self):
        pass


def _open(source, resolution, channels, max_images, check):
    for value, name in ((resolution, "resolution"), (channels, "channels"), (max_images, "max_images")):
        _check_count(value, name)
    kind = _kind(source)
    if kind in _ARRAY_KINDS:
        return _ArraySet(source, kind, resolution, channels, max_images)
    return _EncodedSet(source, kind, resolution, channels, max_images, check)


def dataset_shape(source, *, resolution=None, channels=None, max_images=None):
    """(N, C, H, W) of source's images without decoding them (for choose_loader: N*C*H*W uint8 bytes). Image
    files: their count and the first one's header; arrays: their shape (an .npz is read whole)."""
    images = _open(Path(source), resolution, channels, max_images, check=False)
    images.close()
    H, W, C = images.shape
    return len(images), C, H, W


def _pipeline(dali, images, feed, *, batch_size, num_threads, device, prefetch):
    """A built DALI pipeline over `images` (an _EncodedSet or _ArraySet): each run() takes feed()'s next batch
    (external_source, batch mode: a shorter batch stays short), decodes it on `device` ("mixed" on a GPU, "cpu"
    without one) and returns uint8 CHW, plus the files' own shapes for encoded images."""
    fn, types = dali.fn, dali.types
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()

    @dali.pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                       prefetch_queue_depth=prefetch, exec_dynamic=True)
    def pipeline():
        x = fn.external_source(source=feed, batch=True, dtype=types.UINT8,
                               ndim=1 if images.encoded else 3, layout=None if images.encoded else "HWC")
        if not images.encoded:
            return fn.transpose(x if device_id is None else x.gpu(), perm=[2, 0, 1], output_layout="CHW")
        # Each file's own H, W, C: the decoder converts grey to RGB and back without a word.
        shape = fn.peek_image_shape(x, image_type=types.ANY_DATA, adjust_orientation=False)
        # adjust_orientation off: load_images ignores EXIF rotation. jpeg_fancy_upsampling: nvJPEG upsamples
        # chroma as libjpeg-turbo (PIL) does, not its own way.
        x = fn.decoders.image(x, device="cpu" if device_id is None else "mixed",
                              output_type=types.GRAY if images.shape[2] == 1 else types.RGB,
                              adjust_orientation=False, jpeg_fancy_upsampling=True)
        return fn.transpose(x, perm=[2, 0, 1], output_layout="CHW"), shape

    pipe = pipeline()
    pipe.build()
    return pipe


def _same_shapes(expected, shape):
    """Whether the files' own shapes (int64 [B, 3], HWC; C = 2 is grey + alpha, 4 colour + alpha or CMYK) are
    `expected` (H, W, C)."""
    H, W, C = expected
    return bool(((shape[:, 0] == H) & (shape[:, 1] == W) & ((shape[:, 2] <= 2) == (C == 1))).all())


def _failure(images, fed, what, source, error):
    """A failed pipeline run: raises the scan's / PIL's ValueError naming the bad image among the fed index
    tensors, else returns DALI's error as a RuntimeError naming `what` (the batches in flight)."""
    for index in fed:
        images.check(index.tolist())
    return RuntimeError(f"DALI pipeline failed at {what} of {source}: {error}")


def _output(images, out, shape, index, device, what, source):
    """A pipeline run's uint8 [B, C, H, W] torch tensor on device, after checking the files' own shapes (what:
    the batch, for the error)."""
    if shape and not _same_shapes(images.shape, np.array(shape[0].as_tensor())):
        images.check(index.tolist())
        raise RuntimeError(f"{what}: DALI found images of another shape than {images.shape} (HxWxC) among "
                           f"{index.tolist()} of {source}, PIL none")
    tensor = out.as_tensor()
    if device.type != "cuda":
        return torch.from_dlpack(tensor)
    with torch.cuda.device(device):  # the DLPack handshake orders torch's stream after DALI's
        return torch.from_dlpack(tensor)



# ---------------------------------------------------------------------------------------------- the loader


class _Order:
    """GPUData.batch's sample arithmetic, on the CPU: positions p = (step * world_size + rank) * batch_size + j
    of rank's share of a step, and their images through the epoch permutations of shuffle_seed."""

    def __init__(self, shuffle_seed, n):
        self.shuffle_seed, self.n = shuffle_seed, n
        self._perms = {}  # the epochs of the last call (a step spans one or a few)

    def __call__(self, step, batch_size, rank, world_size):
        n = self.n
        start = (step * world_size + rank) * batch_size
        e0, e1 = start // n, (start + batch_size - 1) // n
        self._perms = {e: self._perms[e] if e in self._perms else epoch_permutation(self.shuffle_seed, e, n)
                       for e in range(e0, e1 + 1)}
        order = torch.cat([self._perms[e] for e in range(e0, e1 + 1)])
        p = start + torch.arange(batch_size, dtype=torch.int64)
        return p, order[p - e0 * n]


@dataclasses.dataclass(frozen=True)
class LoaderStats:
    """The loader over a window (since construction or the last stats(reset=True)): images delivered by the
    stream, wall seconds since the window's first batch() call, and wait_s of them spent inside batch() waiting
    for the pipeline. wait_fraction near 0: the loader keeps ahead of training; well above 0: training stalls
    on data, and img_per_s is then the loader's own rate (else it is the trainer's)."""

    images: int
    seconds: float
    wait_s: float
    img_per_s: float
    wait_fraction: float


def _default_threads():
    # DALI's CPU workers (the decoding): this process's cores, shared by the node's ranks (torchrun sets
    # LOCAL_WORLD_SIZE).
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class DALIData:
    """GPUData's batches, streamed from `source` (a path load_images reads) through a DALI pipeline.

    batch_size, rank, world_size: the stream's geometry (batch_size per rank, as in GPUData.batch); start_step:
    its first step (a resumed run's step). corruption, seed, noisy, xflip, shuffle_seed, device: as GPUData.
    resolution, channels, max_images: as load_images. check: read every image file now (header, a mode DALI
    decodes as PIL does, the first image's size and channels, a PNG's CRCs), so that bad input fails before
    training, not at step 10^5; False reads only the first (a file that fails later is still named). prefetch:
    DALI's prefetch_queue_depth (>= 2: a step decodes while the previous one trains). num_threads: DALI's CPU
    threads (None: this process's cores / LOCAL_WORLD_SIZE)."""

    def __init__(self, source, *, batch_size, rank=0, world_size=1, start_step=0, device=None, corruption=None,
                 seed=0, noisy=False, xflip=True, shuffle_seed=None, resolution=None, channels=None,
                 max_images=None, check=True, prefetch=2, num_threads=None):
        self._dali = _import_dali()  # before reading anything: the install hint comes first
        self.batch_size = checks.integer("batch_size", batch_size, 1)
        self.world_size = checks.integer("world_size", world_size, 1)
        self.rank = checks.integer("rank", rank, 0, self.world_size - 1)
        start_step = checks.integer("start_step", start_step, 0)
        self.prefetch = checks.integer("prefetch", prefetch, 2)
        self.num_threads = _default_threads() if num_threads is None else checks.integer("num_threads", num_threads, 1)
        if noisy and corruption is not None:
            raise ValueError("corruption: expected None when noisy=True (the images are already observations)")
        self.seed = checks.integer("seed", seed, 0, 2**64 - 1)
        self.shuffle_seed = (self.seed if shuffle_seed is None else
                             checks.integer("shuffle_seed", shuffle_seed, 0, 2**64 - 1))
        self.device = checks.device("device", device if device is not None else
                                    "cuda" if torch.cuda.is_available() else "cpu")
        self.corruption, self.noisy, self.xflip = corruption, bool(noisy), bool(xflip)
        self.source = Path(source)
        self._images = _open(self.source, resolution, channels, max_images, check)  # square: _check_shape
        self._order = _Order(self.shuffle_seed, len(self))
        self.restarts = 0  # streams rebuilt for a step out of sequence
        self.direct = 0  # batches of another geometry, decoded by PIL
        self.last_wait_s = 0.0  # the last streamed batch's wait
        self._window_start, self._delivered, self._wait_s = None, 0, 0.0
        self._pipe = None
        self._start(start_step)

    def __len__(self):
        return len(self._images)

    @property
    def resolution(self):
        return self._images.shape[0]

    @property
    def channels(self):
        return self._images.shape[2]

    # ------------------------------------------------------------------------------------------ the stream

    def _start(self, step):
        """A fresh pipeline whose first output is step's batch."""
        self._pipe = None  # drop the old one (and its prefetched steps) first
        self.step = self._fed = step  # the next step batch() streams / the source feeds
        self._pending = collections.deque()  # (step, p, index) fed and not yet returned; DALI keeps the order
        self._pipe = self._pipeline()

    def _feed(self):
        """external_source's callback, called inside pipe.run() in this thread: the next step's batch."""
        step, self._fed = self._fed, self._fed + 1
        p, index = self._order(step, self.batch_size, self.rank, self.world_size)
        self._pending.append((step, p, index))
        return self._images.feed(index)

    def _pipeline(self):
        return _pipeline(self._dali, self._images, self._feed, batch_size=self.batch_size,
                         num_threads=self.num_threads, device=self.device, prefetch=self.prefetch)

    def _run(self):
        """The next step's (p, index, uint8 [B, C, H, W] on the pipeline's device)."""
        try:
            out, *shape = self._pipe.run()
        except RuntimeError as e:
            self._explain(e)
        step, p, index = self._pending.popleft()
        return p, index, _output(self._images, out, shape, index, self.device, f"step {step}", self.source)

    def _explain(self, error):
        """A failed run: name the image of the fed steps that the scan or PIL refuses, else re-raise DALI's
        error with the steps in flight."""
        self._pipe = None  # DALI: "Current pipeline object is no longer valid"
        steps = ", ".join(str(s) for s, _, _ in self._pending)
        raise _failure(self._images, [i for _, _, i in self._pending], f"step(s) {steps}", self.source,
                       error) from error

    # ------------------------------------------------------------------------------------------ batches

    def _observe(self, u8, index, p):
        """GPUData.batch's tail: to [-1, 1], the fixed corruption of each image, then the flips."""
        y = to_float(u8)
        if self.corruption is not None:
            y = self.corruption.corrupt(y, self.seed, index)
        if self.xflip:
            # After the corruption: a mirrored white noise is white, and the DCT blur commutes with mirroring.
            y = torch.where(xflip_mask(self.shuffle_seed, p).view(-1, 1, 1, 1), y.flip(-1), y)
        return y

    def batch(self, step, batch_size=None, rank=None, world_size=None):
        """GPUData.batch(step, batch_size, rank, world_size): (y float32 [batch_size, C, H, W] corrupted and
        flipped, index int64 [batch_size]) on the device; None: the stream's value. The stream serves its own
        geometry; a step other than self.step restarts it, another geometry is decoded directly."""
        step = checks.integer("step", step, 0)
        bs = self.batch_size if batch_size is None else checks.integer("batch_size", batch_size, 1)
        ws = self.world_size if world_size is None else checks.integer("world_size", world_size, 1)
        rank = self.rank if rank is None else checks.integer("rank", rank, 0, ws - 1)
        if (bs, rank, ws) != (self.batch_size, self.rank, self.world_size):
            self.direct += 1
            p, index = self._order(step, bs, rank, ws)
            u8 = self._images.decode(index)
        else:
            t0 = time.perf_counter()
            if self._window_start is None:
                self._window_start = t0
            if step != self.step or self._pipe is None:
                self.restarts += step != self.step
                self._start(step)
            p, index, u8 = self._run()
            self.step += 1
            self.last_wait_s = time.perf_counter() - t0
            self._wait_s += self.last_wait_s
            self._delivered += bs
        index, p = index.to(self.device), p.to(self.device)
        return self._observe(u8.to(self.device), index, p), index

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch(self.step)

    def images_at(self, index):
        """uint8 [n, C, H, W] CPU tensor of the images `index` (int64 [n]), decoded directly: e.g. the Proximal
        FID reference set (GPUData's images.index_select)."""
        return self._images.decode(torch.as_tensor(index, dtype=torch.int64).cpu())

    def stats(self, reset=False):
        """LoaderStats of the current window; reset=True starts a new one."""
        seconds = 0.0 if self._window_start is None else time.perf_counter() - self._window_start
        stats = LoaderStats(images=self._delivered, seconds=seconds, wait_s=self._wait_s,
                            img_per_s=self._delivered / seconds if seconds else 0.0,
                            wait_fraction=self._wait_s / seconds if seconds else 0.0)
        if reset:
            self._window_start, self._delivered, self._wait_s = None, 0, 0.0
        return stats

    def close(self):
        """Drop the pipeline and close the data set's files."""
        self._pipe = None
        self._images.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DALIImages:
    """A data set's uint8 images, read through a DALI pipeline in index chunks of the caller's choosing and never
    held whole: the image set of `fid ref` and `eval` when the data set does not fit the device (GPUData's images
    tensor otherwise). batches(chunks) yields the images of each chunk in order (prefetch: the next chunks decode
    while the caller computes features); take(index) decodes a few directly (PIL, load_images' decode) for grids.
    source, resolution, channels, max_images, check: as DALIData; batch_size: the largest chunk."""

    def __init__(self, source, *, device=None, resolution=None, channels=None, max_images=None, check=True,
                 batch_size=256, prefetch=2, num_threads=None):
        self._dali = _import_dali()
        self.batch_size = checks.integer("batch_size", batch_size, 1)
        self.prefetch = checks.integer("prefetch", prefetch, 2)
        self.num_threads = _default_threads() if num_threads is None else checks.integer("num_threads", num_threads, 1)
        self.device = checks.device("device", device if device is not None else
                                    "cuda" if torch.cuda.is_available() else "cpu")
        self.source = Path(source)
        self._images = _open(self.source, resolution, channels, max_images, check)
        self._n = len(self._images)

    def __len__(self):
        return self._n

    @property
    def shape(self):
        """(N, C, H, W), as the images tensor's."""
        H, W, C = self._images.shape
        return self._n, C, H, W

    def head(self, n):
        """The first n images (a view over the same files)."""
        n = checks.integer("n", n, 1, self._n)
        view = object.__new__(DALIImages)
        view.__dict__.update(self.__dict__, _n=n)
        return view

    def take(self, index):
        """uint8 [len(index), C, H, W] CPU tensor of images `index`, decoded directly."""
        index = torch.as_tensor(index, dtype=torch.int64).cpu()
        if len(index) and not (0 <= int(index.min()) and int(index.max()) < self._n):
            raise IndexError(f"index: expected image indices in [0, {self._n}), got {index.tolist()}")
        return self._images.decode(index)

    def batches(self, chunks):
        """uint8 [len(c), C, H, W] on the device for each int64 index tensor c of chunks (each at most batch_size
        long, indices in [0, len(self))), in order, decoded by the pipeline."""
        chunks = [torch.as_tensor(c, dtype=torch.int64).cpu() for c in chunks]
        for c in chunks:
            if not 0 < len(c) <= self.batch_size:
                raise ValueError(f"chunks: expected chunks of 1..{self.batch_size} indices, got one of {len(c)}")
            if not (0 <= int(c.min()) and int(c.max()) < self._n):
                raise IndexError(f"chunks: expected image indices in [0, {self._n}), got {c.tolist()}")
        if not chunks:
            return
        pending, fed = collections.deque(), iter(chunks)

        def feed():
            # Prefetch runs ahead of the last chunk: repeat it (decoded, never returned) rather than end the epoch.
            index = next(fed, chunks[-1])
            pending.append(index)
            return self._images.feed(index)

        pipe = _pipeline(self._dali, self._images, feed, batch_size=self.batch_size, num_threads=self.num_threads,
                         device=self.device, prefetch=self.prefetch)
        for j in range(len(chunks)):
            try:
                out, *shape = pipe.run()
            except RuntimeError as e:
                raise _failure(self._images, pending, f"chunk {j}", self.source, e) from e
            index = pending.popleft()
            yield _output(self._images, out, shape, index, self.device, f"chunk {j}", self.source)

    def close(self):
        self._images.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
