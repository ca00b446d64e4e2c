"""Training loop tests on CPU with the cpu-tiny preset and a few 32x32 images: losses fall on a fixed batch
(Phase I and II, noise and blur), run-directory files, checkpoint reload, exact resume across Ctrl-C and the
phase boundary, the non-finite guard, and clear errors (nothing overwritten) on bad input."""

import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dsd_fast import checks
from dsd_fast.cli import main
from dsd_fast.data import GPUData
from dsd_fast.networks import PRESETS, build_network, resolve_config
from dsd_fast.reference.edm import karras_sigma
from dsd_fast.rundir import load_checkpoint, to_uint8_grid
from dsd_fast.sampling import one_step
from dsd_fast.training import Distill, Options, Pretrain, TrainingError, train
from dsd_fast.training.ema import EMA, ema_beta
from dsd_fast.training.loop import seed_dropout
from dsd_fast.training.phase1 import sample_sigma_t
from dsd_fast.training.update import guarded_step

CPU = torch.device("cpu")
CONFIG = resolve_config("cpu-tiny")


def _seed():
    return random.getrandbits(24)


def _images(n, channels=3, resolution=32):
    """Smooth random uint8 images (bilinear upsampling of 4x4 noise): learnable within a few steps."""
    x = torch.nn.functional.interpolate(torch.rand(n, channels, 4, 4), size=resolution, mode="bilinear")
    return (x * 255).round().to(torch.uint8)


def _options(**kw):
    base = dict(preset="cpu-tiny", batch=2, seed=_seed(), lr=1e-3, g_lr=1e-4, lr_rampup_kimg=0, log_every=1,
                grid_images=0, sample_steps=2, snapshot_kimg=1000, pretrain_kimg=0.004, distill_kimg=0.004)
    return Options(**{**base, **kw})


def _data(o, n=5):
    return GPUData(_images(n), device=CPU, corruption=o.make_corruption(), seed=o.seed)


def _corruption(name):
    return dict(corruption="blur", blur=0.5 + torch.rand(()).item()) if name == "blur" else dict(corruption="noise")


def _tree(path):
    """{name: bytes} of every file in a directory (to show nothing was overwritten)."""
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


@pytest.mark.parametrize("corruption", ["noise", "blur"])
def test_losses_fall_on_a_fixed_batch(corruption):
    """Repeating step 0 repeats its batch, sigma_t and noise: a few Adam steps must lower every loss (Phase I, the
    fake score's ambient loss on generated data, the SiD generator loss with both score nets frozen)."""
    o = _options(batch=2, **_corruption(corruption))
    p = Pretrain(o, CONFIG, _data(o), CPU)
    losses = [p.step(0)[1]["loss"] for _ in range(3)]
    assert losses[-1] < losses[0], losses
    d = Distill(o, CONFIG, None, CPU, p.ema.state_dict())
    shape = (2, 3, 32, 32)
    fake = []
    for _ in range(3):
        fake.append(d.f_psi_step(0, 2, shape))
        assert guarded_step(d.f_psi_opt, fake[-1], 1e-3)
    assert fake[-1] < fake[0], fake
    gen = []
    for _ in range(3):
        gen.append(d.generator_step(0, 2, shape))
        assert guarded_step(d.G_opt, gen[-1], 1e-4)
    assert gen[-1] < gen[0], gen
    # The generator step never changes the frozen teacher or the fake score.
    assert all(not p.requires_grad for p in d.f_phi.parameters())
    assert all(p.requires_grad for p in d.f_psi.parameters()) and d.f_psi.training


