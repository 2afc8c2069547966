"""Tests for efficient_arch.hardware: peak table, CPU calibration, MFU, cost analysis."""

import json
import time
import types

import jax
import jax.numpy as jnp
import pytest

from efficient_arch import hardware as hw


@pytest.mark.parametrize(
    "kind, dtype, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "fp8", 1979e12),
        ("NVIDIA H100 80GB HBM3", "float32", 67e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA H800", "bfloat16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("NVIDIA A100-SXM4-40GB", "float16", 312e12),
        ("NVIDIA A100-SXM4-80GB", "float32", 19.5e12),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),
        ("NVIDIA B200", "bfloat16", 2.25e15),
        ("NVIDIA B200", "float8_e4m3fn", 4.5e15),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5p", "bfloat16", 459e12),
        ("TPU v5", "bfloat16", 459e12),
        ("TPU v6 lite", jnp.bfloat16, 918e12),
    ],
)
def test_lookup_peak(kind, dtype, expected):
    value, source = hw.lookup_peak(kind, dtype)
    assert value == expected
    assert "table:" in source and source


def test_h100_pcie_not_mistaken_for_sxm():
    assert hw.chip_name("NVIDIA H100 PCIe") == "H100 PCIe"
    assert hw.chip_name("NVIDIA GH200 480GB") == "GH200"
    assert hw.chip_name("NVIDIA GB200") is None  # not a B200


@pytest.mark.parametrize(
    "kind, dtype",
    [("NVIDIA RTX 9999", "bfloat16"), ("TPU v99", "bfloat16"), ("cpu", "float32"),
     ("NVIDIA A100-SXM4-80GB", "fp8"), ("TPU v4", "float32")],
)
def test_unknown_raises_with_fix(kind, dtype):
    with pytest.raises(hw.UnknownAcceleratorError) as e:
        hw.lookup_peak(kind, dtype)
    assert isinstance(e.value, ValueError)
    assert "--config.flops.peak_flops=<FLOP/s per device>" in str(e.value)


def test_unknown_dtype_raises():
    with pytest.raises(ValueError):
        hw.lookup_peak("TPU v4", "int32")


def test_override_wins():
    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert hw.peak_flops_per_device("bfloat16", override=1.5e12, device=gpu) == (1.5e12, "user-given")
    # override wins even on CPU (no calibration) and for an unknown chip
    weird = types.SimpleNamespace(platform="gpu", device_kind="Mystery Chip")
    assert hw.peak_flops_per_device("bfloat16", override=2e12, device=weird)[0] == 2e12
    assert hw.peak_flops_per_device("bfloat16", device=gpu)[0] == 989e12
    with pytest.raises(hw.UnknownAcceleratorError):
        hw.peak_flops_per_device("bfloat16", device=weird)
    with pytest.raises(ValueError):
        hw.peak_flops_per_device("bfloat16", override=0.0, device=gpu)


