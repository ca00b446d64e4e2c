"""tools/noise_anatomy.py: band power, the student's pass-through gain and the generator loss's slope, against
closed forms (white noise, Parseval, a linear generator, linear score nets) and end to end on a tiny run."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import make_run, smooth_images

from dsd_fast.corruption import NoiseCorruption
from dsd_fast.rundir import code_commit

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "noise_anatomy.py"
_spec = importlib.util.spec_from_file_location("noise_anatomy", SCRIPT)
na = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(na)


def test_white_noise_reads_its_variance_in_every_band():
    s = 0.3
    x = s * torch.randn(64, 2, 28, 28)
    # Each band averages >= ~1,500 independent exponential bin powers of mean s^2: relative s.d. <= 2.6 %.
    for lo_hi, p in zip(na.BANDS, na.band_power(x), strict=True):
        assert p == pytest.approx(s**2, rel=0.15), lo_hi


@pytest.mark.parametrize("shape", [(3, 5, 27, 20), (1, 1, 2, 9), (2, 3, 32, 32)])
def test_one_band_over_every_frequency_is_the_pixel_variance(shape):
    x = torch.randn(shape, dtype=torch.float64) * torch.rand(shape[0], 1, 1, 1, dtype=torch.float64) + 3
    (p,) = na.band_power(x, ((0.0, 1.0),))
    assert p == pytest.approx(float(x.var(dim=(2, 3), unbiased=True).mean()), rel=1e-10)


def test_band_power_ignores_each_images_mean_and_flags_bad_input():
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    assert na.band_power(x + torch.randn(4, 1, 1, 1, dtype=torch.float64)) == pytest.approx(na.band_power(x))
    with pytest.raises(ValueError, match="bands: .*holds no frequency"):
        na.band_power(x, ((0.9, 1.0),))
    with pytest.raises(ValueError, match="x: expected a float"):
        na.band_power(torch.zeros(2, 16, 16, dtype=torch.uint8))


def test_passthrough_gain_reads_the_copied_fraction_of_z():
    z = torch.randn(64, 1, 28, 28)
    assert na.passthrough_gain(0.07 * z, z) == pytest.approx(0.07, rel=1e-6)  # 0.07 z rounded to float32
    # + a smooth image and noise of their own, uncorrelated with z: beta's s.e. ~ 0.3 / sqrt(50,000 pixels).
    smooth = torch.nn.functional.interpolate(torch.randn(64, 1, 7, 7), size=28, mode="bilinear")
    x_g = 0.05 * z + smooth + 0.3 * torch.randn(z.shape)
    assert na.passthrough_gain(x_g, z) == pytest.approx(0.05, abs=0.01)
    with pytest.raises(ValueError, match="x_g: expected the latents' shape"):
        na.passthrough_gain(x_g[:, :, :27], z)


class Linear(torch.nn.Module):
    """D(x; sigma) = k x: a score net whose loss slope has a closed form."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x, sigma):
        return self.k * x


def test_loss_slope_matches_the_closed_form_for_linear_nets():
    a, b, c, alpha, sigma_init = 0.7, 0.4, 0.3, 1.2, 2.5
    z = torch.randn(6, 2, 9, 7, dtype=torch.float64)
    sigma_t = 0.2 + 3 * torch.rand(6, dtype=torch.float64)
    eps = torch.randn(z.shape, dtype=torch.float64)
    slope = na.loss_slope(Linear(c), Linear(a), Linear(b), NoiseCorruption(0.2), z, sigma_t, eps, sigma_init, alpha)
    # L = w [(1 - alpha) (a - b)^2 x_t^2 + (a - b) x_t (b x_t - x_g)] over pixels, x_g = c sigma_init z - gamma z,
    # x_t = x_g + sigma_t eps, w = 1 / mean|x_g - a x_t| held fixed: d/dgamma at gamma = 0 by hand.
    x_g = (c * sigma_init * z).numpy()
    x_t = x_g + sigma_t.numpy()[:, None, None, None] * eps.numpy()
    z_ = z.numpy()
    w = 1 / np.abs(x_g - a * x_t).reshape(6, -1).mean(1)
    per = (z_ * (-2 * (1 - alpha) * (a - b) ** 2 * x_t + (a - b) * (x_g + (1 - 2 * b) * x_t))).reshape(6, -1).sum(1)
    assert slope == pytest.approx(float((w * per).mean()), rel=1e-9)