def test_resume_is_exact_across_ctrl_c_and_the_phase_boundary(tmp_path):
    """Uninterrupted: 2 Phase I + 2 Phase II steps. Interrupted: Ctrl-C (a real SIGINT) after Phase I step 0,
    resume, KeyboardInterrupt after Phase II step 0, resume. Every loss must match to 1e-6."""
    o = _options(corruption="noise", sigma=0.1 + 0.2 * torch.rand(()).item(), batch=2, batch_gpu=1)
    data = _data(o)
    ref = []
    assert train(o, phases=("pretrain", "distill"), outdir=tmp_path / "a", data=data, progress=False,
                 on_step=lambda k, m: ref.append(m)) == "done"
    assert len(ref) == 4

    got = []

    def sigint_after_first(k, m):
        got.append(m)
        if len(got) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # deferred to the end of the step, then a checkpoint

    run = tmp_path / "b"
    assert train(o, phases=("pretrain", "distill"), outdir=run, data=data, progress=False,
                 on_step=sigint_after_first) == "interrupted"
    assert load_checkpoint(run / "last.pt")["step"] == 1

    def interrupt_in_distill(k, m):
        got.append(m)
        if "fake_loss" in m:
            raise KeyboardInterrupt

    assert train(None, phases=("pretrain", "distill"), resume=run, data=data, progress=False,
                 on_step=interrupt_in_distill) == "interrupted"
    state = load_checkpoint(run / "last.pt")
    assert (state["phase"], state["step"]) == ("distill", 1)
    assert train(None, phases=("pretrain", "distill"), resume=run, data=data, progress=False,
                 on_step=lambda k, m: got.append(m)) == "done"
    assert len(got) == 4
    for a, b in zip(ref, got, strict=True):
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, ref, got)
    # metrics.jsonl keeps one line per step, without the lines of the interrupted attempts.
    lines = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [(r["phase"], r["step"]) for r in lines] == [("pretrain", 1), ("pretrain", 2), ("distill", 1),
                                                       ("distill", 2)]


