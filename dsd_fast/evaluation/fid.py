"""The numbers of `dsd-fast fid`: FID / Proximal FID of a checkpoint's samples in repeats, of a set of images, or
between two stats files, and reference stats of a data set (`fid ref`). Each reports through say(line) (rank 0
only under torchrun) and, given json_path, writes the numbers as JSON.

Feature modes (metrics.fid): edm (default; EDM's / StyleGAN's pipeline, what the DSD paper's numbers and EDM's
reference files use), clean (clean-fid's), gpu (clean's resize on the device). Files written by `fid ref` record
their mode; scoring against a file of another mode is an error. Foreign files (EDM's, clean-fid's) hold only
mu/sigma: they are taken to be of the given mode, and the output says so. Repeat r measures seeds
r*num .. (r+1)*num - 1, so the defaults are the paper's ranges 0-49999, 50000-99999, 100000-149999.
"""

import json
import os
import statistics

import torch

from ..data import load_images
from ..distributed import process_group
from ..generation import MAX_SEED, load_sampler
from ..metrics import frechet_distance
from ..options import Options
from ..rundir import atomic_write_bytes, read_options
from . import features as _features
from .features import check_dim, data_features, fid_from_features, load_data, load_reference, run_data, save_reference
from .proximal import proximal_features


def default_steps(resolution):
    """EDM's teacher sampling steps: 18 up to 32x32, 40 above (64x64)."""
    return 18 if resolution <= 32 else 40


def check_out_dir(name, path):
    """Fail before the work, not after it, when the output's directory does not exist."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{name}: directory {folder!r} does not exist")


def write_json(path, record):
    text = json.dumps(record, indent=2) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def mean_std(values):
    """(mean, sample std over repeats; None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def format_fid(mean, std):
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def mode_note(markers, mode):
    """What the output says of the reference's feature mode (foreign files carry none: --mode is assumed)."""
    if "resize_mode" in markers:
        return f"mode {mode}"
    return f"mode {mode}, assumed for the reference: it records no mode (a clean-fid or EDM file?)"


def fid_between(ref_a, ref_b, proximal, mode, json_path, say=print):
    """The Frechet distance between two stats files (of one feature mode, when both record theirs)."""

    if json_path is not None:
        check_out_dir("json", json_path)
    corrupted = True if proximal else None
    mu_a, sigma_a, m_a = load_reference(ref_a, corrupted=corrupted, name="ref")
    mode_a = m_a.get("resize_mode")
    mu_b, sigma_b, m_b = load_reference(ref_b, corrupted=corrupted, mode=mode_a, name="ref")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"ref: {ref_a!r} has feature dimension {mu_a.shape[0]}, {ref_b!r} has {mu_b.shape[0]}")
    modes = {m.get("resize_mode") for m in (m_a, m_b)} - {None}
    fid = frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    note = f"mode {modes.pop()}" if modes else f"neither file records its mode; --mode {mode} assumed"
    say(f"FID between {ref_a} and {ref_b} ({note}): {fid:.4f}")
    if json_path is not None:
        write_json(json_path, dict(metric="fid", fid=fid, refs=[os.fspath(ref_a), os.fspath(ref_b)],
                                   ref_markers=[m_a, m_b]))
        say(f"Wrote {json_path}")


def fid_of_images(source, ref, proximal, mode, inception, inception_batch, device, json_path, say=print):
    """FID of the images at `source` (folder, zip, npz/npy) against `ref`."""


    if proximal:
        raise ValueError("proximal: --images are scored as they are; corrupt them yourself, or use --ckpt")
    if json_path is not None:
        check_out_dir("json", json_path)
    if not os.path.exists(source):
        raise FileNotFoundError(f"images: {source!r} does not exist")
    mu, sigma, markers = load_reference(ref, mode=mode)
    x = load_images(source)
    if x.shape[0] < 2:
        raise ValueError(f"images: {source!r} holds {x.shape[0]} image; FID needs >= 2")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    features = _features.feature_network(inception, mode, device, inception_batch)
    check_dim("ref", mu, features, tuple(x.shape[1:]))
    feats = torch.cat([features(chunk.to(device)) for chunk in x.split(inception_batch)])
    fid = fid_from_features(feats, (mu, sigma))
    say(f"FID of {source} ({x.shape[0]} images, {x.shape[-2]}x{x.shape[-1]}, {mode_note(markers, mode)}) "
               f"against {ref}: {fid:.4f}")
    if json_path is not None:
        write_json(json_path, dict(metric="fid", fid=fid, images=os.fspath(source), num_images=int(x.shape[0]),
                                   ref=os.fspath(ref), ref_markers=markers, mode=mode))
        say(f"Wrote {json_path}")


