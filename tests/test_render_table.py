"""bench/render_table.py on a fake pytest-benchmark JSON: the bandwidth table keeps its rows (and skips the
training-step records), the training-step table lists those in ladder order with their numbers, and main()
prints both."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _render_table():
    spec = importlib.util.spec_from_file_location("render_table", ROOT / "bench" / "render_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step(rung, median, mfu, useful=0.5, peak_mem_mb=None):
    img_per_s = 512 / median
    return {"name": f"test_train_step[{rung}]", "stats": {"median": median}, "extra_info": {
        "device": "NVIDIA H100 80GB HBM3", "phase": "pretrain", "preset": "cifar10", "resolution": 32,
        "channels": 3, "batch": 512, "batch_gpu": 256, "rung": rung, "sigma_sampling": "clamp",
        "useful_fraction": useful, "img_per_s": img_per_s, "useful_img_per_s": useful * img_per_s,
        "flops_per_image": 1e11, "tflops": 1e11 * img_per_s / 1e12, "mfu": mfu, "peak_mem_mb": peak_mem_mb}}


def _write(tmp_path):
    bandwidth = {"name": "test_ambient", "stats": {"median": 0.002}, "extra_info": {
        "device": "NVIDIA H100 80GB HBM3", "op": "ambient_loss", "shape": [512, 3, 32, 32], "dtype": "float32",
        "mode": "forward", "provider": "triton", "compile_backend": "inductor", "bytes": 4_000_000_000}}
    # Listed out of ladder order: the table must sort them.
    benchmarks = [_step("bf16+compile+fused", 0.128, 0.5, peak_mem_mb=3072), bandwidth,
                  _step("eager-fp32", 1.024, None), _step("edm-fp16", 0.512, 0.1),
                  _step("edm-fp32", 1.024, 0.05, useful=0.25)]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return path


def test_bandwidth_table_skips_step_records(tmp_path):
    lines = _render_table().render([_write(tmp_path)]).splitlines()
    assert len(lines) == 3
    assert lines[2] == ("| NVIDIA H100 80GB HBM3 | ambient_loss | 512x3x32x32 | float32 | forward | triton "
                        "| 2.0000 | 2000.0 | 66.7 |")


def test_step_table_rows_in_ladder_order(tmp_path):
    lines = _render_table().render_steps([_write(tmp_path)]).splitlines()
    assert lines[0].startswith("| device | phase | preset (res, batch) | rung | sigma sampling | median ms |")
    # x EDM: useful img/s over the fastest anchor rung's (edm-fp16: 1000 x 0.5 = 500 useful img/s).
    assert lines[2:] == [
        "| NVIDIA H100 80GB HBM3 | pretrain | cifar10 (32x32, 512) | edm-fp32 | clamp | 1024.0 | 500.0 | 125.0 "
        "| 0.25 | 50 | 5.0 | n/a |",
        "| NVIDIA H100 80GB HBM3 | pretrain | cifar10 (32x32, 512) | edm-fp16 | clamp | 512.0 | 1000.0 | 500.0 "
        "| 1.00 | 100 | 10.0 | n/a |",
        "| NVIDIA H100 80GB HBM3 | pretrain | cifar10 (32x32, 512) | eager-fp32 | clamp | 1024.0 | 500.0 | 250.0 "
        "| 0.50 | 50 | n/a | n/a |",
        "| NVIDIA H100 80GB HBM3 | pretrain | cifar10 (32x32, 512) | bf16+compile+fused | clamp | 128.0 | 4000.0 "
        "| 2000.0 | 4.00 | 400 | 50.0 | 3.0 |",
    ]


def test_no_step_table_without_step_records(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": []}))
    assert _render_table().render_steps([path]) == ""


def test_main_prints_both_tables(tmp_path, monkeypatch, capsys):
    render_table = _render_table()
    path = _write(tmp_path)
    monkeypatch.setattr(sys, "argv", ["render_table.py", str(path)])
    render_table.main()
    out = capsys.readouterr().out
    assert out == render_table.render([path]) + "\n" + render_table.render_steps([path])
    target = tmp_path / "table.md"
    monkeypatch.setattr(sys, "argv", ["render_table.py", str(path), "--out", str(target)])
    render_table.main()
    assert target.read_text() == out and not (tmp_path / "table.md.tmp").exists()


def test_main_prints_only_the_step_table_without_bandwidth_records(tmp_path, monkeypatch, capsys):
    render_table = _render_table()
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"benchmarks": [_step("edm-fp32", 1.024, None)]}))
    monkeypatch.setattr(sys, "argv", ["render_table.py", str(path)])
    render_table.main()
    assert capsys.readouterr().out == render_table.render_steps([path])
