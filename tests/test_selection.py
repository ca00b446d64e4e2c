"""In-loop model selection by Proximal FID (training/selection.py) on tiny cpu-tiny runs: metrics.jsonl lines at
the right kimg, the cached reference stats of the run's own corrupted data, best.ckpt + best.json that track the
per-phase minimum and reproduce offline through generation.load_sampler, exact values across Ctrl-C + resume
(reference not recomputed, best-so-far kept), fid off writes nothing, clear errors. A cheap pooling feature net
stands in for Inception except in one end-to-end test with the real network on 8 + 8 images."""

import json
import os
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from runs import smooth_images

from dsd_fast.cli import main
from dsd_fast.data import GPUData
from dsd_fast.data.datasets import to_float, to_uint8
from dsd_fast.evaluation import fid_from_features, proximal_features
from dsd_fast.generation import load_sampler
from dsd_fast.metrics import feature_stats, load_stats
from dsd_fast.rundir import load_checkpoint
from dsd_fast.training import Options, selection, train

REAL_FEATURES = selection.feature_network  # before the autouse fixture replaces it
N_IMAGES = 16
STEP_KIMG = 0.002  # batch 2
FID_STEPS = (1, 2)  # fid_every_kimg 0.002: every step (each phase runs 2)


def cheap_features(images):
    """uint8 [B, C, H, W] -> [B, 48]: 8x8 average pools (a deterministic stand-in for Inception)."""
    return F.avg_pool2d(images.float() / 255, 8).flatten(1)


@pytest.fixture(autouse=True)
def _cheap(monkeypatch):
    monkeypatch.setattr(selection, "feature_network", lambda options, device: cheap_features)


def _options(**kw):
    base = dict(preset="cpu-tiny", batch=2, seed=random.getrandbits(24), lr=1e-3, g_lr=1e-4,
                lr_rampup_kimg=0, log_every=1, grid_images=0, sample_steps=2, snapshot_kimg=STEP_KIMG,
                pretrain_kimg=0.004, distill_kimg=0.004, fid_every_kimg=STEP_KIMG, fid_images=8, fid_ref_images=12)
    return Options(**{**base, **kw})


def _data(o):
    return GPUData(smooth_images(N_IMAGES), device="cpu", corruption=o.make_corruption(), seed=o.seed)


def _proximal(path):
    return [r for r in map(json.loads, open(os.path.join(path, "metrics.jsonl"))) if "proximal_fid" in r]


def _best(path):
    return json.loads(open(os.path.join(path, "best.json")).read())


def _offline(ckpt, o, ref):
    """Proximal FID of a checkpoint measured as `dsd-fast fid --proximal` would (seeds 0..fid_images-1), in the
    loop's batches: another batch size may change the float rounding of the convolutions, and with it a uint8
    pixel here and there."""
    feats = proximal_features(load_sampler(ckpt, steps=o.sample_steps), range(o.fid_images), cheap_features,
                              batch=o.fid_batch, progress=False)
    return fid_from_features(feats, ref)


