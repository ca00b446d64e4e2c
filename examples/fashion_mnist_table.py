"""The DSD paper's Table 2 at CPU scale: Fashion-MNIST at sigma = 0.2, end to end, in one command.

Phase I (`dsd-fast pretrain`) on the noisy observations only, Phase II (`dsd-fast distill`, D-SiD) from its
EMA, then `dsd-fast eval` (FID against the clean data in EDM's feature pipeline, Proximal FID against the
corrupted data, the sample-size floor) for Observation, Ambient-Full, Ambient-Truncated and DSD. The outputs go
to OUT (default results/fashion-mnist-s0.2): eval.md, eval.json, the rows' grids, both phases' options and
grids, command.txt (this command), commit.txt, wall.json (seconds per phase). OUT is written whole at the end
(a temporary folder renamed), so a stopped run leaves nothing half-written there; RUN keeps the run
directories, and the same command with --resume continues a stopped run where it stopped (each phase from its
last.pt; the eval stage reruns whole), adding up the wall time of every invocation in RUN/wall.json.

    python examples/fashion_mnist_table.py                          # the committed table's run (2-3 h, 2 cores)
    python examples/fashion_mnist_table.py --resume                 # ... continued after a stop
    python examples/fashion_mnist_table.py --smoke --out /tmp/t     # every stage at toy size (about 1 min)

The defaults (network, kimg split, Phase II learning rates) and how they were chosen: README "Fashion-MNIST".
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsd_fast.evaluation.fid import write_json
from dsd_fast.rundir import code_commit

ROOT = Path(__file__).resolve().parents[1]
# name: (full size, smoke size): the sizes of the run.
SIZES = {
    "pretrain_kimg": (210.0, 0.128),
    "distill_kimg": (128.0, 0.064),
    "num": (1000, 8),
    "data_images": (1000, 16),
}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "fashion-mnist-s0.2"), help="Results folder.")
    p.add_argument("--run", default=None, help="Run directories (teacher/, student/).  [OUT.runs]")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--sigma", type=float, default=0.2)
    p.add_argument("--preset", default="cpu-fashion")
    p.add_argument("--batch", type=int, default=64, help="Phase I batch.")
    p.add_argument("--g-batch", type=int, default=16, help="Phase II batch.")
    p.add_argument("--g-lr", type=float, default=3e-4)
    p.add_argument("--fake-lr", type=float, default=None)
    p.add_argument("--fake-steps", type=int, default=1)
    p.add_argument("--g-lr-schedule", default="constant", choices=("constant", "cosine"))
    p.add_argument("--g-ema-rampup-ratio", type=float, default=0.05, help="Generator EMA half-life cap.")
    p.add_argument("--smoke", action="store_true", help="Toy sizes: checks every stage, measures nothing.")
    p.add_argument("--resume", action="store_true", help="Continue the run in RUN (the same flags as its start).")
    for name, (full, _) in SIZES.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(full), default=None, help=f"[{full}]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dsd-fast", default=None, help="The dsd-fast command.  [python -m dsd_fast]")
    args = p.parse_args(argv)
    for name, (full, smoke) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    return args


def commands(args, run):
    """(phase, argv) of the three stages."""
    common = ["--dataset", args.dataset, "--sigma", str(args.sigma), "--preset", args.preset, "--device",
              args.device]
    phase2 = (["--fake-lr", str(args.fake_lr)] if args.fake_lr is not None else []) + [
        "--fake-steps", str(args.fake_steps), "--g-lr-schedule", args.g_lr_schedule, "--g-ema-rampup-ratio",
        str(args.g_ema_rampup_ratio)]
    return [
        ("pretrain", ["pretrain", *common, "--batch", str(args.batch), "--kimg", str(args.pretrain_kimg),
                      "--lr-rampup-kimg", str(min(2.0, args.pretrain_kimg / 4)), "--snapshot-kimg",
                      str(args.pretrain_kimg), "--outdir", str(run / "teacher")]),
        ("distill", ["distill", *common, "--teacher", str(run / "teacher" / "last.pt"), "--batch",
                     str(args.g_batch), "--g-lr", str(args.g_lr), *phase2, "--g-sigma-min", "sigma", "--kimg",
                     str(args.distill_kimg), "--snapshot-kimg", str(args.distill_kimg), "--outdir",
                     str(run / "student")]),
        ("eval", ["eval", str(run / "student"), "--num", str(args.num), "--data-images", str(args.data_images),
                  "--device", args.device]),
    ]


def resumed(argv):
    """A training stage's argv continuing its run directory if that holds a checkpoint (the flags stay: a resumed
    run takes given flags over its options.json, and these are the ones it started with)."""
    i = argv.index("--outdir")
    rundir = Path(argv[i + 1])
    if (rundir / "last.pt").is_file():
        return [*argv[:i], "--resume", str(rundir), *argv[i + 2:]]
    if rundir.exists():
        raise SystemExit(f"resume: {rundir} exists without a checkpoint last.pt; remove it to start that phase over")
    return argv


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    out = Path(args.out)
    run = Path(args.run) if args.run else out.with_name(out.name + ".runs")
    if not args.resume and ((run / "teacher").exists() or (run / "student").exists()):
        raise SystemExit(f"run: {run} already holds a run; continue it with --resume, pass another --run or remove it")
    dsd = shlex.split(args.dsd_fast) if args.dsd_fast else [sys.executable, "-m", "dsd_fast"]
    run.mkdir(parents=True, exist_ok=True)
    # Wall time summed over invocations, so a resumed table still reports what each phase cost.
    wall_file = run / "wall.json"
    wall = json.loads(wall_file.read_text()) if args.resume and wall_file.is_file() else dict(invocations=0)
    wall["invocations"] += 1
    for phase, argv_ in commands(args, run):
        if args.resume and phase != "eval":
            argv_ = resumed(argv_)
        print(f"== {phase}: dsd-fast {shlex.join(argv_)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run([*dsd, *argv_], check=True)
        wall[phase] = round(wall.get(phase, 0.0) + time.perf_counter() - t0, 1)
        write_json(wall_file, wall)
    seconds = {phase: wall[phase] for phase in ("pretrain", "distill", "eval")}
    seconds["total"] = round(sum(seconds.values()), 1)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent if out.parent.exists() else None))
    student, teacher = run / "student", run / "teacher"
    for f in ["eval.md", "eval.json", *sorted(p.name for p in student.glob("eval-*.png"))]:
        shutil.copy(student / f, tmp / f)
    for name, d in (("teacher", teacher), ("student", student)):
        shutil.copy(d / "options.json", tmp / f"{name}-options.json")
        grids = sorted(d.glob("*-teacher.png" if name == "teacher" else "*-student.png"))
        if grids:
            shutil.copy(grids[-1], tmp / f"{name}-grid.png")
    shutil.copy(teacher / "data.png", tmp / "data.png")
    (tmp / "command.txt").write_text(shlex.join(["python", "examples/fashion_mnist_table.py",
                                                 *(a for a in argv if a != "--resume")]) + "\n")
    (tmp / "commit.txt").write_text(code_commit() + "\n")
    (tmp / "wall.json").write_text(json.dumps(dict(seconds=seconds, invocations=wall["invocations"],
                                                   cpus=os.cpu_count()), indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    print((out / "eval.md").read_text())
    print(f"Wrote {out} (wall time: {seconds})")


if __name__ == "__main__":
    main()