def test_cli_pretrain_ctrl_c_resume_then_distill(tmp_path, monkeypatch):
    """End to end through the CLI on an .npz data set: pretrain (Ctrl-C after step 0: exit 0, checkpoint),
    --resume, then distill --teacher; every run-directory file exists and the checkpoints reload."""
    images = _images(6).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "data.npz", x=images)
    run, run2 = tmp_path / "run", tmp_path / "run2"
    common = ["--preset", "cpu-tiny", "--batch", "2", "--lr-rampup-kimg", "0", "--grid-images", "4",
              "--sample-steps", "2", "--log-every", "1", "--seed", str(_seed())]
    original = Pretrain.step

    def step_then_sigint(self, k):
        out = original(self, k)
        if k == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Pretrain, "step", step_then_sigint)
    r = CliRunner().invoke(main, ["pretrain", "--dataset", str(tmp_path / "data.npz"), "--kimg", "0.004",
                                  "--snapshot-kimg", "0.004", "--corruption", "blur", "--blur", "0.7",
                                  "--outdir", str(run), *common])
    assert r.exit_code == 0, r.output
    assert "Interrupted" in r.output and load_checkpoint(run / "last.pt")["step"] == 1
    monkeypatch.setattr(Pretrain, "step", original)
    r = CliRunner().invoke(main, ["pretrain", "--resume", str(run)])
    assert r.exit_code == 0, r.output
    for name in ("options.json", "metrics.jsonl", "last.pt", "data.png", "pretrain-000000.004kimg.pt",
                 "pretrain-000000.004kimg-teacher.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "options.json").read_text())
    assert (saved["corruption"], saved["blur"], saved["sigma"]) == ("blur", 0.7, 0.2)
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert {"phase", "step", "kimg", "loss", "img_per_s", "lr", "mem_mb"} <= set(records[0])

    r = CliRunner().invoke(main, ["distill", "--teacher", str(run / "pretrain-000000.004kimg.pt"), "--kimg",
                                  "0.002", "--snapshot-kimg", "0.002", "--outdir", str(run2), "--batch", "2",
                                  "--grid-images", "4", "--log-every", "1"])
    assert r.exit_code == 0, r.output
    saved2 = json.loads((run2 / "options.json").read_text())
    assert (saved2["corruption"], saved2["blur"], saved2["dataset"]) == ("blur", 0.7, str(tmp_path / "data.npz"))
    for name in ("last.pt", "distill-000000.002kimg.pt", "distill-000000.002kimg-student.png", "data.png"):
        assert (run2 / name).is_file(), name
    state = load_checkpoint(run2 / "last.pt")
    net = build_network(CONFIG)
    net.load_state_dict(state["G_ema"])
    x = one_step(net.eval(), torch.randn(3, 3, 32, 32))
    assert x.shape == (3, 3, 32, 32) and torch.isfinite(x).all()
    teacher = load_checkpoint(run / "last.pt")
    assert all(torch.equal(state["teacher"][k], teacher["ema"][k]) for k in teacher["ema"])


def test_nonfinite_guard_stops_with_a_clear_error(tmp_path):
    o = _options(max_nonfinite=2)

    class NaNData:
        resolution, channels = 32, 3

        def __len__(self):
            return 4

        def batch(self, step, batch_size, rank=0, world_size=1):
            return torch.full((batch_size, 3, 32, 32), float("nan")), torch.arange(batch_size)

    p = Pretrain(o, CONFIG, NaNData(), CPU)
    before = {k: v.clone() for k, v in p.net.state_dict().items()}
    finite, metrics = p.step(0)
    assert not finite and p.nonfinite == 1
    assert all(torch.equal(before[k], v) for k, v in p.net.state_dict().items())  # the step was skipped
    with pytest.raises(TrainingError, match="2 non-finite losses in a row"):
        train(o, outdir=tmp_path / "run", data=NaNData(), progress=False)


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.setenv("DSD_FAST_DATA", str(tmp_path / "empty"))
    out = tmp_path / "out"
    args = ["pretrain", "--preset", "cpu-tiny", "--outdir", str(out)]
    r = runner.invoke(main, [*args, "--dataset", "cifar10"])  # missing data set: says what to download
    assert r.exit_code == 1 and "cifar10" in r.output and "download" in r.output, r.output
    r = runner.invoke(main, [*args, "--dataset", str(tmp_path / "nope.zip")])
    assert r.exit_code == 1 and "nope.zip" in r.output, r.output
    np.savez(tmp_path / "small.npz", x=_images(3, resolution=28).permute(0, 2, 3, 1).numpy())
    r = runner.invoke(main, [*args, "--dataset", str(tmp_path / "small.npz")])  # 28x28 for a 32x32 net
    assert r.exit_code == 1 and "resolution" in r.output and "32x32" in r.output, r.output
    for bad in ("nan", "inf", "-0.1"):
        r = runner.invoke(main, [*args, "--dataset", str(tmp_path / "small.npz"), "--sigma", bad])
        assert r.exit_code == 1 and "sigma" in r.output, r.output
    with pytest.raises(ValueError, match="batch_gpu"):
        _options(batch=4, batch_gpu=3)
    with pytest.raises(ValueError, match="blur"):
        _options(corruption="blur", blur=0.0)
    assert not out.exists()

    # A teacher of another architecture, and a file that is not a checkpoint.
    wrong = tmp_path / "wrong.pt"
    torch.save(dict(phase="pretrain", ema={}, net_config=vars(PRESETS["cifar10"])), wrong)
    with pytest.raises(ValueError, match="architecture.*model_channels"):
        train(_options(teacher=str(wrong)), phases=("distill",), outdir=out, progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        train(_options(teacher=str(tmp_path / "junk.pt")), phases=("distill",), outdir=out, progress=False)
    assert not out.exists()

    # Resume with a different config, or a new run into an existing run directory: nothing is touched.
    np.savez(tmp_path / "data.npz", x=_images(4).numpy())  # NCHW works as well
    o = _options(pretrain_kimg=0.002, dataset=str(tmp_path / "data.npz"))
    data = _data(o)
    assert train(o, outdir=out, progress=False) == "done"
    before = _tree(out)
    other = Options(**{**o.to_dict(), "sigma": o.sigma + 0.1, "pretrain_kimg": 0.004})
    with pytest.raises(ValueError, match="resume: the options differ.*sigma"):
        train(other, resume=out, data=data, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(o, outdir=out, data=data, progress=False)
    r = runner.invoke(main, ["pretrain", "--resume", str(out), "--seed", str(o.seed + 1)])
    assert r.exit_code == 1 and "seed" in r.output, r.output
    assert _tree(out) == before

    # `train --resume` of a finished Phase I run goes on into Phase II (its length may change on resume).
    r = runner.invoke(main, ["train", "--resume", str(out), "--distill-kimg", "0.002"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out / "last.pt")["phase"] == "distill"


def test_bf16_autocast_steps():
    o = _options(precision="bf16", batch=2)
    p = Pretrain(o, CONFIG, _data(o), CPU)
    ref = Pretrain(_options(**{**o.to_dict(), "precision": "fp32"}), CONFIG, p.data, CPU)
    with torch.no_grad():  # EDM zero-initialises the output layer: make F(x) non-zero so precision matters
        for w in p.net.parameters():
            w.add_(0.05 * torch.randn_like(w))
    ref.net.load_state_dict(p.net.state_dict())
    lo, lo_ref = p.step(0)[1]["loss"], ref.step(0)[1]["loss"]
    assert lo != lo_ref and abs(lo - lo_ref) < 0.05 * lo_ref  # bf16 really ran, and close to fp32
    d = Distill(o, CONFIG, None, CPU, p.net.state_dict())
    loss = d.generator_step(0, 2, (2, 3, 32, 32))
    assert math.isfinite(loss) and all(w.grad is not None and w.grad.abs().sum() > 0 for w in d.G.parameters())


def test_ema_and_grid():
    net = build_network(CONFIG)
    ema = EMA(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in ema.net.parameters()]
    beta = ema_beta(nimg=4000, batch=8, halflife_kimg=0.1, rampup_ratio=None)
    assert beta == pytest.approx(0.5 ** (8 / 100))
    assert ema_beta(nimg=80, batch=8, halflife_kimg=500, rampup_ratio=0.05) == pytest.approx(0.5 ** 2)
    ema.update(net, beta)
    for e, o, p in zip(ema.net.parameters(), old, net.parameters(), strict=True):
        torch.testing.assert_close(e, beta * o + (1 - beta) * p)
    x = torch.rand(5, 3, 4, 6) * 2 - 1
    g = to_uint8_grid(x)
    assert g.shape == (2 * 4, 3 * 6, 3) and g[4:, 12:].max() == 0  # 3 columns, 6th tile empty
    expected = (x[4] * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(g[4:8, 6:12], expected)


@pytest.mark.parametrize("precision, dtype, corruption", [("fp32", torch.float32, "noise"),
                                                       ("fp32", torch.float32, "blur"),
                                                       ("fp64", torch.float64, "noise")])
def test_clamp_sampling_trains(precision, dtype, corruption):
    """--sigma-sampling clamp (reference-code parity): the clamped draws sit on the next float above sigma in the
    training dtype (a float64 nextafter rounded back to sigma in float32, and inject rejected every clamped step),
    they carry ~no loss, and Phase I and the fake-score step run with them."""
    o = _options(sigma_sampling="clamp", precision=precision, batch=8, sigma=0.4, **_corruption(corruption))
    s = sample_sigma_t(o, 123, 4096, CPU, dtype=dtype)
    floor = torch.tensor(o.sigma, dtype=dtype).nextafter(torch.tensor(math.inf, dtype=dtype))
    assert s.dtype == dtype and bool((s >= floor).all())
    clamped = (s == floor).double().mean().item()
    assert abs(clamped - 0.5934) < 0.03  # P(lognormal(-1.2, 1.2) <= 0.4) = Phi((ln 0.4 + 1.2) / 1.2)
    assert Pretrain(o, CONFIG, _data(o), CPU).step(0)[0]
    d = Distill(o, CONFIG, None, CPU, build_network(CONFIG).state_dict())
    assert math.isfinite(d.f_psi_step(0, 8, (8, 3, 32, 32)))


@pytest.mark.parametrize("corruption", ["noise", "blur"])
def test_training_loss_runs_the_public_ops_and_equals_the_reference_path(corruption):
    """Phase I's loss as the trainer computes it now (corruption.inject_seeded: add_noise / dct_inject with the noise
    drawn in the op, then precond_ambient_loss on the raw network output: ambient_loss_precond / dct_ambient_loss)
    equals the plain-torch path it replaced (eps materialised from the same Philox stream, x0_hat = D(x_t), the
    corruption's reference ambient loss) in fp64, loss and parameter gradients, over a round at an offset."""
    from dsd_fast.corruption import Corruption
    from dsd_fast.reference.philox import stream_normal
    from dsd_fast.training.phase1 import ambient_training_loss

    o = Options(preset="cpu-tiny", corruption=corruption, sigma=0.2, **({"blur": 0.8} if corruption == "blur" else {}))
    cor = o.make_corruption()
    net = build_network("cpu-tiny").double()
    y = torch.randn(3, 3, 32, 32, dtype=torch.float64).clamp(-1, 1)
    sigma_t = sample_sigma_t(o, random.getrandbits(48), 3, "cpu", dtype=torch.float64)
    seed, offset = random.getrandbits(63), 5 * y[0].numel()
    new = ambient_training_loss(net, cor, y, sigma_t, seed, offset, "fp64")
    g_new = torch.autograd.grad(new.sum(), list(net.parameters()))
    eps = stream_normal(seed, offset, tuple(y.shape), torch.float64)
    x_t = cor.inject(y, sigma_t, eps)
    old = Corruption.ambient_loss(cor, net(x_t, sigma_t), x_t, y, sigma_t)  # the generic reference formula
    g_old = torch.autograd.grad(old.sum(), list(net.parameters()))
    torch.testing.assert_close(new, old, rtol=1e-12, atol=0)
    for a, b in zip(g_new, g_old, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """The dsd_fast:: ops a block of code dispatches (forward and backward), by name."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dsd_fast":
            self.seen.add(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("corruption", ["noise", "blur"])
def test_fused_rung_steps_run_the_fused_ops(monkeypatch, corruption):
    """What bench/test_bench_train.py's "+fused" rung claims: with the fused backend (the Triton kernels, interpreted
    on the CPU) a Phase I step and a Phase II step (fake-score update and generator update) dispatch the fused
    ops for injection, the ambient loss and the SiD loss, forward and backward. Nothing of the kind runs with the
    reference backend (the eager rungs)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    o = _options(**_corruption(corruption))
    config = resolve_config("cpu-tiny")
    expect = ({"corrupt", "add_noise", "ambient_loss_precond", "ambient_loss_backward"}
              if corruption == "noise" else {"dct_inject_seeded", "dct_ambient_loss"})
    for backend, fused in (("triton", True), ("reference", False)):
        monkeypatch.setenv("DSD_FAST_BACKEND", backend)
        data = _data(o)
        p1 = Pretrain(o, config, data, CPU)
        with _OpCounter() as ops:
            p1.step(0)
        assert (expect <= ops.seen) if fused else not ops.seen, (backend, ops.seen)
        d = Distill(o, config, data, CPU, p1.teacher_state())
        with _OpCounter() as ops:
            d.step(0)
        want = expect | {"corrupt", "sid_generator_loss", "sid_generator_loss_backward"}
        assert (want <= ops.seen) if fused else not ops.seen, (backend, ops.seen)


@pytest.mark.parametrize("g_sigma_min", ["sigma", 0.5, 0.002])
def test_generator_levels_respect_g_sigma_min(g_sigma_min):
    """Every generator-step level is >= the floor (g_sigma_min; "sigma": the observation sigma) and within the Karras
    schedule's t_max cap; with SiD's 0.002 some levels fall below the observation sigma."""
    o = _options(sigma=0.2, g_sigma_min=g_sigma_min)
    d = Distill(o, CONFIG, None, CPU, build_network(CONFIG).state_dict())
    dummy = torch.zeros((), requires_grad=True)
    seen = []

    def record(z, sigma_t, eps):
        seen.append(sigma_t.detach().clone())
        return dummy + 0 * sigma_t

    d.generator_loss_fn = record
    n = 512
    for k in range(2):
        d.generator_step(k, n, (n, 3, 32, 32))
    levels = torch.cat(seen).double()
    floor = o.sigma if g_sigma_min == "sigma" else g_sigma_min
    assert levels.numel() == 2 * n
    assert levels.min() >= floor * (1 - 1e-6)
    cap = karras_sigma(torch.tensor(o.t_max / 1000, dtype=torch.float64), sigma_min=floor)
    assert levels.max() <= cap * 1.000001
    assert ((levels < o.sigma).any()) == (floor < o.sigma)


def test_g_sigma_min_is_validated():
    assert _options(sigma=0.3, g_sigma_min="sigma").generator_sigma_min() == 0.3
    for bad in ("observation", 0, -0.1, float("nan"), 80.0):
        with pytest.raises(ValueError, match="g_sigma_min"):
            _options(g_sigma_min=bad)
    with pytest.raises(ValueError, match="g_sigma_min"):
        _options(sigma=0.0, g_sigma_min="sigma")


def test_fake_steps_and_fake_lr():
    """fake_steps=K: each step makes K fake-score updates at fake_lr, keyed by K*step+j (no draw shared between
    updates or steps), then one generator update at g_lr: the same as making those calls by hand."""
    o = _options(batch=2, g_lr=1e-4, fake_lr=3e-4, fake_steps=3)
    teacher = Pretrain(o, CONFIG, _data(o), CPU).ema.state_dict()
    d, ref = Distill(o, CONFIG, None, CPU, teacher), Distill(o, CONFIG, None, CPU, teacher)
    seen, f_psi_step = [], d.f_psi_step
    d.f_psi_step = lambda k, n, shape: seen.append(k) or f_psi_step(k, n, shape)
    shape = (2, 3, 32, 32)
    for k in range(2):
        finite, metrics = d.step(k)
        assert finite and (metrics["lr"], metrics["fake_lr"]) == (1e-4, 3e-4)
        seed_dropout(o.seed, k, 0)
        for j in range(3):
            assert guarded_step(ref.f_psi_opt, ref.f_psi_step(3 * k + j, 2, shape), 3e-4)
        assert guarded_step(ref.G_opt, ref.generator_step(k, 2, shape), 1e-4)
    assert seen == [0, 1, 2, 3, 4, 5]
    for net in ("f_psi", "G"):
        for a, b in zip(getattr(d, net).parameters(), getattr(ref, net).parameters(), strict=True):
            assert torch.equal(a, b), net
    fake_state, g_state = next(iter(d.f_psi_opt.state.values())), next(iter(d.G_opt.state.values()))
    assert (int(fake_state["step"]), int(g_state["step"])) == (6, 2)
    assert [g["lr"] for g in d.f_psi_opt.param_groups] == [3e-4] and [g["lr"] for g in d.G_opt.param_groups] == [1e-4]
    # The defaults are SiD's: one fake update per generator update, at the generator's lr.
    sid = _options(g_lr=2e-4)
    assert (sid.fake_steps, sid.fake_lr) == (1, 2e-4)
    for bad in (dict(fake_steps=0), dict(fake_steps=1.5), dict(fake_lr=0.0), dict(fake_lr=-1e-4)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _options(**bad)


class _NoHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on every op that reads a tensor's value on the host: each is a device sync on CUDA (.item(),
    bool(), float(), int(), nonzero, masked_select). A CPU stand-in for torch.cuda.set_sync_debug_mode("error")."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default, torch.ops.aten.equal.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read of a tensor value in a training step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("corruption", ["noise", "blur"])
def test_steps_read_nothing_on_the_host(corruption, monkeypatch):
    """A Phase I step and a Phase II step (fake_steps 2, batch_gpu rounds) read no tensor value on the host, also
    when the loss is not finite; the non-finite guard still skips the update, on the device."""
    o = _options(batch=4, batch_gpu=2, fake_steps=2, **_corruption(corruption))
    p = Pretrain(o, CONFIG, _data(o), CPU)
    p.step(0)  # Adam's state and the lazy module set-up, outside the check
    d = Distill(o, CONFIG, None, CPU, p.ema.state_dict())
    d.step(0)
    # The argument checks that read values run on the CPU only (checks.reads_values): as on a device, skip them.
    monkeypatch.setattr(checks, "reads_values", lambda t: False)
    with monkeypatch.context() as m, _NoHostReads():
        for name in ("tolist", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"Tensor.{_n} in a step"))
        finite, metrics = p.step(1)
        finite2, metrics2 = d.step(1)
    assert bool(finite) and bool(finite2) and math.isfinite(float(metrics["loss"]))
    assert math.isfinite(float(metrics2["fake_loss"])) and (p.nonfinite, d.nonfinite) == (0, 0)
    # A non-finite generator loss: G, its EMA and its Adam state stay as they were, and the count says 1.
    before = [t.clone() for t in (*d.G.parameters(), *d.G_ema.net.parameters())]
    g_state = {k: v.clone() for k, v in next(iter(d.G_opt.state.values())).items()}
    d.generator_loss_fn = lambda z, s, e: torch.full((z.shape[0],), float("nan"), requires_grad=True) * 1
    with _NoHostReads():
        finite, _ = d.step(2)
    assert not bool(finite) and d.nonfinite == 1 and d.bad.read() == (1, 1, 2)
    after = [*d.G.parameters(), *d.G_ema.net.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.equal(v, next(iter(d.G_opt.state.values()))[k]) for k, v in g_state.items())


@pytest.mark.gpu
@pytest.mark.parametrize("corruption", ["noise", "blur"])
def test_cuda_steps_do_not_sync(corruption):
    """On CUDA, with torch.cuda.set_sync_debug_mode("error"): a Phase I and a Phase II step (batch_gpu rounds,
    fake_steps 2) from the resident loader raise nothing (no .item(), no blocking copy, no data-dependent shape)."""
    cuda = torch.device("cuda")
    o = _options(batch=4, batch_gpu=2, fake_steps=2, **_corruption(corruption))
    data = GPUData(_images(5), device=cuda, corruption=o.make_corruption(), seed=o.seed)
    p = Pretrain(o, CONFIG, data, cuda)
    p.step(0)  # lazy set-up (Adam state, cuBLAS handles) outside the check
    d = Distill(o, CONFIG, None, cuda, p.ema.state_dict())
    d.step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        finite, _ = p.step(1)
        finite2, _ = d.step(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(finite) and bool(finite2)


def test_g_lr_schedule_cosine():
    """cosine: both nets' lr is g_lr / fake_lr * (1 + cos(pi k / K)) / 2 at step k of K = the distill_kimg steps
    (1 at the start, 1/2 half-way, 0 at the end); constant (SiD's default) keeps them."""
    from dsd_fast.training.phase2 import lr_decay

    o = _options(batch=2, distill_kimg=0.016, g_lr=2e-4, fake_lr=6e-4, g_lr_schedule="cosine")  # K = 8 steps
    assert [lr_decay(o, k) for k in (0, 4, 8, 9)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-15)
    assert lr_decay(o, 2) == pytest.approx((1 + math.cos(math.pi / 4)) / 2, rel=1e-15)
    assert lr_decay(_options(), 5) == 1.0
    teacher = Pretrain(o, CONFIG, _data(o), CPU).ema.state_dict()
    d = Distill(o, CONFIG, None, CPU, teacher)
    for k in range(3):
        _, metrics = d.step(k)
        want = (1 + math.cos(math.pi * k / 8)) / 2
        assert (metrics["lr"], metrics["fake_lr"]) == pytest.approx((2e-4 * want, 6e-4 * want), rel=1e-12)
        assert d.G_opt.param_groups[0]["lr"] == pytest.approx(2e-4 * want, rel=1e-12)
        assert d.f_psi_opt.param_groups[0]["lr"] == pytest.approx(6e-4 * want, rel=1e-12)
    with pytest.raises(ValueError, match="g_lr_schedule"):
        _options(g_lr_schedule="linear")


def test_g_ema_rampup_ratio():
    """The generator EMA caps its half-life at g_ema_rampup_ratio * images seen (its own knob, not Phase I's
    ema_rampup_ratio): after each step G_ema = beta G_ema + (1 - beta) G with that beta; 0 removes the cap."""
    o = _options(batch=2, g_ema_rampup_ratio=0.4, g_ema_halflife_kimg=500, ema_rampup_ratio=0.05)
    teacher = Pretrain(o, CONFIG, _data(o), CPU).ema.state_dict()
    d = Distill(o, CONFIG, None, CPU, teacher)
    for k in range(2):
        old = [p.clone() for p in d.G_ema.net.parameters()]
        assert d.step(k)[0]
        beta = ema_beta((k + 1) * 2, 2, 500, 0.4)
        assert beta == pytest.approx(0.5 ** (2 / (0.4 * 2 * (k + 1))))
        for e, w, g in zip(d.G_ema.net.parameters(), old, d.G.parameters(), strict=True):
            torch.testing.assert_close(e, beta * w + (1 - beta) * g)
    assert ema_beta(2, 2, 0.001, 0) == pytest.approx(0.5 ** (2 / 1))  # no cap: the half-life alone
    assert _options().g_ema_rampup_ratio == 0.05  # unchanged default: runs made before the knob resume exactly
    with pytest.raises(ValueError, match="g_ema_rampup_ratio"):
        _options(g_ema_rampup_ratio=-0.1)
