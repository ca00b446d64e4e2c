"""examples/toy_2d.py: DSD on a 2-D spiral (the paper's Fig. 4) with the public ops.

The run test trains it at its --small size (about 40 s on 2 busy cores) at sigma = 0.15 and asserts the ordering
that held at full size (2 seeds) and at small size for all 12 seeds tried: the one-step student beats
Ambient-Truncated (the better teacher) and the observations, on the sliced W2 and on the mean distance to the
spiral, and ranks first by the proximal metric. At small size the teachers are under-trained and Ambient-Full is
not reliably better than the observations, so no ordering among those is asserted; nor any at sigma = 0.05, where
at full size DSD wins on sliced W2 only and Ambient-Truncated stays closer to the support (README)."""

import importlib.util
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "toy_2d.py"
_spec = importlib.util.spec_from_file_location("toy_2d", SCRIPT)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def test_small_run_student_beats_teacher_and_observations(tmp_path):
    seed = random.getrandbits(32)
    t0 = time.time()
    cmd = [sys.executable, str(SCRIPT), "--small", "--sigma", "0.15", "--seed", str(seed), "--outdir", str(tmp_path),
           "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    seconds = time.time() - t0
    res = json.loads(out.stdout.strip().splitlines()[-1])
    rows = res["results"][0]["rows"]
    msg = f"seed {seed}: " + json.dumps(rows)
    dsd, trunc, obs = rows["DSD"], rows["Ambient-Truncated"], rows["Observation"]
    # Margins. DSD / min(Ambient-Truncated, Observation) over 12 seeds at this size: sliced W2 mean 0.76, sd 0.06,
    # max 0.88; distance mean 0.77, sd 0.06, max 0.93; proximal SW2 mean 0.63, max 0.77. 0.98 is > 3 sd above the
    # mean for both clean metrics. Full size: 0.56-0.58 (SW2) and 0.59-0.67 (distance).
    for metric, margin in (("sw2", 0.98), ("dist", 0.98), ("prox", 0.9)):
        assert dsd[metric] < margin * min(trunc[metric], obs[metric]), msg
    # The clean yardstick is near zero, so the gaps above are not metric noise.
    assert rows["Clean"]["sw2"] < 0.1 * dsd["sw2"], msg
    assert (tmp_path / "toy_2d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| DSD (step" in (tmp_path / "toy_2d.md").read_text()
    assert seconds < 120, f"--small took {seconds:.0f} s"


def test_sliced_w2_of_a_shift():
    """Every direction sees the shift d projected: SW2 = |d| sqrt(mean cos^2) = |d| / sqrt(2), exactly."""
    x = torch.randn(3000, 2)
    d = torch.randn(2)
    assert abs(toy.sliced_w2(x, x + d) - d.norm().item() / math.sqrt(2)) < 1e-6
    assert toy.sliced_w2(x, x[torch.randperm(len(x))]) < 1e-12
    # Unequal sizes are quantile-matched: two low-discrepancy samples of one distribution are close.
    data = toy.spiral()
    seed = random.getrandbits(31)
    assert toy.sliced_w2(data.reference(4096, seed), data.reference(16384, seed + 1)) < 2e-3


def test_spiral_distance():
    data = toy.spiral()
    gen = torch.Generator().manual_seed(random.getrandbits(63))
    x = data.sample(2000, gen)
    assert data.distance(x).max() < 1e-5
    # Radially off the curve by delta (less than half the 0.63 gap between arms): distance ~ delta (the normal is
    # nearly radial on this spiral; exact only to first order, hence the tolerance).
    delta = 0.05
    r = x.norm(dim=1, keepdim=True)
    d = data.distance(x * (1 + delta / r))
    inner = (r[:, 0] > 0.4) & (r[:, 0] < 1.2)
    assert ((d[inner] - delta).abs() < 0.005).all()


def test_truncated_sampler_stops_at_sigma():
    """Ambient-Truncated returns D(x_t; sigma_t) with sigma_t = sigma (not the first grid level above it)."""
    seen = []

    def D(x, s):
        seen.append(s[0].item())
        return torch.zeros_like(x)

    sigma = 0.05 + random.random() * 0.2
    toy.teacher_samples(D, torch.randn(8, 2, 1, 1), sigma, 37)
    assert abs(seen[-1] / sigma - 1) < 1e-6  # float32 levels; the grid level above sigma is > 25 % above it
    assert min(seen) < 0.01  # Ambient-Full went down to the grid's 0.002


def test_latents_are_jointly_low_discrepancy():
    """z and the proximal metric's eps come from one Sobol sequence: standard normal and uncorrelated (two
    separately scrambled Sobol sequences share their first dimension's base sequence and correlate)."""
    z, eps = toy.latents(4096, random.getrandbits(31))
    g = torch.cat([z.flatten(1), eps], 1)
    assert (g.mean(0).abs() < 0.01).all() and ((g.std(0) - 1).abs() < 0.01).all()
    c = torch.corrcoef(g.T)
    assert (c - torch.eye(4)).abs().max() < 0.02