def fid_of_checkpoint(ckpt, ref, num, repeats, proximal, sampler_name, steps, batch, precision, mode, inception,
                      inception_batch, device, json_path, say=print):

    if num * repeats - 1 > MAX_SEED:
        raise ValueError(f"num: num * repeats seeds must stay within [0, {MAX_SEED}], got {num} * {repeats}")
    if json_path is not None:
        check_out_dir("json", json_path)
    mu, sigma, markers = load_reference(ref, corrupted=proximal, mode=mode)
    with process_group(device) as par:
        sampler = load_sampler(ckpt, sampler_name, steps or 18, par.device, precision)
        if steps is None:
            sampler.steps = default_steps(sampler.config.img_resolution)
        features = _features.feature_network(inception, mode, par.device, inception_batch)
        check_dim("ref", mu, features, sampler.chw)
        say = say if par.main else (lambda *a, **k: None)
        what = "Proximal FID" if proximal else "FID"
        steps_note = "" if sampler.kind == "one-step" else f", {sampler.steps} steps"
        say(f"{what} of {ckpt} ({sampler.kind}{steps_note}, {precision}, {mode_note(markers, mode)}) against {ref}"
            + (f" ({markers['num_images']} reference images)" if "num_images" in markers else ""))
        runs = []
        for r in range(repeats):
            seeds = range(r * num, (r + 1) * num)
            measure = proximal_features if proximal else _features.sampler_features
            feats = measure(sampler, seeds, features, batch=batch, desc=f"repeat {r + 1}/{repeats}")
            fid = fid_from_features(feats, (mu, sigma))
            runs.append(dict(seeds=f"{seeds[0]}-{seeds[-1]}", num_images=num, fid=fid))
            say(f"  seeds {runs[-1]['seeds']} ({num} images): {fid:.4f}")
        mean, std = mean_std([run["fid"] for run in runs])
        say(f"{what}: {format_fid(mean, std)} ({'mean ± std over ' if std is not None else ''}{repeats} x {num} "
            f"generated images)")
        if json_path is not None and par.main:
            write_json(json_path, dict(
                metric="proximal_fid" if proximal else "fid", mean=mean, std=std, repeats=runs, ckpt=os.fspath(ckpt),
                sampler=sampler.kind, steps=None if sampler.kind == "one-step" else sampler.steps,
                precision=precision, ref=os.fspath(ref), ref_markers=markers, mode=mode,
                world_size=par.world_size))
            say(f"Wrote {json_path}")


def reference_stats(dataset, dataset_path, run_dir, resolution, channels, max_images, corrupt, given, out, mode,
                    inception, inception_batch, device, say=print, loader="resident"):


    check_out_dir("out", out)
    given = {k: v for k, v in given.items() if v is not None}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = dict(loader=loader, device=device, batch=inception_batch)
    if run_dir is not None:
        clash = [f"--{k.replace('_', '-')}" for k, v in dict(data=dataset, dataset_path=dataset_path,
                                                              resolution=resolution, channels=channels, **given).items()
                 if v is not None]
        if clash:
            raise ValueError(f"run: the run's options.json sets the data and its corruption; drop {', '.join(clash)}")
        options = read_options(run_dir)
        corrupt = True if corrupt is None else corrupt
        if options.noisy_data and not corrupt:
            raise ValueError(f"run: {run_dir} trained on already-noisy data (--noisy-data); it has no clean data")
        images, source, choice = run_data(options, max_images, **data)
        corruption = options.make_corruption() if corrupt and not options.noisy_data else None
    else:
        if given and not corrupt:
            raise ValueError(f"corrupt: {', '.join('--' + k for k in given)} describe a corruption; add --corrupt")
        options = Options(**given)  # validates the corruption as a training run would
        images, source, choice = load_data(dataset, dataset_path, resolution, channels, max_images, **data)
        corruption = options.make_corruption() if corrupt else None
    what = "as-is noisy data" if corrupt and corruption is None else repr(corruption) if corrupt else "clean data"
    description = f"{source}: {images.shape[0]} images, {what}" + (f", seed {options.seed}" if corruption else "")
    say(f"loader {choice}")
    features = _features.feature_network(inception, mode, device, inception_batch)
    try:
        feats = data_features(images, features, corruption=corruption, seed=options.seed, batch=inception_batch,
                              desc="corrupted data" if corrupt else "data", device=device)
    finally:
        if not isinstance(images, torch.Tensor):
            images.close()
    save_reference(out, feats, corrupted=bool(corrupt), resize_mode=mode, resolution=images.shape[-1],
                   description=description)
    say(f"Wrote {out}: {'corrupted' if corrupt else 'clean'}-data stats of {images.shape[0]} images "
               f"({description}; mode {mode})")
