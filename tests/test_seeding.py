"""The suite's one seed mechanism (root conftest.py): a printed session seed replays any test exactly, alone or
among others, for torch, numpy's global RNG and Python's random; a failing test's report says how."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRAWS = '''
import random

import numpy as np
import torch


def test_before():
    torch.rand(5), random.random(), np.random.rand()


def test_draw():
    print("DRAW", random.getrandbits(64), torch.randint(0, 2**62, ()).item(), np.random.randint(2**31))


def test_fail():
    assert False
'''


def _pytest(tmp_path, seed, *select):
    env = {**os.environ, "DSD_FAST_TEST_SEED": str(seed), "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "pytest", "-s", "-p", "conftest", "-p", "no:cacheprovider", "-c", os.devnull,
           "--rootdir", str(tmp_path), *select]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120).stdout


def _draw(out):
    return [line[line.index("DRAW"):] for line in out.splitlines() if "DRAW" in line]


def test_printed_seed_replays_a_test_alone_or_in_the_suite(tmp_path):
    (tmp_path / "test_draws.py").write_text(textwrap.dedent(DRAWS))
    whole = _pytest(tmp_path, 12345, "test_draws.py")
    assert "dsd_fast test seed 12345" in whole
    alone = _pytest(tmp_path, 12345, "test_draws.py::test_draw")
    assert len(_draw(whole)) == 1 and _draw(whole) == _draw(alone)
    assert _draw(_pytest(tmp_path, 12346, "test_draws.py::test_draw")) != _draw(alone)
    assert "replay: DSD_FAST_TEST_SEED=12345 pytest 'test_draws.py::test_fail'" in whole
