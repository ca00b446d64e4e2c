"""FID in memory: generated or data images -> Inception features -> float64 stats -> distance, and the reference
stats files (`dsd-fast fid ref`) with the markers that keep clean-data, corrupted-data and feature-mode stats apart.

No image files: a batch goes from the sampler (uint8, as its PNG would be) straight into the feature network.
Under torch.distributed every rank handles its share of the seeds and the features are gathered on every rank.
"""

import os

import numpy as np
import torch
from tqdm import tqdm

from ..data import load_images, resolve_source, to_float, to_uint8
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


def data_features(images, features, *, corruption=None, seed=0, index=None, batch=256, progress=True,
                  desc="data"):
    """Features of uint8 data images [N, C, H, W]; with an observation model, of their fixed corruption
    y_i = corruption.corrupt(x_i, seed, index_i) (index defaults to 0..N-1, the training run's draw), quantised
    to uint8 as a corrupted data set is stored."""
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4):
        got = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else images
        raise ValueError(f"images: expected a uint8 [N, C, H, W] tensor, got {got}")
    if index is None:
        index = torch.arange(images.shape[0])
    out = []
    with tqdm(total=images.shape[0], desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for x, i in zip(images.split(batch), index.split(batch), strict=True):
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


def run_data(options, max_images=None, name="run"):
    """(uint8 images [N, C, H, W], source path) of a run's data set as the run loads it; max_images: the first N
    (default: the run's own max_images), fewer is an error."""
    if options.dataset is None:
        raise ValueError(f"{name}: the run's options name no data set (a distill run without --dataset)")
    config = resolve_config(options.preset)
    return load_data(options.dataset, options.data, config.img_resolution, config.in_channels,
                     max_images or options.max_images)


def load_data(dataset, data, resolution, channels, max_images):
    """(uint8 images, source path) of a data set name or path; exactly max_images of them (None: all)."""
    source = resolve_source(dataset, data)
    images = load_images(source, resolution=resolution, channels=channels, max_images=max_images)
    if max_images is not None and images.shape[0] < max_images:
        raise ValueError(f"max_images: expected {max_images} images, but {os.fspath(source)} holds only "
                         f"{images.shape[0]}")
    return images, os.fspath(source)
