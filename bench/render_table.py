"""Render pytest-benchmark JSON (bench/results/*.json) as markdown tables.

Bandwidth (records with bytes): device, op, shape, dtype, mode, provider, median ms, GB/s (minimal bytes /
median), % of the peak bandwidth (default 3.0 TB/s, the H100's measured device-to-device copy rate,
bench/ceilings.py).
Training steps (records with phase and img_per_s, bench/test_bench_train.py), printed after it when there are
any: device, phase, preset, ladder rung, sigma sampling, median ms, img/s, useful img/s, x EDM (useful img/s over
the fastest EDM anchor rung of the same device and preset, Phase I; "-" without one), TFLOP/s, MFU %, peak GiB.

    python bench/render_table.py bench/results/*.json [--peak-tbps 3.0] [--out table.md]
"""

import argparse
import json
from pathlib import Path

PROVIDER_ORDER = {"reference": 0, "compiled": 1, "triton": 2, "cuda_ext": 3}
MODE_ORDER = {"forward": 0, "backward": 1, "full": 2}
PHASE_ORDER = {"pretrain": 0, "distill": 1}
# The ladder, after the anchor (EDM's own step, bench/edm_anchor.py).
RUNG_ORDER = {"edm-fp32": -2, "edm-fp16": -1, "eager-fp32": 0, "bf16": 1, "bf16+compile": 2, "bf16+compile+fused": 3}


def rows(paths):
    for path in paths:
        for bench in json.loads(Path(path).read_text())["benchmarks"]:
            info = bench["extra_info"]
            if "bytes" not in info:
                continue  # a suite without the common.record fields
            median = bench["stats"]["median"]
            provider = info["provider"]
            if provider == "compiled" and info.get("compile_backend", "inductor") != "inductor":
                provider = f"compiled ({info['compile_backend']})"
            yield {
                "device": info["device"], "op": info["op"], "shape": "x".join(map(str, info["shape"])),
                "dtype": info["dtype"], "mode": info["mode"], "provider": provider,
                "median_ms": median * 1e3, "GBps": info["bytes"] / median / 1e9,
            }


def render(paths, peak_tbps=3.0):
    def key(r):
        return (r["device"], r["op"], r["shape"], r["dtype"], MODE_ORDER.get(r["mode"], 9),
                PROVIDER_ORDER.get(r["provider"].split()[0], 9), r["provider"])

    lines = ["| device | op | shape | dtype | mode | provider | median ms | GB/s | % of "
             f"{peak_tbps:g} TB/s |", "|---|---|---|---|---|---|---:|---:|---:|"]
    for r in sorted(rows(paths), key=key):
        pct = 100 * r["GBps"] / (peak_tbps * 1e3)
        lines.append(f"| {r['device']} | {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} "
                     f"| {r['median_ms']:.4f} | {r['GBps']:.1f} | {pct:.1f} |")
    return "\n".join(lines) + "\n"


def step_rows(paths):
    for path in paths:
        for bench in json.loads(Path(path).read_text())["benchmarks"]:
            info = bench["extra_info"]
            if "phase" in info and "img_per_s" in info:
                yield dict(info, median_ms=bench["stats"]["median"] * 1e3)


def render_steps(paths):
    """The training-step table, or "" when no record has one."""
    def key(r):
        return (r["device"], PHASE_ORDER.get(r["phase"], 9), r["phase"], r["preset"], RUNG_ORDER.get(r["rung"], 9),
                r["rung"], r["sigma_sampling"])

    table = sorted(step_rows(paths), key=key)
    if not table:
        return ""
    anchor = {}  # (device, preset) -> the fastest EDM rung's useful img/s
    for r in table:
        if r["rung"].startswith("edm-"):
            where = (r["device"], r["preset"])
            anchor[where] = max(anchor.get(where, 0.0), r["useful_img_per_s"])
    lines = ["| device | phase | preset (res, batch) | rung | sigma sampling | median ms | img/s | useful img/s "
             "| x EDM | TFLOP/s | MFU % | peak GiB |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}"
        edm = anchor.get((r["device"], r["preset"])) if r["phase"] == "pretrain" else None
        ratio = "-" if not edm else f"{r['useful_img_per_s'] / edm:.2f}"
        mem = "n/a" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb'] / 1024:.1f}"
        lines.append(f"| {r['device']} | {r['phase']} | {r['preset']} ({r['resolution']}x{r['resolution']}, "
                     f"{r['batch']}) | {r['rung']} | {r['sigma_sampling']} | {r['median_ms']:.1f} "
                     f"| {r['img_per_s']:.1f} | {r['useful_img_per_s']:.1f} | {ratio} | {r['tflops']:.3g} | {mfu} "
                     f"| {mem} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--peak-tbps", type=float, default=3.0, help="peak bandwidth for the %% column")
    parser.add_argument("--out", help="write the table here instead of stdout")
    args = parser.parse_args()
    bandwidth = render(args.paths, args.peak_tbps) if any(rows(args.paths)) else ""
    table = "\n".join(t for t in (bandwidth, render_steps(args.paths)) if t)
    if args.out:
        from dsd_fast.rundir import atomic_write_bytes  # here: the table itself needs no torch

        atomic_write_bytes(args.out, lambda f: f.write(table.encode()))
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
