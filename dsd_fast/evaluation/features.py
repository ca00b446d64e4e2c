"""FID in memory: generated or data images -> Inception features -> float64 stats -> distance, and the reference
stats files (`dsd-fast fid ref`) with the markers that keep clean-data, corrupted-data and feature-mode stats apart.

No image files: a batch goes from the sampler (uint8, as its PNG would be) straight into the feature network.
Under torch.distributed every rank handles its share of the seeds and the features are gathered on every rank.
"""

import math
import os

import numpy as np
import torch
from tqdm import tqdm

from ..data import DALIImages, choose_loader, dataset_shape, load_images, resolve_source, to_float, to_uint8
from ..distributed import gather_rows, world
from ..generation import batches, split_seeds
from ..metrics import InceptionFeatures, feature_stats, frechet_distance, load_inception, load_stats
from ..networks import resolve_config
from ..rundir import atomic_write_bytes


def feature_network(inception=None, mode="edm", device="cpu", batch=256):
    """The FID feature extractor: uint8 images [B, C, H, W] -> float32 [B, D] on the CPU. Callers look it up on this
    module at call time, so tests can replace it with a cheap one."""
    return InceptionFeatures(load_inception(inception), mode=mode, device=device, batch_size=batch)


def check_dim(name, mu, features, chw):
    """ValueError unless reference stats have the feature network's dimension (before generating anything)."""
    dim = features(torch.zeros(0, *chw, dtype=torch.uint8)).shape[1]
    if mu.shape[0] != dim:
        raise ValueError(f"{name}: the stats have feature dimension {mu.shape[0]} but the feature network gives "
                         f"{dim} (stats from another network?)")


def sampler_features(sampler, seeds, features, *, batch=1024, views=None, progress=True, desc="generate"):
    """Features [len(seeds), D] (float32, CPU) of the sampler's images of these seeds. views: a tuple of maps
    view(images uint8, seeds) -> images (None: the images as they are), all fed from one generation pass; then a
    tuple of feature tensors, one per view. Ranks split the seeds; all features return on every rank."""
    rank, size = world()
    mine = split_seeds(list(seeds), rank, size)
    device = next(sampler.net.parameters()).device
    maps = (None,) if views is None else tuple(views)
    empty = features(torch.zeros(0, *sampler.chw, dtype=torch.uint8))  # fixes D when this rank has no seeds
    out = [[empty] for _ in maps]
    with tqdm(total=len(seeds), desc=desc, unit="img", disable=not progress or rank != 0, dynamic_ncols=True) as bar:
        for chunk in batches(mine, batch):
            images = sampler.images(chunk, device)
            for feats, view in zip(out, maps, strict=True):
                feats.append(features(images if view is None else view(images, chunk)))
            bar.update(len(chunk) * size)
    gathered = tuple(gather_rows(torch.cat(f).to(device)).cpu() for f in out)
    return gathered[0] if views is None else gathered


def observe(images, corruption, seed, index):
    """The fixed observations y_i = corruption.corrupt(x_i, seed, index_i) of uint8 images, quantised to uint8 as a
    corrupted data set is stored (a training run draws image i with index i and its options.seed)."""
    return to_uint8(corruption.corrupt(to_float(images), seed, index.to(images.device)))


def image_batches(images, chunks, device=None):
    """The uint8 images of each index chunk (int64 tensors), in order, on device (None: where they are): images is
    an image set, a uint8 [N, C, H, W] tensor (held) or a DALIImages (streamed; its batch_size bounds a chunk)."""
    if isinstance(images, torch.Tensor):
        for i in chunks:
            yield images[i] if device is None else images[i].to(device)
    else:
        for x in images.batches(chunks):
            yield x if device is None else x.to(device)


def first_images(images, n):
    """The first n images of an image set (a tensor's rows; a DALIImages' view), as the same kind."""
    return images[:n] if isinstance(images, torch.Tensor) else images.head(n)


def take_images(images, index):
    """uint8 images `index` of an image set as a tensor (a DALIImages decodes them directly: for grids)."""
    return images[index] if isinstance(images, torch.Tensor) else images.take(index)


def data_features(images, features, *, corruption=None, seed=0, index=None, batch=256, progress=True,
                  desc="data", device=None):
    """Features of an image set (uint8 [N, C, H, W] tensor, or DALIImages), in data-set order, on device (None:
    where the images are); with an observation model, of their fixed corruption
    y_i = corruption.corrupt(x_i, seed, index_i) (index defaults to 0..N-1, the training run's draw), quantised
    to uint8 as a corrupted data set is stored."""
    if isinstance(images, torch.Tensor):
        if not (images.dtype == torch.uint8 and images.ndim == 4):
            raise ValueError(f"images: expected a uint8 [N, C, H, W] tensor, got {images.dtype} of shape "
                             f"{tuple(images.shape)}")
    elif not isinstance(images, DALIImages):
        raise ValueError(f"images: expected a uint8 [N, C, H, W] tensor or a DALIImages, got {images!r}")
    n = images.shape[0]
    if index is None:
        index = torch.arange(n)
    out = []
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        positions = torch.arange(n).split(batch)
        for x, i in zip(image_batches(images, positions, device), index.split(batch), strict=True):
            if corruption is not None:
                x = observe(x, corruption, seed, i)
            out.append(features(x))
            bar.update(x.shape[0])
    return torch.cat(out)