class Watch:
    """on_step: after every step, best.json must describe the minimum of the latest measured phase's lines so far
    (earliest on ties) and each line's "best" flag must say whether it improved on its phase; keeps a copy of the
    Phase I best.ckpt taken at the phase's last step."""

    def __init__(self, path, copy_to):
        self.path, self.copy_to, self.checks = path, copy_to, 0

    def __call__(self, k, metrics):
        lines = _proximal(self.path)
        if not lines:
            assert not os.path.exists(os.path.join(self.path, "best.json"))
            return
        phase = lines[-1]["phase"]
        mine = [r for r in lines if r["phase"] == phase]
        for i, r in enumerate(mine):
            assert r["best"] == all(r["proximal_fid"] < q["proximal_fid"] for q in mine[:i]), mine
        low = min(mine, key=lambda r: r["proximal_fid"])
        best = _best(self.path)
        assert (best["phase"], best["step"], best["proximal_fid"]) == (phase, low["step"], low["proximal_fid"])
        self.checks += 1
        if "fake_loss" not in metrics and k + 1 == FID_STEPS[-1]:
            shutil.copy(os.path.join(self.path, "best.ckpt"), self.copy_to)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """One uninterrupted noise run (Phase I then II, 2 steps each, Proximal FID after every step)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selection, "feature_network", lambda options, device: cheap_features)
        path = tmp_path_factory.mktemp("sel")
        o = _options(sigma=0.1 + 0.3 * torch.rand(()).item())
        data = _data(o)
        watch = Watch(str(path / "a"), str(path / "pretrain-best.ckpt"))
        assert train(o, phases=("pretrain", "distill"), outdir=path / "a", data=data, progress=False,
                     on_step=watch) == "done"
        assert watch.checks == 4
        return path, o, data


def test_lines_reference_and_best(run_a):
    path, o, data = run_a
    run = path / "a"
    lines = _proximal(run)
    assert [(r["phase"], r["step"], r["kimg"], r["fid_images"]) for r in lines] == \
        [(p, s, s * STEP_KIMG, 8) for p in ("pretrain", "distill") for s in FID_STEPS]
    assert all(r["proximal_fid"] > 0 and r["fid_s"] >= 0 for r in lines)

    # The reference: the first fid_ref_images data images, corrupted exactly as training corrupts them.
    x = data.images[:o.fid_ref_images]
    y = to_uint8(o.make_corruption().corrupt(to_float(x), o.seed, torch.arange(o.fid_ref_images)))
    mu, sigma = load_stats(run / "fid-ref-proximal.npz")
    mu_want, sigma_want = feature_stats(cheap_features(y))
    assert abs(mu - mu_want).max() < 1e-12 and abs(sigma - sigma_want).max() < 1e-12

    # best.ckpt: Phase II's best step's full state (as that step's snapshot); both phases' bests reproduce offline.
    best = _best(run)
    assert (best["fid_images"], best["fid_ref_images"], best["fid_mode"]) == (8, o.fid_ref_images, "edm")
    state, snap = load_checkpoint(run / "best.ckpt"), load_checkpoint(run / f"distill-{best['kimg']:010.3f}kimg.pt")
    assert (state["phase"], state["step"]) == ("distill", best["step"])
    assert all(torch.equal(state["G_ema"][k], v) for k, v in snap["G_ema"].items())
    ref = (mu, sigma)
    assert _offline(run / "best.ckpt", o, ref) == pytest.approx(best["proximal_fid"], rel=1e-9)
    first = min((r for r in lines if r["phase"] == "pretrain"), key=lambda r: r["proximal_fid"])
    teacher = load_checkpoint(path / "pretrain-best.ckpt")
    assert (teacher["phase"], teacher["step"]) == ("pretrain", first["step"])
    assert _offline(path / "pretrain-best.ckpt", o, ref) == pytest.approx(first["proximal_fid"], rel=1e-9)


def test_resume_is_exact_and_keeps_the_reference_and_best(run_a, monkeypatch):
    """Ctrl-C in Phase I after the step-1 measurement, resume: the same proximal_fid values as the uninterrupted
    run (so also deterministic), the reference not recomputed, the best-so-far read from best.json (unless it was
    measured after the resumed checkpoint)."""
    path, o, data = run_a
    calls = []
    original = selection.data_features
    monkeypatch.setattr(selection, "data_features", lambda *a, **k: calls.append(1) or original(*a, **k))

    def stop_after_1(k, m):
        if k == 0:
            raise KeyboardInterrupt

    run = path / "b"
    assert train(o, phases=("pretrain", "distill"), outdir=run, data=data, progress=False,
                 on_step=stop_after_1) == "interrupted"
    assert len(calls) == 1 and load_checkpoint(run / "last.pt")["step"] == 1
    ref_bytes = (run / "fid-ref-proximal.npz").read_bytes()

    # An unbeatable best from before the checkpoint is kept through the rest of Phase I; one written after it
    # (a crashed attempt's) is ignored.
    kept, ignored = path / "kept", path / "ignored"
    for copy, change in ((kept, dict(proximal_fid=-1.0)), (ignored, dict(step=2, proximal_fid=-1.0))):
        shutil.copytree(run, copy)
        (copy / "best.json").write_text(json.dumps({**_best(run), **change}))
        assert train(None, phases=("pretrain",), resume=copy, data=data, progress=False) == "done"
        assert _proximal(copy)[-1]["best"] == (copy == ignored)
        assert _best(copy)["proximal_fid"] == (-1.0 if copy == kept else _proximal(copy)[-1]["proximal_fid"])

    assert train(None, phases=("pretrain", "distill"), resume=run, data=data, progress=False) == "done"
    assert len(calls) == 1  # three resumes, no recomputation
    assert (run / "fid-ref-proximal.npz").read_bytes() == ref_bytes
    assert _proximal(run) == [{**r, "fid_s": q["fid_s"]} for r, q in zip(_proximal(path / "a"), _proximal(run),
                                                                         strict=True)]
    assert _best(run) == _best(path / "a")


def test_off_writes_nothing_and_metric_options_are_fixed_once_measured(run_a, monkeypatch):
    path, o, data = run_a
    monkeypatch.setattr(selection, "feature_network", lambda *a: pytest.fail("features loaded with fid off"))
    off = path / "off"
    o_off = Options(**{**o.to_dict(), "fid_every_kimg": 0.0, "pretrain_kimg": 0.002})
    assert train(o_off, outdir=off, data=data, progress=False) == "done"
    assert not {"best.ckpt", "best.json", "fid-ref-proximal.npz"} & set(os.listdir(off))
    assert not _proximal(off)
    # Not measured yet: a resume may choose the metric. Measured (a's reference exists): it is fixed.
    more = Options(**{**o_off.to_dict(), "pretrain_kimg": 0.004, "fid_images": 5, "fid_mode": "clean"})
    assert train(more, resume=off, data=data, progress=False) == "done"
    changed = Options(**{**o.to_dict(), "fid_images": 5, "fid_every_kimg": 0.004, "fid_batch": 3})
    with pytest.raises(ValueError, match="resume: the options differ.*fid_images"):
        train(changed, phases=("pretrain", "distill"), resume=path / "a", data=data, progress=False)


def test_bad_input_is_a_clear_error_and_writes_nothing(run_a, tmp_path, monkeypatch):
    for field, value in (("fid_every_kimg", -1.0), ("fid_every_kimg", float("nan")), ("fid_images", 1),
                         ("fid_images", 2.5), ("fid_images", True), ("fid_ref_images", 1), ("fid_mode", "fast"),
                         ("fid_batch", 0)):
        with pytest.raises(ValueError, match=f"^{field}: expected"):
            _options(**{field: value})
    o = _options()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="^fid_ref_images: expected 2..16 .*got 17"):
        train(_options(fid_ref_images=17), outdir=out, data=_data(o), progress=False)
    teacher = run_a[0] / "a" / "pretrain-000000.004kimg.pt"  # a distill run without data has no reference
    with pytest.raises(ValueError, match="^fid_every_kimg: .*--dataset"):
        train(_options(teacher=str(teacher)), phases=("distill",), outdir=out, progress=False)

    def missing(options, device):
        raise FileNotFoundError("inception: no weights")

    monkeypatch.setattr(selection, "feature_network", missing)
    with pytest.raises(FileNotFoundError, match="no weights"):
        train(o, outdir=out, data=_data(o), progress=False)
    assert not out.exists()
    r = CliRunner().invoke(main, ["pretrain", "--preset", "cpu-tiny", "--dataset", "x.npz", "--fid-every-kimg", "-1",
                                  "--outdir", str(out)])
    assert r.exit_code == 1 and "fid_every_kimg" in r.output, r.output
    assert not out.exists()


def test_real_inception_end_to_end(tmp_path, monkeypatch):
    """The real FID Inception on 8 corrupted data images and 8 generated ones: one measurement at the end of a
    1-step Phase I (blur: the DCT PF-ODE sampler). (Offline reproduction is checked with the cheap features above:
    a second 2048-d Frechet distance costs ~10 s here.)"""
    monkeypatch.setattr(selection, "feature_network", REAL_FEATURES)
    o = _options(pretrain_kimg=STEP_KIMG, fid_every_kimg=1.0, fid_ref_images=8, corruption="blur", blur=0.7)
    run = tmp_path / "run"
    assert train(o, outdir=run, data=_data(o), progress=False) == "done"
    (line,) = _proximal(run)
    assert (line["phase"], line["step"], line["best"]) == ("pretrain", 1, True)
    mu, sigma = load_stats(run / "fid-ref-proximal.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and line["proximal_fid"] > 0
    best = _best(run)
    assert (best["step"], best["proximal_fid"], best["fid_ref_images"]) == (1, line["proximal_fid"], 8)
    assert load_sampler(run / "best.ckpt").kind == "dct-ode"

