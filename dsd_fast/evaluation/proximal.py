"""Proximal FID (DSD Section 4), the metric a run can compute without clean data: generated images corrupted once
more with the run's observation model, against stats of the corrupted data set.

Everything that makes it lives here: the Philox key of the samples' corruption (image s corrupted with noise keyed
by its seed s, so the number does not depend on batch or world size), the corruption itself, the features of a
sampler's corrupted samples (alone, or beside their clean features from the same pass), and the features of the
data as the run observes it, corrupted once more (the Observation row's Proximal FID). The reference stats are
data_features of the observations (features.data_features with the run's corruption); `dsd-fast fid ref --run`
writes them, in-loop selection (training/selection.py) caches them in the run directory.
"""

import torch
from tqdm import tqdm

from ..data import to_float, to_uint8
from ..distributed import gather_rows
from ..generation import seed_index
from .features import image_batches, observe, sampler_features

PROXIMAL_KEY = 0x5EED_1A7E_17D5_0002  # a fixed 63-bit Philox key, apart from generation.LATENT_KEY


def proximal_corrupt(images, corruption, seeds):
    """Corrupt uint8 generated images of these seeds with the run's observation model (noise fixed per seed,
    PROXIMAL_KEY): Proximal FID compares them with the corrupted data."""
    x = to_float(images)
    return to_uint8(corruption.corrupt(x, PROXIMAL_KEY, seed_index(seeds, x.device)))


def proximal_features(sampler, seeds, features, **kw):
    """Features of the sampler's images of these seeds, corrupted by its observation model (sampler_features' kw)."""
    view = lambda images, chunk: proximal_corrupt(images, sampler.corruption, chunk)
    return sampler_features(sampler, seeds, features, views=(view,), **kw)[0]


def features_with_proximal(sampler, seeds, features, **kw):
    """(features of the sampler's images of these seeds, features of their proximal corruption): FID and Proximal
    FID from one generation pass."""
    view = lambda images, chunk: proximal_corrupt(images, sampler.corruption, chunk)
    return sampler_features(sampler, seeds, features, views=(None, view), **kw)


def observation_features(options, images, features, par, *, clean, batch):
    """Features, in data-set order, of an image set's clean images x_i (if clean; else None), of the observations
    y_i (as the run corrupts image i: corruption.corrupt(x_i, seed, i); as they are for noisy data) and of the
    observations corrupted once more as Proximal FID corrupts samples (keyed by i). images: a uint8 tensor or a
    DALIImages (streamed, features.image_batches). Ranks take strided shares."""
    corruption = options.make_corruption()
    mine = torch.arange(par.rank, images.shape[0], par.world_size)
    out = {k: [] for k in ("index", "clean", "corrupted", "proximal")}
    chunks = mine.split(batch)
    with tqdm(total=images.shape[0], desc="Observation", unit="img", disable=not par.main, dynamic_ncols=True) as bar:
        for i, x in zip(chunks, image_batches(images, chunks, par.device), strict=True):
            index = i.to(par.device)
            y = observations(options, x, index)
            out["index"].append(index.view(-1, 1))
            if clean:
                out["clean"].append(features(x))
            out["corrupted"].append(features(y))
            out["proximal"].append(features(proximal_corrupt(y, corruption, index)))
            bar.update(len(i) * par.world_size)
    gathered = {k: gather_rows(torch.cat(v).to(par.device)).cpu() if v else None for k, v in out.items()}
    order = gathered.pop("index").view(-1).argsort()
    return {k: v[order] if v is not None else None for k, v in gathered.items()}


def observations(options, x, index=None):
    """The run's observations y_i of uint8 data images x with data-set indices index (default 0..); as-is for noisy
    data."""
    index = torch.arange(x.shape[0]) if index is None else index
    return x if options.noisy_data else observe(x, options.make_corruption(), options.seed, index)
