"""Hunt for seed-dependent test failures (issue 11; not part of CI): run the numeric test files N times, each
with a fresh session seed, and list every failure with the command that replays it.

    .venv/bin/python tools/hunt_flaky.py --runs 20 [--out hunt.json] [FILE ...]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

NUMERIC = ["tests/test_philox.py", "tests/test_dct.py", "tests/test_edm.py", "tests/test_losses.py",
           "tests/test_functional.py", "tests/test_corruption.py", "tests/test_rounding.py", "tests/test_sampling.py",
           "tests/test_ops_noise.py", "tests/test_ops_losses.py", "tests/test_ops_dct.py", "tests/test_metrics.py",
           "tests/test_networks.py", "tests/test_linear_theorem.py", "tests/test_training.py"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="number of runs, each with a fresh seed")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("files", nargs="*", default=NUMERIC)
    a = p.parse_args()
    if a.runs < 1:
        p.error(f"--runs: expected an integer >= 1, got {a.runs}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for k in range(a.runs):
        seed = int.from_bytes(os.urandom(4), "little")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *a.files],
                           cwd=root, env={**os.environ, "DSD_FAST_TEST_SEED": str(seed)},
                           capture_output=True, text=True)
        failed = re.findall(r"^FAILED (\S+)", r.stdout, re.M)
        summary = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        results.append(dict(run=k, seed=seed, rc=r.returncode, failed=failed, summary=summary,
                            seconds=round(time.perf_counter() - t0, 1)))
        print(f"run {k + 1}/{a.runs} seed {seed}: {summary}", flush=True)
        for nodeid in failed:
            print(f"  FAILED {nodeid}  (replay: DSD_FAST_TEST_SEED={seed} pytest '{nodeid}')", flush=True)
    bad = [r for r in results if r["rc"] != 0]
    print(f"{len(bad)} of {a.runs} runs failed")
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            json.dump(dict(files=a.files, runs=results), f, indent=1)
        os.replace(a.out + ".tmp", a.out)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