def fid_from_features(feats, ref):
    """Frechet distance of the features' stats to reference stats (mu, sigma); ValueError on a dimension
    mismatch."""
    mu, sigma = feature_stats(feats)
    mu_ref, sigma_ref = ref
    if mu_ref.shape != mu.shape:
        raise ValueError(f"ref: the reference stats have dimension {mu_ref.shape[0]} but the features have "
                         f"{mu.shape[0]} (stats from another feature network?)")
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


# Keys that save_reference writes besides mu and sigma; stats files from elsewhere (clean-fid, EDM) have none.
REFERENCE_MARKERS = ("corrupted", "num_images", "feature_dim", "resize_mode", "resolution", "description")


def save_reference(path, feats, *, corrupted, resize_mode, resolution=None, description=""):
    """Reference stats of data features [N, D] as an .npz, atomically: mu and sigma (float64, what clean-fid and
    EDM read) plus the REFERENCE_MARKERS (the feature mode and the images' resolution among them), so a
    clean-data file cannot silently serve as a corrupted-data (Proximal FID) reference or the other way round,
    nor a file of one feature mode score features of another. resolution None: not recorded."""
    mu, sigma = feature_stats(feats)
    markers = dict(corrupted=bool(corrupted), num_images=int(feats.shape[0]), feature_dim=int(feats.shape[1]),
                   resize_mode=str(resize_mode), description=str(description))
    if resolution is not None:
        markers["resolution"] = int(resolution)
    atomic_write_bytes(path, lambda f: np.savez(f, mu=mu, sigma=sigma, **markers))


def load_reference(path, *, corrupted=None, mode=None, name="ref"):
    """(mu, sigma, markers) of a stats file serving as the clean-data (corrupted=False) or corrupted-data
    (corrupted=True) reference, for features of feature mode `mode`. markers: the REFERENCE_MARKERS the file has
    (none for clean-fid or EDM files, which cannot be checked: their mode is taken to be `mode`, and
    markers['resize_mode'] stays absent so callers can say so). ValueError / FileNotFoundError naming `name`,
    also when the file's 'corrupted' or 'resize_mode' marker contradicts the use (None: not checked)."""
    try:
        mu, sigma = load_stats(path)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{name}: {str(e).removeprefix('path: ')}") from e
    with np.load(path, allow_pickle=False) as z:
        markers = {k: z[k].item() for k in REFERENCE_MARKERS if k in z.files}
    if mode is not None and markers.get("resize_mode", mode) != mode:
        raise ValueError(f"{name}: {os.fspath(path)!r} holds stats of feature mode {markers['resize_mode']!r}, but "
                         f"these features use mode {mode!r}; FIDs of different modes are not comparable (pass "
                         f"--mode {markers['resize_mode']}, or recompute the stats with --mode {mode})")
    if corrupted is not None and markers.get("corrupted", corrupted) != corrupted:
        kind = ("clean", "corrupted")
        raise ValueError(f"{name}: expected {kind[corrupted]}-data stats (FID compares with clean data, Proximal "
                         f"FID with corrupted data), but {os.fspath(path)!r} holds {kind[not corrupted]}-data "
                         f"stats (its 'corrupted' marker, written by `dsd-fast fid ref`)")
    return mu, sigma, markers


def run_data(options, max_images=None, name="run", *, loader="resident", device="cpu", batch=256):
    """(image set, source path, loader choice) of a run's data set as the run loads it (load_data); max_images:
    the first N (default: the run's own max_images), fewer is an error."""
    if options.dataset is None:
        raise ValueError(f"{name}: the run's options name no data set (a distill run without --dataset)")
    config = resolve_config(options.preset)
    return load_data(options.dataset, options.data, config.img_resolution, config.in_channels,
                     max_images or options.max_images, loader=loader, device=device, batch=batch)


def load_data(dataset, data, resolution, channels, max_images, *, loader="resident", device="cpu", batch=256):
    """(image set, source path, loader choice) of a data set name or path; exactly max_images images (None: all).
    loader (auto | resident | dali, as training's --loader): resident holds the uint8 set as a tensor on the CPU;
    dali streams it through a DALIImages on device in chunks of <= batch; auto picks resident when the set fits
    in half the device's free memory (always without an accelerator). The choice: "<kind>: <reason>"."""
    source = resolve_source(dataset, data)
    shape = dict(resolution=resolution, channels=channels, max_images=max_images)
    device = torch.device(device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    size = math.prod(dataset_shape(source, **shape)) if loader == "auto" else 0  # only auto weighs it
    try:
        kind, reason = choose_loader(loader, size, free)
    except ImportError as e:  # --loader dali without DALI: a usage error, said as such
        raise ValueError(str(e)) from e
    images = (DALIImages(source, device=device, batch_size=batch, **shape) if kind == "dali" else
              load_images(source, **shape))
    if max_images is not None and images.shape[0] < max_images:
        raise ValueError(f"max_images: expected {max_images} images, but {os.fspath(source)} holds only "
                         f"{images.shape[0]}")
    return images, os.fspath(source), f"{kind}: {reason}"
