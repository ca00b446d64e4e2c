"""Post-hoc weight average of a run's generator snapshots (README, "Fashion-MNIST at sigma = 0.2").

A one-step student that has levelled off wanders around its plateau; the uniform average of its G_ema weights at
several snapshots (SWA, or EDM2's post-hoc EMA in its simplest form) can sit lower than any one of them. Writes a
network snapshot that every `dsd-fast` command reads like the run's own (`fid --ckpt`, `generate`), with the
last snapshot's options and step, plus the list of what was averaged:

    .venv/bin/python tools/average_snapshots.py OUT.pt RUN/distill-000048.000kimg.pt ... RUN/distill-000128.000kimg.pt
"""

import argparse

import torch

from dsd_fast.rundir import atomic_write_bytes, is_network_snapshot, load_checkpoint

KEY = "G_ema"


def average(states, names=None):
    """The snapshot whose G_ema is the float64 mean of the states' G_ema (cast back to each tensor's dtype;
    integer buffers are taken from the last state). ValueError unless every state is a Phase II network snapshot
    of one network (net_config, parameter names and shapes)."""
    names = names or [f"snapshot {i}" for i in range(len(states))]
    if len(states) < 2:
        raise ValueError(f"snapshots: expected at least 2 Phase II network snapshots to average, got {len(states)}")
    last = states[-1]
    for name, s in zip(names, states, strict=True):
        if not (is_network_snapshot(s) and s.get("phase") == "distill" and KEY in s):
            raise ValueError(f"snapshots: {name} is not a Phase II network snapshot (expected contents 'network', "
                             f"phase 'distill' and {KEY!r}; a run's distill-*kimg.pt files are)")
    for name, s in zip(names, states, strict=True):
        if s.get("net_config") != last.get("net_config"):
            raise ValueError(f"snapshots: {name} has net_config {s.get('net_config')}, expected the last "
                             f"snapshot's {last.get('net_config')}")
        shapes = {k: tuple(v.shape) for k, v in s[KEY].items()}
        want = {k: tuple(v.shape) for k, v in last[KEY].items()}
        if shapes != want:
            raise ValueError(f"snapshots: {name} holds other {KEY} tensors than the last snapshot "
                             f"({sorted(set(shapes) ^ set(want)) or 'same names, other shapes'})")
    weights = {k: (sum(s[KEY][k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
               for k, v in last[KEY].items()}
    averaged = [dict(name=n, kimg=s.get("kimg")) for n, s in zip(names, states, strict=True)]
    return {**last, KEY: weights, "averaged": averaged}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output network snapshot (.pt)")
    p.add_argument("snapshots", nargs="+", help="Phase II network snapshots of one run (distill-*kimg.pt)")
    a = p.parse_args(argv)
    try:
        states = [load_checkpoint(path) for path in a.snapshots]
        snapshot = average(states, a.snapshots)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    atomic_write_bytes(a.out, lambda f: torch.save(snapshot, f))
    kimgs = ", ".join(f"{s.get('kimg'):g}" for s in states)
    print(f"wrote {a.out}: the mean of {len(states)} G_ema snapshots (kimg {kimgs})")


if __name__ == "__main__":
    main()
