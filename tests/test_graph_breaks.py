"""The public ops and the trainer's whole losses trace into one graph each: torch._dynamo.explain finds 0 graph
breaks (no Python branch on a tensor's value, no .item(): on a device each would also be a host sync), and a
data-dependent check still raises on the CPU, where it is free, and under DSD_FAST_CHECKS=1."""

import random

import pytest
import torch

import dsd_fast.functional as F
from dsd_fast import checks
from dsd_fast.networks import build_network, resolve_config
from dsd_fast.training import Distill, Options
from dsd_fast.training.phase1 import ambient_training_loss, sample_sigma_t

B, C, R = 2, 3, 8
SIGMA = 0.2


def _breaks(fn, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, [str(b.reason) for b in explanation.break_reasons]


def _images(*shape):
    return torch.randn(*shape).clamp(-1, 1)


def _levels():
    return SIGMA + 0.05 + torch.rand(B)


CASES = {
    "corrupt": lambda: (lambda x, i: F.corrupt(x, SIGMA, seed=7, index=i), _images(B, C, R, R), torch.arange(B)),
    "add_noise": lambda: (lambda y, s: F.add_noise(y, s, SIGMA, seed=7, offset=3), _images(B, C, R, R), _levels()),
    "ambient_loss": lambda: (lambda a, x, y, s: F.ambient_loss(a, x, y, s, SIGMA), _images(B, C, R, R),
                             _images(B, C, R, R), _images(B, C, R, R), _levels()),
    "ambient_loss_precond": lambda: (lambda a, x, y, s: F.ambient_loss_precond(a, x, y, s, SIGMA),
                                     _images(B, C, R, R), _images(B, C, R, R), _images(B, C, R, R), _levels()),
    "sid_generator_loss": lambda: (lambda a, b, x: F.sid_generator_loss(a, b, x, 1.2), _images(B, C, R, R),
                                   _images(B, C, R, R), _images(B, C, R, R)),
    "sds_loss": lambda: (lambda a, x, e, g, s: F.sds_loss(a, x, e, g, s), _images(B, C, R, R), _images(B, C, R, R),
                         _images(B, C, R, R), _images(B, C, R, R), _levels()),
    "dct_inject": lambda: (lambda y, s: F.dct_inject(y, s, 0.5 * s, SIGMA, 0.1, seed=7, offset=3),
                           _images(B, C, R, R), _levels()),
    "dct_ambient_loss": lambda: (lambda a, x, y, s: F.dct_ambient_loss(a, x, y, s, 0.5 * s, SIGMA, 0.1),
                                 _images(B, C, R, R), _images(B, C, R, R), _images(B, C, R, R), _levels()),
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_public_op_has_no_graph_break(op):
    fn, *args = CASES[op]()
    assert _breaks(fn, *args) == (0, [])


@pytest.mark.parametrize("corruption", ["noise", "blur"])
def test_phase1_loss_inject_network_loss_is_one_graph(corruption):
    extra = {"blur": 0.6} if corruption == "blur" else {}
    o = Options(preset="cpu-tiny", corruption=corruption, sigma=SIGMA, **extra)
    net = build_network("cpu-tiny")
    y = _images(B, 3, 32, 32)
    sigma_t = sample_sigma_t(o, random.getrandbits(48), B, "cpu")
    seed = random.getrandbits(63)
    assert _breaks(lambda y, s: ambient_training_loss(net, o.make_corruption(), y, s, seed, 0, "fp32"), y,
                   sigma_t) == (0, [])


def _teacher_state():
    return build_network("cpu-tiny").state_dict()


@pytest.mark.parametrize("loss", ["sid", "dmd", "sds"])
def test_generator_loss_is_one_graph(loss):
    """G(z) -> x_t -> f_phi, f_psi -> the generator loss: Phase II's whole generator-step loss."""
    o = Options(preset="cpu-tiny", loss=loss)
    d = Distill(o, resolve_config("cpu-tiny"), None, torch.device("cpu"), _teacher_state())
    z, eps = torch.randn(B, 3, 32, 32), torch.randn(B, 3, 32, 32)
    sigma_t = 0.01 + torch.rand(B)
    assert _breaks(d.generator_loss, z, sigma_t, eps) == (0, [])


def test_value_checks_run_where_free(monkeypatch):
    """On the CPU a bad sigma_t is still a clear error; checks.reads_values says when the value checks run."""
    y = _images(B, C, R, R)
    with pytest.raises(ValueError, match="sigma_t: expected every value > sigma"):
        F.add_noise(y, torch.full((B,), SIGMA / 2), SIGMA, seed=1)
    assert checks.reads_values(y)
    meta = torch.empty(2, device="meta")  # a device tensor whose values cannot be read: as on a GPU
    assert not checks.reads_values(meta)
    monkeypatch.setenv("DSD_FAST_CHECKS", "1")
    assert checks.reads_values(meta)
