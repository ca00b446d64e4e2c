"""The DSD paper's Table 2 for one run (`dsd-fast eval RUN_DIR`), as eval.md and eval.json, plus a PNG grid per row.

Rows: Observation (the run's corrupted data itself), the Phase I teacher's samplers (Ambient-Full and
Ambient-Truncated, DSD Algorithm 3; for a blur + noise run its DCT PF-ODE, the Ambient-Full analogue), and the
distilled one-step student (RUN_DIR/last.pt, or --ckpt: a Phase II snapshot of the run). Columns: FID against
clean-data stats and Proximal FID against corrupted-data stats, both computed from the run's data set (as
options.json loads it) unless --ref / --proximal-ref give them.
Generated rows use seeds 0..num-1; FID and Proximal FID of a row come from the same images. Under torchrun the
ranks split the seeds and the data images; rank 0 writes.
"""

import contextlib
import math
import os

import torch

from ..data import to_float
from ..distributed import process_group
from ..generation import load_sampler
from ..metrics import feature_stats
from ..networks import resolve_config
from ..rundir import atomic_write_bytes, load_checkpoint, read_options, save_grid
from . import features as _features
from .features import check_dim, fid_from_features, first_images, load_reference, run_data, take_images
from .fid import default_steps, write_json
from .proximal import features_with_proximal, observation_features, observations

OBSERVATION = ("observation", "Observation", None)
# (key, row name, sampler) per observation model: the paper's rows, in its order.
TEACHER_ROWS = {
    "noise": [("ambient-full", "Ambient-Full", "ambient-full"),
              ("ambient-truncated", "Ambient-Truncated", "ambient-truncated")],
    "blur": [("dct-ode", "Teacher DCT PF-ODE (Ambient-Full analogue)", "dct-ode")],
}
STUDENT = ("dsd", "DSD (one-step)", "one-step")
NO_CLEAN = "n/a (no clean data; pass --ref)"


def evaluate(run_dir, *, ckpt=None, num=50000, steps=None, ref=None, proximal_ref=None, batch=1024, precision="fp32",
             data_images=None, mode="edm", inception=None, inception_batch=256, device=None, grid_images=64,
             loader="resident"):
    """Compute the table and write it (rank 0): returns the markdown, None on other ranks. Every check (run, refs,
    data, weights) comes before any generation, and nothing is written before everything is computed. loader:
    how the data images are read (features.load_data: resident holds them, dali streams them, auto picks)."""
    options = read_options(run_dir, "run_dir")
    ckpt, teacher_ckpt = _checkpoints(run_dir, ckpt)
    refs = {"clean": load_reference(ref, corrupted=False, mode=mode, name="ref") if ref else None,
            "corrupted": load_reference(proximal_ref, corrupted=True, mode=mode, name="proximal_ref")
            if proximal_ref else None}
    config = resolve_config(options.preset)
    steps = steps or default_steps(config.img_resolution)
    rows = [OBSERVATION] + TEACHER_ROWS[options.corruption] + [STUDENT]
    with process_group(device) as par, contextlib.ExitStack() as opened:
        images, source, choice = run_data(options, name="run_dir", loader=loader, device=par.device,
                                          batch=inception_batch)
        if not isinstance(images, torch.Tensor):
            opened.callback(images.close)
        if data_images is not None:
            if data_images > images.shape[0]:
                raise ValueError(f"data_images: expected at most the {images.shape[0]} images of the run's data "
                                 f"set {source}, got {data_images}")
            images = first_images(images, data_images)
        if images.shape[0] < 2:
            raise ValueError(f"run_dir: the run's data set {source} holds {images.shape[0]} image; stats need >= 2")
        features = _features.feature_network(inception, mode, par.device, inception_batch)
        chw = (config.in_channels, config.img_resolution, config.img_resolution)
        for name, r in (("ref", refs["clean"]), ("proximal_ref", refs["corrupted"])):
            if r is not None:
                check_dim(name, r[0], features, chw)
        if par.main:  # after every check: an error is the first line said
            print(f"loader {choice}", flush=True)
        table = _measure(options, images, refs, rows, features, par, ckpt=ckpt, teacher_ckpt=teacher_ckpt, num=num,
                         steps=steps, batch=batch, precision=precision, grid_images=grid_images,
                         inception_batch=inception_batch)
        if not par.main:
            return None
        info = dict(run=os.fspath(run_dir), ckpt=ckpt, teacher_ckpt=teacher_ckpt,
                    corruption=repr(options.make_corruption()), noisy_data=options.noisy_data, seed=options.seed,
                    data=source, loader=choice, data_images=images.shape[0], num=num, steps=steps,
                    precision=precision, mode=mode, world_size=par.world_size,
                    references={k: _describe(v, p, images.shape[0]) for (k, v), p in
                                zip(refs.items(), (ref, proximal_ref), strict=True)},
                    **table)
        grids = info.pop("grids")
        for row in info["rows"]:
            if row["key"] in grids:
                _save_grid(grids[row["key"]], os.path.join(run_dir, row["grid"]))
        write_json(os.path.join(run_dir, "eval.json"), info)
        text = markdown(info)
        atomic_write_bytes(os.path.join(run_dir, "eval.md"), lambda f: f.write(text.encode()))
        return text


