"""FID and Proximal FID in memory: generated or data images -> Inception features -> float64 stats -> distance.

No image files: a batch goes from the sampler (uint8, as its PNG would be) straight into the feature network.
Proximal FID (DSD Section 4) corrupts the generated images with the run's observation model and compares them
with the statistics of the corrupted data, so it needs no clean data: what a run can select on.
Under torch.distributed every rank handles its share of the seeds and the features are gathered on every rank.
"""

import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .data.datasets import to_float, to_uint8
from .generation import batches, proximal_corrupt, split_seeds
from .metrics import feature_stats, frechet_distance, load_stats


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x):
    """Concatenate every rank's [n_r, D] rows (n_r may differ) on every rank; x itself with one process."""
    rank, world = _world()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    padded = x.new_zeros(max(counts), *x.shape[1:])
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def sampler_features(sampler, seeds, features, *, batch=1024, proximal=False, progress=True, desc="generate"):
    """Features [len(seeds), D] (float32, CPU) of the sampler's images of these seeds; proximal: of those images
    corrupted by the sampler's observation model. Ranks split the seeds; all features return on every rank."""
    rank, world = _world()
    mine = split_seeds(list(seeds), rank, world)
    device = next(sampler.net.parameters()).device
    out = [features(torch.zeros(0, *sampler.chw, dtype=torch.uint8))]  # fixes D when this rank has no seeds
    with tqdm(total=len(seeds), desc=desc, unit="img", disable=not progress or rank != 0, dynamic_ncols=True) as bar:
        for chunk in batches(mine, batch):
            images = sampler.images(chunk, device)
            if proximal:
                images = proximal_corrupt(images, sampler.corruption, chunk)
            out.append(features(images))
            bar.update(len(chunk) * world)
    return gather_rows(torch.cat(out).to(device)).cpu()


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


def sampler_features_with_proximal(sampler, seeds, features, *, batch=1024, progress=True, desc="generate"):
    """(features of the sampler's images of these seeds, features of their proximal corruption): FID and Proximal
    FID from one generation pass. Ranks split the seeds as in sampler_features; both return on every rank."""
    rank, world = _world()
    mine = split_seeds(list(seeds), rank, world)
    device = next(sampler.net.parameters()).device
    empty = features(torch.zeros(0, *sampler.chw, dtype=torch.uint8))
    clean, corrupted = [empty], [empty]
    with tqdm(total=len(seeds), desc=desc, unit="img", disable=not progress or rank != 0, dynamic_ncols=True) as bar:
        for chunk in batches(mine, batch):
            images = sampler.images(chunk, device)
            clean.append(features(images))
            corrupted.append(features(proximal_corrupt(images, sampler.corruption, chunk)))
            bar.update(len(chunk) * world)
    return tuple(gather_rows(torch.cat(f).to(device)).cpu() for f in (clean, corrupted))


# Keys that save_reference writes besides mu and sigma; stats files from elsewhere (clean-fid, EDM) have none.
REFERENCE_MARKERS = ("corrupted", "num_images", "feature_dim", "resize_mode", "resolution", "description")


def save_reference(path, feats, *, corrupted, resize_mode, resolution=None, description=""):
    """Reference stats of data features [N, D] as an .npz, atomically: mu and sigma (float64, what clean-fid and
    EDM read) plus the REFERENCE_MARKERS (the feature mode and the images' resolution among them), so a
    clean-data file cannot silently serve as a corrupted-data (Proximal FID) reference or the other way round,
    nor a file of one feature mode score features of another. resolution None: not recorded."""
    from .training.loop import atomic_write_bytes  # here: training imports this module (in-loop selection)

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
