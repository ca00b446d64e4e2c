"""Render pytest-benchmark JSON (bench/results/*.json) as one markdown table: device, op, shape, dtype,
mode, provider, median ms, GB/s (minimal bytes / median), % of the peak bandwidth (default 3.0 TB/s,
the H100's measured device-to-device copy rate, bench/ceilings.py).

    python bench/render_table.py bench/results/*.json [--peak-tbps 3.0] [--out table.md]
"""

import argparse
import json
from pathlib import Path

PROVIDER_ORDER = {"reference": 0, "compiled": 1, "triton": 2, "cuda_ext": 3}
MODE_ORDER = {"forward": 0, "backward": 1, "full": 2}


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--peak-tbps", type=float, default=3.0, help="peak bandwidth for the %% column")
    parser.add_argument("--out", help="write the table here instead of stdout")
    args = parser.parse_args()
    table = render(args.paths, args.peak_tbps)
    if args.out:
        Path(args.out).write_text(table)
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
