"""`dsd-fast eval RUN_DIR`: the DSD paper's Table 2 for one run, as eval.md and eval.json, plus a PNG grid per row.

Rows: Observation (the run's corrupted data itself), the Phase I teacher's samplers (Ambient-Full and
Ambient-Truncated, DSD Algorithm 3; for a blur + noise run its DCT PF-ODE, the Ambient-Full analogue), and the
distilled one-step student (RUN_DIR/last.pt, or --ckpt: a Phase II snapshot of the run). Columns: FID against
clean-data stats and Proximal FID against corrupted-data stats, both computed from the run's data set (as
options.json loads it) unless --ref / --proximal-ref give them.
Generated rows use seeds 0..num-1; FID and Proximal FID of a row come from the same images. Under torchrun the
ranks split the seeds and the data images; rank 0 writes.
"""

import math
import os

import click

from . import fid

OBSERVATION = ("observation", "Observation", None)
# (key, row name, sampler) per observation model: the paper's rows, in its order.
TEACHER_ROWS = {
    "noise": [("ambient-full", "Ambient-Full", "ambient-full"),
              ("ambient-truncated", "Ambient-Truncated", "ambient-truncated")],
    "blur": [("dct-ode", "Teacher DCT PF-ODE (Ambient-Full analogue)", "dct-ode")],
}
STUDENT = ("dsd", "DSD (one-step)", "one-step")
NO_CLEAN = "n/a (no clean data; pass --ref)"


@click.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--ckpt", metavar="CKPT", default=None,
              help="The student: a Phase II checkpoint or network snapshot (distill-<kimg>kimg.pt, best.ckpt); the "
                   "teacher rows take the teacher from it, or from RUN_DIR/last.pt when it is a snapshot.  "
                   "[RUN_DIR/last.pt]")
@click.option("--num", type=click.IntRange(min=2), default=50000, show_default=True,
              help="Generated images per row (seeds 0..num-1).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Teacher sampler steps.  [18 up to 32x32, 40 above]")
@click.option("--ref", metavar="CLEAN_STATS.npz", default=None,
              help="Clean-data stats for FID.  [computed from the run's data set]")
@click.option("--proximal-ref", metavar="CORRUPTED_STATS.npz", default=None,
              help="Corrupted-data stats for Proximal FID.  [computed from the run's data set]")
