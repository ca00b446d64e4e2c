"""Measure the device's two ceilings once: device-to-device copy bandwidth (bytes read + written) and
bf16 matrix-product rate. Writes JSON (device, versions, numbers) to the path given, default stdout."""

import json
import subprocess
import sys

import torch


def _median_ms(fn, iters=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main(path=None):
    if not torch.cuda.is_available():
        sys.exit("ceilings.py: needs a CUDA device")
    n = 1 << 30  # 1 GiB per buffer: far beyond L2 (50 MB on H100)
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * n / ms / 1e6
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms_mm = _median_ms(lambda: a @ b, iters=20)
    tflops = 2 * m**3 / ms_mm / 1e9
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        driver = "unknown"
    out = {
        "device": torch.cuda.get_device_name(),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "copy_GBps": round(copy_gbs, 1),
        "bf16_matmul_TFLOPs": round(tflops, 1),
        "method": "median of CUDA-event-timed runs; copy counts bytes read + written (1 GiB fp32 buffer); "
        "matmul 8192^3 bf16 on random data",
    }
    text = json.dumps(out, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
