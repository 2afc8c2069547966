"""benchmarks/gpu.py --smoke: the GPU benchmark's code (fast-path checks, every architecture row,
MFU from the hardware registry / CPU calibration, table and JSON) runs on a CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import JAX_CACHE_DIR, REPO_ROOT


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_smoke.json"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(JAX_CACHE_DIR), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--out", str(out)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] and res["backend"] == "cpu"
    assert [r["arch"] for r in res["rows"]] == ["transformer", "moe", "gla", "mamba2", "transformer_fp8"]
    for r in res["rows"]:
        assert "error" not in r, r
        assert r["step_time_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_flops_per_s"] > 0, r
    fp8 = res["rows"][-1]
    assert "FP8" in fp8["precision"] and fp8["peak_source"].startswith("FP8 simulated on CPU")
    checks = res["checks"]
    assert all(c["ok"] is None for k, c in checks.items() if k.startswith("attention")), checks  # no cuDNN here
    assert all(c["auto_choice"] == "xla" for k, c in checks.items() if k.startswith("attention"))
    (fp8_check,) = [c for k, c in checks.items() if k.startswith("fp8")]
    assert fp8_check["ok"] and fp8_check["simulated"], fp8_check
    assert "| transformer_fp8 |" in proc.stdout and "check skipped attention cudnn vs xla" in proc.stdout