def _checkpoints(run_dir, ckpt):
    """(student checkpoint, teacher checkpoint): ckpt (default RUN_DIR/last.pt) must be of Phase II; a full state
    holds the teacher too, a network snapshot does not, and then RUN_DIR/last.pt must (a Phase II state)."""
    last = os.path.join(run_dir, "last.pt")
    ckpt = last if ckpt is None else os.fspath(ckpt)
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"run_dir: {run_dir!r} has no checkpoint last.pt" if ckpt == last else
                                f"ckpt: checkpoint {ckpt!r} does not exist")
    state = load_checkpoint(ckpt)
    phase = state.get("phase")
    if phase != "distill":
        raise ValueError(f"run_dir: eval needs a Phase II checkpoint (last.pt of phase 'distill', which also holds "
                         f"the teacher), but {ckpt} is of phase {phase!r}; distil it first "
                         f"(dsd-fast distill --teacher {ckpt} --outdir ...)")
    if "teacher" in state:
        return ckpt, ckpt
    del state
    if not (os.path.isfile(last) and "teacher" in load_checkpoint(last)):
        raise ValueError(f"ckpt: {ckpt} is a network snapshot (the student only) and {last} holds no Phase II "
                         f"teacher for the teacher rows; pass --ckpt of a full Phase II state instead")
    return ckpt, last


def _describe(ref, path, n_data):
    """How a reference was obtained, for eval.json."""
    if ref is None:
        return dict(source="data", num_images=n_data)
    return dict(source=os.fspath(path), num_images=ref[2].get("num_images"))


def _save_grid(images, path):
    save_grid(to_float(images), path)