@click.option("--batch", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Images per generation batch (per process).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Generator arithmetic.")
@click.option("--data-images", type=click.IntRange(min=2), default=None,
              help="Use the first N data images for the reference stats and the Observation row.  [all]")
@fid.feature_options
@click.option("--grid-images", type=click.IntRange(min=0), default=64, show_default=True,
              help="Images per row's PNG grid (0: none).")
def command(run_dir, ckpt, num, steps, ref, proximal_ref, batch, precision, data_images, mode, inception,
            inception_batch, device, grid_images):
    """Table-2-style comparison of a distilled run: writes RUN_DIR/eval.md, eval.json and eval-<row>.png."""
    try:
        written = evaluate(run_dir, ckpt=ckpt, num=num, steps=steps, ref=ref, proximal_ref=proximal_ref, batch=batch,
                           precision=precision, data_images=data_images, mode=mode, inception=inception,
                           inception_batch=inception_batch, device=device, grid_images=grid_images)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if written is not None:
        click.echo(written)


def evaluate(run_dir, *, ckpt=None, num=50000, steps=None, ref=None, proximal_ref=None, batch=1024, precision="fp32",
             data_images=None, mode="edm", inception=None, inception_batch=256, device=None, grid_images=64):
    """Compute the table and write it (rank 0): returns the markdown, None on other ranks. Every check (run, refs,
    data, weights) comes before any generation, and nothing is written before everything is computed."""
    from ..evaluation import load_reference
    from ..networks import resolve_config

    options = fid.run_options(run_dir, "run_dir")
    ckpt, teacher_ckpt = _checkpoints(run_dir, ckpt)
    refs = {"clean": load_reference(ref, corrupted=False, mode=mode, name="ref") if ref else None,
            "corrupted": load_reference(proximal_ref, corrupted=True, mode=mode, name="proximal_ref")
            if proximal_ref else None}
    images, source = fid.reference_data(options, name="run_dir")
    if data_images is not None:
        if data_images > images.shape[0]:
            raise ValueError(f"data_images: expected at most the {images.shape[0]} images of the run's data set "
                             f"{source}, got {data_images}")
        images = images[:data_images]
    if images.shape[0] < 2:
        raise ValueError(f"run_dir: the run's data set {source} holds {images.shape[0]} image; stats need >= 2")
    config = resolve_config(options.preset)
    steps = steps or fid.default_steps(config.img_resolution)
    rows = [OBSERVATION] + TEACHER_ROWS[options.corruption] + [STUDENT]
    with fid.process_group(device) as par:
        features = fid.feature_network(inception, mode, par.device, inception_batch)
        chw = (config.in_channels, config.img_resolution, config.img_resolution)
        for name, r in (("ref", refs["clean"]), ("proximal_ref", refs["corrupted"])):
            if r is not None:
                fid.check_dim(name, r[0], features, chw)
        table = _measure(options, images, refs, rows, features, par, ckpt=ckpt, teacher_ckpt=teacher_ckpt, num=num,
                         steps=steps, batch=batch, precision=precision, grid_images=grid_images,
                         inception_batch=inception_batch)
        if not par.main:
            return None
        info = dict(run=os.fspath(run_dir), ckpt=ckpt, teacher_ckpt=teacher_ckpt,
                    corruption=repr(options.make_corruption()), noisy_data=options.noisy_data, seed=options.seed,
                    data=source, data_images=images.shape[0], num=num, steps=steps, precision=precision, mode=mode,
                    world_size=par.world_size,
                    references={k: _describe(v, p, images.shape[0]) for (k, v), p in
                                zip(refs.items(), (ref, proximal_ref), strict=True)},
                    **table)
        grids = info.pop("grids")
        for row in info["rows"]:
            if row["key"] in grids:
                _save_grid(grids[row["key"]], os.path.join(run_dir, row["grid"]))
        fid.write_json(os.path.join(run_dir, "eval.json"), info)
        text = markdown(info)
        from ..training.loop import atomic_write_bytes

        atomic_write_bytes(os.path.join(run_dir, "eval.md"), lambda f: f.write(text.encode()))
        return text


def _checkpoints(run_dir, ckpt):
    """(student checkpoint, teacher checkpoint): ckpt (default RUN_DIR/last.pt) must be of Phase II; a full state
    holds the teacher too, a network snapshot does not, and then RUN_DIR/last.pt must (a Phase II state)."""
    from ..training.loop import load_checkpoint

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
    from ..data import to_float
    from ..training.grids import save_grid

    save_grid(to_float(images), path)


def _measure(options, images, refs, rows, features, par, *, ckpt, teacher_ckpt, num, steps, batch, precision,
             grid_images, inception_batch):
    """dict(rows=[...], floors={...}, grids={key: uint8 images}) with every FID (None where no clean stats)."""
    from ..evaluation import fid_from_features, sampler_features_with_proximal
    from ..generation import load_sampler
    from ..metrics import feature_stats

    obs = _observation_features(options, images, features, par, clean=refs["clean"] is None and
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
                grids[key] = _observe(options, images[:grid_images].to(par.device))
            continue
        sampler = load_sampler(ckpt if kind == "one-step" else teacher_ckpt, kind, steps, par.device, precision)
        feats, proximal_feats = sampler_features_with_proximal(sampler, range(num), features, batch=batch, desc=name)
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
    from ..evaluation import fid_from_features
    from ..metrics import feature_stats

    return fid_from_features(feats[0::2], feature_stats(feats[1::2]))


def _observe(options, x, index=None):
    """The run's observations y_i of uint8 data images x with data-set indices index (default 0..); as-is for noisy
    data."""
    import torch

    from ..evaluation import observe

    index = torch.arange(x.shape[0]) if index is None else index
    return x if options.noisy_data else observe(x, options.make_corruption(), options.seed, index)


def _observation_features(options, images, features, par, *, clean, batch):
    """Features, in data-set order, of the clean images x_i (if clean), of the observations y_i (as the run
    corrupts image i: corruption.corrupt(x_i, seed, i)) and of the observations corrupted once more as Proximal FID
    corrupts samples (generation.proximal_corrupt, keyed by i). Ranks take strided shares."""
    import torch
    from tqdm import tqdm

    from ..evaluation import gather_rows
    from ..generation import proximal_corrupt

    corruption = options.make_corruption()
    mine = torch.arange(par.rank, images.shape[0], par.world_size)
    out = {k: [] for k in ("index", "clean", "corrupted", "proximal")}
    with tqdm(total=images.shape[0], desc="Observation", unit="img", disable=not par.main, dynamic_ncols=True) as bar:
        for i in mine.split(batch):
            x = images[i].to(par.device)
            index = i.to(par.device)
            y = _observe(options, x, index)
            out["index"].append(index.view(-1, 1))
            if clean:
                out["clean"].append(features(x))
            out["corrupted"].append(features(y))
            out["proximal"].append(features(proximal_corrupt(y, corruption, index)))
            bar.update(len(i) * par.world_size)
    gathered = {k: gather_rows(torch.cat(v).to(par.device)).cpu() if v else None for k, v in out.items()}
    order = gathered.pop("index").view(-1).argsort()
    return {k: v[order] if v is not None else None for k, v in gathered.items()}


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