def test_end_to_end_on_a_tiny_run(tmp_path):
    run = make_run(tmp_path / "run")
    images = smooth_images(8, generator=torch.Generator().manual_seed(1)).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "data.npz", images=images)
    out = tmp_path / "anatomy.md"
    na.main(["--data", str(tmp_path / "data.npz"), "--sigma", "0.2", "--num", "8", "--steps", "2", "--set",
             f"teacher={run}/last.pt:ambient-truncated", "--set", f"student={run}/last.pt", "--slope",
             f"{run}/last.pt", "--slope-batches", "2", "--slope-sigma-t", "0.3,1", "--refresh-fake", "2:1e-3", "--out",
             str(out)])
    text = out.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {"clean data", "data + σ=0.2 noise", "teacher", "student"} <= set(rows)
    beta = float(rows["student"].split("|")[-2])
    assert math.isfinite(beta) and rows["teacher"].split("|")[-2].strip() == ""
    slopes = [line for line in text.splitlines() if line.startswith("| [") or "(fixed)" in line]
    assert len(slopes) == 2 * (len(na.LEVEL_BANDS) + 2) and all("±" in line for line in slopes)  # before, after
    assert "after 2 more fake-score updates at lr 0.001 with G frozen" in text
    assert text.startswith("Made by `python tools/noise_anatomy.py --data ")
    assert f" at commit {code_commit()} in " in text.splitlines()[0]
    assert not list(tmp_path.glob("anatomy.md.*"))  # written whole (a temp file renamed)


def test_refresh_trains_the_fake_score_only_and_slopes_pair(tmp_path):
    run = make_run(tmp_path / "run")
    distill = na.phase2(f"{run}/last.pt")
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in
              (("G", distill.G), ("f_phi", distill.f_phi), ("f_psi", distill.f_psi))}
    table = na.slope_table(distill, 2, 4, seed=7)
    assert na.slope_table(distill, 2, 4, seed=7) == table  # one seed, the same draws: paired tables
    assert math.isfinite(na.refresh_fake(distill, 2, 1e-3))
    moved = {name: any(not torch.equal(p, q) for p, q in zip(ps, net.parameters(), strict=True)) for (name, ps), net
             in zip(before.items(), (distill.G, distill.f_phi, distill.f_psi), strict=True)}
    assert moved == {"G": False, "f_phi": False, "f_psi": True}


def test_slope_refuses_a_phase_one_checkpoint(tmp_path):
    run = make_run(tmp_path / "run")
    phase1 = sorted(Path(run).glob("pretrain-*.pt"))
    with pytest.raises(ValueError, match="slope: .*not a Phase II full training state"):
        na.phase2(phase1[0])


@pytest.mark.parametrize("argv, message", [
    (["--set", "student"], "--set: expected NAME=CKPT"),
    (["--set", "=a.pt"], "--set: expected NAME=CKPT"),
    (["--set", "a=x.pt", "--set", "a=y.pt"], "--set: expected a name of its own"),
    (["--num", "1"], "--num and --slope-batches: expected >= 2"),
    (["--sigma", "0"], "--sigma: expected a noise std > 0"),
    (["--refresh-fake", "10"], "expected --slope LAST_PT as well"),
    (["--slope", "x.pt", "--refresh-fake", "0"], "expected N >= 1"),
    (["--slope", "x.pt", "--slope-sigma-t", "0.2,-1"], "expected levels > 0"),
])
def test_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        na.parse(argv)
    assert message in capsys.readouterr().err