def _measure(options, images, refs, rows, features, par, *, ckpt, teacher_ckpt, num, steps, batch, precision,
             grid_images, inception_batch):
    """dict(rows=[...], floors={...}, grids={key: uint8 images}) with every FID (None where no clean stats)."""
    obs = observation_features(options, images, features, par, clean=refs["clean"] is None and
                                not options.noisy_data, batch=inception_batch)
    clean = refs["clean"][:2] if refs["clean"] is not None else (
        feature_stats(obs["clean"]) if obs["clean"] is not None else None)
    corrupted = refs["corrupted"][:2] if refs["corrupted"] is not None else feature_stats(obs["corrupted"])

    def measure(key, name, sampler, feats, proximal_feats, n, grid):
        return dict(key=key, name=name, sampler=sampler, steps=None if sampler in (None, "one-step") else steps,
                    fid=fid_from_features(feats, clean) if clean is not None else None,
                    proximal_fid=fid_from_features(proximal_feats, corrupted), num_images=n,
                    grid=f"eval-{key}.png" if grid else None)

    out, grids = [], {}
    for key, name, kind in rows:
        if kind is None:
            out.append(measure(key, name, None, obs["corrupted"], obs["proximal"], images.shape[0], grid_images))
            if grid_images and par.main:
                shown = torch.arange(min(grid_images, images.shape[0]))
                grids[key] = observations(options, take_images(images, shown).to(par.device))
            continue
        sampler = load_sampler(ckpt if kind == "one-step" else teacher_ckpt, kind, steps, par.device, precision)
        feats, proximal_feats = features_with_proximal(sampler, range(num), features, batch=batch, desc=name)
        out.append(measure(key, name, kind, feats, proximal_feats, num, grid_images))
        if grid_images and par.main:
            grids[key] = sampler.images(range(grid_images))
        del sampler
    floors = dict(num_images=images.shape[0] // 2, fid=None, proximal_fid=None)
    if images.shape[0] >= 4:  # two halves of >= 2 images
        if obs["clean"] is not None:
            floors["fid"] = _halves(obs["clean"])
        floors["proximal_fid"] = _halves(obs["corrupted"])
    return dict(rows=out, floors=floors, grids=grids)


def _halves(feats):
    """FID between the even- and odd-index halves of features in data-set order."""
    return fid_from_features(feats[0::2], feature_stats(feats[1::2]))


def _number(value):
    return NO_CLEAN if value is None else f"{value:.2f}" if math.isfinite(value) else str(value)


def markdown(info):
    """eval.md: the table, then how each number was obtained."""
    refs, floors = info["references"], info["floors"]
    teacher = f" (teacher from {info['teacher_ckpt']})" if info["teacher_ckpt"] != info["ckpt"] else ""
    lines = [f"# Evaluation of `{info['run']}`", "",
             f"Observation model {info['corruption']}, seed {info['seed']}; data {info['data']} "
             f"({info['data_images']} images{', already noisy' if info['noisy_data'] else ''}). "
             f"Checkpoint {info['ckpt']}{teacher}; teacher samplers {info['steps']} steps; "
             f"generator {info['precision']}; "
             f"FID InceptionV3 features, feature mode {info['mode']}.", "",
             "| Method | FID ↓ | Proximal FID ↓ | Images | Grid |", "|---|---:|---:|---:|---|"]
    for row in info["rows"]:
        grid = f"![{row['key']}]({row['grid']})" if row["grid"] else ""
        lines.append(f"| {row['name']} | {_number(row['fid'])} | {_number(row['proximal_fid'])} | "
                     f"{row['num_images']} | {grid} |")
    clean_ref = refs["clean"]
    clean_text = (f"{clean_ref['num_images']} clean data images" if clean_ref["source"] == "data" else
                  f"{clean_ref['source']} ({clean_ref['num_images'] or 'unknown number of'} images)")
    if clean_ref["source"] == "data" and info["noisy_data"]:
        clean_text = "none: the run trained on already-noisy data, so FID is n/a (pass --ref CLEAN_STATS.npz)"
    prox_ref = refs["corrupted"]
    prox_text = (f"the {prox_ref['num_images']} data images as the run corrupts them" if prox_ref["source"] == "data"
                 else f"{prox_ref['source']} ({prox_ref['num_images'] or 'unknown number of'} images)")
    lines += ["", "How the numbers were obtained:", "",
              f"- FID: against clean-data stats from {clean_text}. Proximal FID (DSD Section 4): the row's images "
              f"corrupted once more with the run's observation model (fresh noise keyed by seed or image index), "
              f"against corrupted-data stats from {prox_text}.",
              f"- Generated rows: seeds 0..{info['num'] - 1}; a row's FID and Proximal FID use the same images.",
              "- Observation: the run's corrupted data set taken as the samples (y_i, one fixed corruption per image "
              "as in training, quantised to uint8). Its Proximal FID therefore compares A y_i + sigma eps' (corrupted "
              "twice) with the corrupted stats: the same images underlie both sides, the second corruption is "
              "independent."]
    if floors["proximal_fid"] is not None:
        clean_floor = f"clean {_number(floors['fid'])}, " if floors["fid"] is not None else ""
        lines.append(f"- Sample-size floor: FID between the even- and odd-index halves of the data set "
                     f"({floors['num_images']} images each): {clean_floor}corrupted {_number(floors['proximal_fid'])}. "
                     f"Two samples of one distribution differ by about this much at these sizes.")
    if info["corruption"].startswith("BlurNoise"):
        lines.append("- Blur + noise run: DSD's Ambient-Full/Ambient-Truncated samplers (Algorithm 3) assume the "
                     "noise-only process. The teacher is sampled on the PF-ODE of its DCT blur + noise process down "
                     "to level 0 (paper 004), the analogue of Ambient-Full; no truncated analogue is defined, so that "
                     "row is absent.")
    return "\n".join(lines) + "\n"