def test_cpu_calibration_cache_and_force(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    value, source = hw.calibrate_cpu_peak("float32", cache_dir=tmp_path)
    first_s = time.perf_counter() - t0
    assert value > 1e8 and first_s < 6.0
    assert source.startswith("measured:") and "float32 matmul calibration" in source
    assert (tmp_path / "cpu_peak.json").exists()

    t0 = time.perf_counter()
    value2, source2 = hw.calibrate_cpu_peak("float32", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 0.2
    assert value2 == value and "cached" in source2

    calls = []

    def fake_measure(dtype, budget_s=1.5):
        calls.append(dtype)
        return {"flops_per_s": 123.0, "n": 1024, "best_matmul_s": 1.0}

    monkeypatch.setattr(hw, "_measure", fake_measure)
    assert hw.calibrate_cpu_peak("float32", cache_dir=tmp_path)[0] == value  # still cached
    assert calls == []
    assert hw.calibrate_cpu_peak("float32", cache_dir=tmp_path, force=True)[0] == 123.0
    assert calls == ["float32"]
    assert hw.calibrate_cpu_peak("float32", cache_dir=tmp_path)[0] == 123.0  # cache overwritten
    # dtype is part of the key: bfloat16 is measured separately
    assert hw.calibrate_cpu_peak("bf16", cache_dir=tmp_path)[0] == 123.0
    assert calls == ["float32", "bfloat16"]
    data = json.loads((tmp_path / "cpu_peak.json").read_text())
    assert {e["fingerprint"]["dtype"] for e in data.values()} == {"float32", "bfloat16"}


def _new_process(monkeypatch):
    """Forget which calibrations this process already refreshed (as a new process would)."""
    monkeypatch.setattr(hw, "_REFRESHED_IN_PROCESS", set())


def test_refresh_keeps_the_best_measurement(tmp_path, monkeypatch):
    """Training runs re-measure and keep the machine's best: a measurement taken under load
    (lower) never replaces a better cached one; a better one replaces it. One measurement per
    process: a second refresh in the same process reads the cache."""
    _new_process(monkeypatch)
    measured = iter([200.0, 150.0, 300.0])
    monkeypatch.setattr(hw, "_measure", lambda dtype, budget_s=1.5: {"flops_per_s": next(measured), "n": 64})
    assert hw.calibrate_cpu_peak("float32", cache_dir=tmp_path, refresh=True)[0] == 200.0
    assert hw.calibrate_cpu_peak("float32", cache_dir=tmp_path, refresh=True)[0] == 200.0  # not measured
    _new_process(monkeypatch)
    assert hw.calibrate_cpu_peak("float32", cache_dir=tmp_path, refresh=True)[0] == 200.0  # 150 < 200
    assert hw.calibrate_cpu_peak("float32", cache_dir=tmp_path)[0] == 200.0  # cache holds the best
    # the default device here is a CPU: peak_flops_per_device refreshes (300 is the new best)
    _new_process(monkeypatch)
    peak, label = hw.peak_flops_per_device("float32", cache_dir=tmp_path)
    assert peak == 300.0 / len(jax.local_devices(backend="cpu")) and "best" in label


def test_mfu():
    assert hw.mfu(5e11, 1.0, 4, 250e9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak FLOP/s per device"):
        hw.mfu(2e12, 1.0, 4, 250e9)
    for bad in [(0, 1.0, 1, 1e12), (1e9, 0.0, 1, 1e12), (1e9, 1.0, 0, 1e12),
                (1e9, 1.0, 1, -1.0), (float("nan"), 1.0, 1, 1e12)]:
        with pytest.raises(ValueError):
            hw.mfu(*bad)


def test_normalize_cost_analysis_shapes():
    d = {"flops": 10.0, "bytes accessed": 40.0, "transcendentals": 2.0}
    out = hw.normalize_cost_analysis(d)
    assert out["flops"] == 10.0 and out["bytes_accessed"] == 40.0 and out["transcendentals"] == 2.0
    assert hw.normalize_cost_analysis([d]) == out
    two = hw.normalize_cost_analysis([d, {"flops": 5.0, "bytes accessed": 1.0}])
    assert two["flops"] == 15.0 and two["bytes_accessed"] == 41.0
    assert hw.normalize_cost_analysis(None) == {}
    assert hw.normalize_cost_analysis([]) == {}
    assert hw.normalize_cost_analysis({"bytes accessed": 8.0})["flops"] == 0.0
    with pytest.raises(TypeError):
        hw.normalize_cost_analysis("flops")


def test_cost_analysis_of_real_matmul():
    m, k, n = 64, 32, 48
    a = jnp.ones((m, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    lowered = jax.jit(jnp.matmul).lower(a, b)
    out = hw.normalize_cost_analysis(lowered.cost_analysis())
    assert out["flops"] == 2 * m * n * k
    assert out["bytes_accessed"] > 0
    compiled = lowered.compile()
    assert hw.normalize_cost_analysis(compiled.cost_analysis())["flops"] == 2 * m * n * k
    mem = hw.memory_analysis_bytes(compiled)
    assert mem["argument_bytes"] == 4 * (m * k + k * n)
    assert mem["output_bytes"] == 4 * m * n
    assert {"temp_bytes", "generated_code_bytes", "total_bytes"} <= set(mem)


def test_memory_analysis_none():
    assert hw.memory_analysis_bytes(types.SimpleNamespace(memory_analysis=lambda: None)) == {}

    def boom():
        raise NotImplementedError

    assert hw.memory_analysis_bytes(types.SimpleNamespace(memory_analysis=boom)) == {}


def _cache_key(dtype="float32"):
    import hashlib

    fp = hw._fingerprint(dtype)
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16], fp


def test_implausible_cached_peak_is_dropped_and_replaced(tmp_path, monkeypatch):
    """A cached peak that timed nothing (a multi-process run measured process 0's device from
    process 1: 6.9e15 FLOP/s on 2 cores) used to be kept forever as "the best"; now it is dropped,
    with a warning naming the file, and this process's measurement replaces it."""
    key, fp = _cache_key()
    (tmp_path / "cpu_peak.json").write_text(json.dumps(
        {key: {"flops_per_s": 6.9e15, "n": 2048, "best_matmul_s": 2.5e-6, "fingerprint": fp}}))
    _new_process(monkeypatch)
    monkeypatch.setattr(hw, "_measure", lambda dtype, budget_s=1.5: {"flops_per_s": 2e11, "n": 2048})
    with pytest.warns(RuntimeWarning, match=r"dropped the cached CPU peak of .*cpu_peak.json .*6\.900e\+15 FLOP/s is above"):
        peak, label = hw.calibrate_cpu_peak("float32", cache_dir=tmp_path, refresh=True)
    assert peak == 2e11 and "dropped" in label
    assert json.loads((tmp_path / "cpu_peak.json").read_text())[key]["flops_per_s"] == 2e11
    # a plausible best far above this measurement (50x) is dropped too; a loaded machine's 3x is not
    _new_process(monkeypatch)
    monkeypatch.setattr(hw, "_measure", lambda dtype, budget_s=1.5: {"flops_per_s": 3e9, "n": 2048})
    with pytest.warns(RuntimeWarning, match="over 50x this process's own measurement"):
        assert hw.calibrate_cpu_peak("float32", cache_dir=tmp_path, refresh=True)[0] == 3e9
    _new_process(monkeypatch)
    monkeypatch.setattr(hw, "_measure", lambda dtype, budget_s=1.5: {"flops_per_s": 1e9, "n": 2048})
    assert hw.calibrate_cpu_peak("float32", cache_dir=tmp_path, refresh=True)[0] == 3e9
    # the plain (non-refresh) read never returns an implausible entry either
    (tmp_path / "cpu_peak.json").write_text(json.dumps({key: {"flops_per_s": 6.9e15, "n": 2048}}))
    assert hw.calibrate_cpu_peak("float32", cache_dir=tmp_path)[0] == 1e9


def test_implausible_measurement_is_not_cached(tmp_path, monkeypatch):
    _new_process(monkeypatch)
    monkeypatch.setattr(hw, "_measure", lambda dtype, budget_s=1.5: {"flops_per_s": 7e15, "n": 2048,
                                                                    "best_matmul_s": 2.5e-6})
    with pytest.warns(RuntimeWarning, match="IMPLAUSIBLE"):
        peak, label = hw.calibrate_cpu_peak("float32", cache_dir=tmp_path, refresh=True)
    assert peak == 7e15 and "not cached" in label and "--config.flops.peak_flops" in label
    assert not (tmp_path / "cpu_peak.json").exists()


def test_cpu_calibration_of_a_gpu_only_dtype_names_the_fix(tmp_path):
    """TF32 / FP8 / float16 have no CPU matmul unit to time: the error says which dtypes work and
    how to give a peak instead, and nothing is cached."""
    for dtype in ("tf32", "fp8", "float16"):
        for calibrate in (lambda: hw.calibrate_cpu_peak(dtype, cache_dir=tmp_path),
                          lambda: hw.measure_cpu_matmul_peak(dtype)):  # cached and same-process forms
            with pytest.raises(ValueError, match=r"use dtype 'float32' or 'bfloat16'.*--config\.flops\.peak_flops"):
                calibrate()
    assert not (tmp_path / "cpu_peak.json").exists()


def test_calibration_times_a_device_of_this_process(monkeypatch):
    """jax.devices("cpu")[0] is process 0's device in a multi-process run (remote elsewhere):
    the calibration matmul must run on jax.local_devices(backend="cpu")[0]."""
    import jax as real_jax

    seen = []
    local = real_jax.local_devices

    def spy(*a, **k):
        out = local(*a, **k)
        seen.append(out[0])
        return out

    monkeypatch.setattr(real_jax, "devices", lambda *a, **k: pytest.fail("jax.devices() used for the calibration"))
    monkeypatch.setattr(real_jax, "local_devices", spy)
    secs, flops = hw._time_matmul(64, "float32", repeats=1)
    assert seen and seen[0].process_index == real_jax.process_index() and secs > 0 and flops == 2 * 64**3


def test_float32_on_gpu_takes_the_tf32_peak_unless_precision_is_highest():
    """XLA runs float32 dots on TF32 tensor cores at jax's default precision (an H200 ran the
    bench float32 step at 101% of its CUDA-core FP32 rate), so that rate is not a float32 model's
    ceiling there; with ``jax_default_matmul_precision=highest`` it is."""
    h200 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
    peak, label = hw.peak_flops_per_device("float32", device=h200)
    assert peak == hw.PEAK_FLOPS["H200"]["tf32"] and "TF32" in label and "highest" in label
    for true_f32 in ("highest", "float32", "F32_F32_F32", "BF16_BF16_F32_X3"):
        with jax.default_matmul_precision(true_f32):
            peak, label = hw.peak_flops_per_device("float32", device=h200)
            assert peak == hw.PEAK_FLOPS["H200"]["float32"] and "CUDA-core" in label, (true_f32, label)
    for tf32 in ("default", "high", "tensorfloat32", "TF32_TF32_F32"):
        with jax.default_matmul_precision(tf32):
            assert hw.peak_flops_per_device("float32", device=h200)[0] == hw.PEAK_FLOPS["H200"]["tf32"], tf32
    assert hw.peak_flops_per_device("bfloat16", device=h200)[0] == hw.PEAK_FLOPS["H200"]["bfloat16"]
    # a TPU has no float32 entry: the error is unchanged
    with pytest.raises(hw.UnknownAcceleratorError):
        hw.peak_flops_per_device("float32", device=types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite"))


def test_makefile_malloc_tunables_match_the_benchmarks():
    """`make train` and the benchmarks (via ``hardware.CPU_MALLOC_TUNABLES``) run under one setting."""
    import re
    from pathlib import Path

    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    m = re.search(r"^MALLOC_TUNABLES \?= (\S+)$", make, re.M)
    assert m, "Makefile lost its MALLOC_TUNABLES line"
    assert m.group(1) == hw.CPU_MALLOC_TUNABLES
    assert "GLIBC_TUNABLES=$(MALLOC_TUNABLES)" in make
