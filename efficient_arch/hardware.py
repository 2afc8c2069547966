"""Peak FLOP/s per device, CPU calibration, MFU and XLA cost-analysis helpers.

Everything here is about *denominators*: how many FLOP/s one device can do at
best (a per-chip, per-dtype table of dense vendor figures, or a measured matmul
rate on CPU), and how to read XLA's own cost/memory analysis in a form that does
not depend on the jax version.

Units: FLOPs are floating-point operations (a multiply-add counts as 2), FLOP/s
are FLOPs per second, times are seconds, sizes are bytes.

Conventions of the peak table (``PEAK_FLOPS``):

* All figures are **dense** (no structured sparsity). NVIDIA datasheets quote
  tensor-core figures "with sparsity"; where they do, the table holds the
  datasheet number halved, and the comment says so.
* Figures are **per JAX device**. For NVIDIA GPUs and for TPU v4/v5e/v5p/v6e a
  device is one chip. For TPU v2/v3 a JAX device is one TensorCore (two per
  chip), so the table holds half the per-chip figure.
* dtype keys: ``"bfloat16"``, ``"float16"``, ``"float32"``, ``"tf32"``,
  ``"fp8"``. On NVIDIA, ``"float32"`` is the **non-tensor-core (CUDA core)
  FP32** rate and ``"tf32"`` is the dense TF32 tensor-core rate. Note that XLA
  on Ampere+ GPUs runs float32 dots in TF32 under jax's default matmul
  precision: :func:`peak_flops_per_device` then takes the ``"tf32"`` peak for a float32 model on
  a GPU (measured: the bench float32 step at 101% of the H200's CUDA-core FP32 rate), unless
  ``jax_default_matmul_precision`` is "highest" / "float32".
  Google publishes only bfloat16 (and int8) peaks for TPUs, so TPU entries
  have ``"bfloat16"`` only; any other dtype raises with the fix text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "PEAK_FLOPS",
    "UnknownAcceleratorError",
    "canonical_dtype",
    "chip_name",
    "lookup_peak",
    "HBM_BANDWIDTH",
    "normalize_chip",
    "hbm_chip_name",
    "lookup_hbm_bandwidth",
    "calibrate_cpu_peak",
    "peak_flops_per_device",
    "peak_flops_for_policy",
    "mfu",
    "normalize_cost_analysis",
    "memory_analysis_bytes",
]

_FIX = "pass --config.flops.peak_flops=<FLOP/s per device>"


class UnknownAcceleratorError(ValueError):
    """No peak FLOP/s is known for this accelerator (or this dtype on it).

    The message always names the fix: ``--config.flops.peak_flops=<FLOP/s per
    device>``.
    """


# ---------------------------------------------------------------------------
# Peak table: chip -> dtype -> dense FLOP/s per JAX device.
# ---------------------------------------------------------------------------
_A100_SRC = "NVIDIA A100 Tensor Core GPU datasheet (dense; sparsity figures halved)"
_H100_SRC = "NVIDIA H100 Tensor Core GPU datasheet (datasheet tensor figures are with sparsity; halved)"
_H200_SRC = "NVIDIA H200 Tensor Core GPU datasheet (datasheet tensor figures are with sparsity; halved)"
_H800_SRC = "taken equal to H100 (same GH100 tensor cores; REFERENCES.md: 'usually taken equal to H100 SXM')"
_B200_SRC = "NVIDIA HGX B200 datasheet, per-GPU figures (tensor figures with sparsity; halved)"
_TPU_SRC = "Google Cloud TPU system-architecture docs (per-chip bf16 peak)"

PEAK_FLOPS: dict[str, dict[str, Any]] = {
    # A100 SXM4 40GB / 80GB (PCIe has the same tensor-core and FP32 peaks).
    # Datasheet: BF16/FP16 tensor 312 TFLOPS (624 with sparsity), TF32 156 (312
    # with sparsity), FP32 (CUDA cores) 19.5 TFLOPS. No FP8 on Ampere.
    # REFERENCES.md: A100 312e12 bf16.
    "A100": {
        "source": _A100_SRC,
        "bfloat16": 312e12,
        "float16": 312e12,
        "tf32": 156e12,
        "float32": 19.5e12,
    },
    "A100 PCIe": {
        "source": _A100_SRC,
        "bfloat16": 312e12,
        "float16": 312e12,
        "tf32": 156e12,
        "float32": 19.5e12,
    },
    # H100 SXM5: datasheet FP8 3,958 TFLOPS, BF16/FP16 1,979, TF32 989 (all with
    # sparsity -> halved: 1979 / 989.5 / 494.5); FP32 (CUDA cores) 67 TFLOPS.
    # REFERENCES.md: H100 SXM 989e12 bf16, 1979e12 fp8.
    "H100 SXM": {
        "source": _H100_SRC,
        "fp8": 1979e12,
        "bfloat16": 989e12,
        "float16": 989e12,
        "tf32": 494.5e12,
        "float32": 67e12,
    },
    # H100 PCIe: datasheet FP8 3,026, BF16/FP16 1,513, TF32 756 (with sparsity
    # -> halved: 1513 / 756.5 / 378); FP32 51 TFLOPS. REFERENCES.md: 756e12 bf16.
    "H100 PCIe": {
        "source": _H100_SRC,
        "fp8": 1513e12,
        "bfloat16": 756e12,
        "float16": 756e12,
        "tf32": 378e12,
        "float32": 51e12,
    },
    # H100 NVL: datasheet FP8 3,341, BF16/FP16 1,671, TF32 835 (with sparsity ->
    # halved); FP32 60 TFLOPS.
    "H100 NVL": {
        "source": _H100_SRC,
        "fp8": 1670.5e12,
        "bfloat16": 835.5e12,
        "float16": 835.5e12,
        "tf32": 417.5e12,
        "float32": 60e12,
    },
    # H200 SXM: same compute as H100 SXM (datasheet FP8 3,958, BF16 1,979, TF32
    # 989 with sparsity -> halved; FP32 67). REFERENCES.md: H200 989e12 bf16.
    "H200": {
        "source": _H200_SRC,
        "fp8": 1979e12,
        "bfloat16": 989e12,
        "float16": 989e12,
        "tf32": 494.5e12,
        "float32": 67e12,
    },
    # H200 NVL: datasheet FP8 3,341, BF16 1,671, TF32 835 (with sparsity ->
    # halved); FP32 60.
    "H200 NVL": {
        "source": _H200_SRC,
        "fp8": 1670.5e12,
        "bfloat16": 835.5e12,
        "float16": 835.5e12,
        "tf32": 417.5e12,
        "float32": 60e12,
    },
    # GH200: the Hopper GPU of GH200 has H100 SXM compute (GH200 datasheet: FP8
    # 3,958 / BF16 1,979 with sparsity; FP32 67).
    "GH200": {
        "source": "NVIDIA GH200 Grace Hopper datasheet (tensor figures with sparsity; halved)",
        "fp8": 1979e12,
        "bfloat16": 989e12,
        "float16": 989e12,
        "tf32": 494.5e12,
        "float32": 67e12,
    },
    # H800 (SXM): export variant of H100 SXM with cut NVLink; dense tensor and
    # FP32 rates as H100 SXM.
    "H800": {
        "source": _H800_SRC + "; H100 SXM datasheet values",
        "fp8": 1979e12,
        "bfloat16": 989e12,
        "float16": 989e12,
        "tf32": 494.5e12,
        "float32": 67e12,
    },
    "H800 PCIe": {
        "source": _H800_SRC + "; H100 PCIe datasheet values",
        "fp8": 1513e12,
        "bfloat16": 756e12,
        "float16": 756e12,
        "tf32": 378e12,
        "float32": 51e12,
    },
    # B200 (HGX B200 datasheet, per-GPU rows, 1000 W): FP8 9 PFLOPS, FP16/BF16
    # 4.5 PFLOPS, TF32 2.2 PFLOPS (all with sparsity -> halved: 4.5e15, 2.25e15,
    # 1.1e15); FP32 75 TFLOPS. REFERENCES.md: B200 2.25e15 bf16.
    "B200": {
        "source": _B200_SRC,
        "fp8": 4.5e15,
        "bfloat16": 2.25e15,
        "float16": 2.25e15,
        "tf32": 1.1e15,
        "float32": 75e12,
    },
    # TPUs: Google publishes bf16 (and int8) peaks only. REFERENCES.md: v4 275e12,
    # v5e 197e12, v5p 459e12, v6e 918e12 (bf16).
    # v2 / v3: 45 / 123 TFLOPS per chip, two TensorCores per chip, and a JAX
    # device is one TensorCore -> half the chip figure per device.
    "TPU v2": {"source": _TPU_SRC + " (45e12 per chip / 2 cores)", "bfloat16": 22.5e12},
    "TPU v3": {"source": _TPU_SRC + " (123e12 per chip / 2 cores)", "bfloat16": 61.5e12},
    "TPU v4": {"source": _TPU_SRC + " (v4: 275e12; megacore, 1 device per chip)", "bfloat16": 275e12},
    "TPU v5e": {"source": _TPU_SRC + " (v5e: 197e12)", "bfloat16": 197e12},
    "TPU v5p": {"source": _TPU_SRC + " (v5p: 459e12; megacore, 1 device per chip)", "bfloat16": 459e12},
    "TPU v6e": {"source": _TPU_SRC + " (v6e Trillium: 918e12)", "bfloat16": 918e12},
}

# device_kind (lower-cased, stripped) -> chip key. Ordered: first match wins,
# so more specific patterns come first (GH200 before H200, NVL/PCIe before the
# plain name, "v5 lite" before "v5").
_KIND_PATTERNS: list[tuple[str, str]] = [
    (r"\bgh200\b", "GH200"),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bh200\b", "H200"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b", "H100 SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"\bh800\b.*\bpcie\b", "H800 PCIe"),
    (r"\bh800\b", "H800"),
    (r"\bb200\b", "B200"),  # \b keeps "GB200" (different clocks) unknown
    (r"\ba100\b.*\bpcie\b", "A100 PCIe"),
    (r"\ba100\b", "A100"),
    (r"^tpu v2$", "TPU v2"),
    (r"^tpu v3$", "TPU v3"),
    (r"^tpu v4$", "TPU v4"),
    (r"^tpu v5 ?(lite|e)$", "TPU v5e"),
    (r"^tpu v5p?$", "TPU v5p"),  # jax reports v5p as "TPU v5" on some versions
    (r"^tpu v6 ?(lite|e)$", "TPU v6e"),
]

_DTYPE_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "tf32": "tf32", "tensorfloat32": "tf32", "tensorfloat-32": "tf32",
    "fp8": "fp8", "float8": "fp8",
}


def canonical_dtype(dtype: Any) -> str:
    """Map a dtype spelling to a key of ``PEAK_FLOPS``.

    Args:
      dtype: a string ("bf16", "bfloat16", "fp32", "tf32", "fp8",
        "float8_e4m3fn", ...), a numpy/jax dtype or scalar type.

    Returns:
      One of "bfloat16", "float16", "float32", "tf32", "fp8".

    Raises:
      ValueError: for a dtype with no peak notion here (e.g. int32, float64).
    """
    if not isinstance(dtype, str):
        import numpy as np

        dtype = np.dtype(dtype).name
    key = dtype.strip().lower()
    if key.startswith("float8") or key.startswith("fp8"):
        return "fp8"
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    raise ValueError(
        f"No peak FLOP/s notion for dtype {dtype!r}; use one of "
        "bfloat16, float16, float32, tf32, fp8 (or " + _FIX + ")."
    )


def chip_name(device_kind: str) -> str | None:
    """Return the ``PEAK_FLOPS`` key for a jax ``device.device_kind``, or None."""
    kind = " ".join(device_kind.strip().lower().split())
    for pattern, chip in _KIND_PATTERNS:
        if re.search(pattern, kind):
            return chip
    return None


def lookup_peak(device_kind: str, dtype: str) -> tuple[float, str]:
    """Dense peak FLOP/s of one device from the vendor table.

    Args:
      device_kind: jax's ``device.device_kind`` string, e.g.
        "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "TPU v5 lite".
      dtype: matmul input dtype, see ``canonical_dtype`` ("float32" on NVIDIA
        is the non-tensor-core FP32 rate; "tf32" is the TF32 tensor-core rate).

    Returns:
      (peak FLOP/s per device, source label naming the chip and the datasheet).

    Raises:
      UnknownAcceleratorError: the chip is not in the table, or the table has no
        figure for this dtype on it (e.g. fp8 on A100, float32 on TPU). The
        message tells the user to pass --config.flops.peak_flops.
      ValueError: the dtype itself is not recognized.
    """
    chip = chip_name(device_kind)
    if chip is None:
        hint = ""
        if device_kind.strip().lower() == "cpu":
            hint = " (for CPU, use calibrate_cpu_peak / peak_flops_per_device)"
        raise UnknownAcceleratorError(
            f"Unknown accelerator {device_kind!r}: no peak FLOP/s in the table{hint}. "
            f"To compute MFU, {_FIX} (dense, for the compute dtype)."
        )
    key = canonical_dtype(dtype)
    entry = PEAK_FLOPS[chip]
    if key not in entry:
        have = ", ".join(k for k in entry if k != "source")
        raise UnknownAcceleratorError(
            f"No published dense {key} peak for {chip} (device_kind {device_kind!r}); "
            f"the table has: {have}. To compute MFU with {key}, {_FIX}."
        )
    return float(entry[key]), f"table: {chip} dense {key} -- {entry['source']}"


# ---------------------------------------------------------------------------
# HBM bandwidth table (for rooflines): chip -> bytes/s per JAX device.
# ---------------------------------------------------------------------------
_BW_FIX = "pass --hbm_bandwidth=<bytes/s per device> (and --config.flops.peak_flops=<FLOP/s> if the peak is unknown too)"

# Vendor memory-bandwidth figures, decimal units (1 GB/s = 1e9 bytes/s), per JAX device: one GPU;
# one chip for TPU v4/v5e/v5p/v6e (one device per chip); one TensorCore (half a chip) for v2/v3,
# matching PEAK_FLOPS. "peak_chip" is the PEAK_FLOPS key with the same compute.
HBM_BANDWIDTH: dict[str, dict[str, Any]] = {
    # NVIDIA A100 datasheet: "GPU memory bandwidth" 1,555 GB/s (40GB HBM2, SXM4 and PCIe),
    # 2,039 GB/s (80GB HBM2e SXM4), 1,935 GB/s (80GB HBM2e PCIe).
    "A100 40GB": {"bytes_per_s": 1555e9, "peak_chip": "A100",
                  "source": "NVIDIA A100 datasheet: A100 40GB SXM4, 1,555 GB/s HBM2"},
    "A100 80GB": {"bytes_per_s": 2039e9, "peak_chip": "A100",
                  "source": "NVIDIA A100 datasheet: A100 80GB SXM4, 2,039 GB/s HBM2e"},
    "A100 PCIe 40GB": {"bytes_per_s": 1555e9, "peak_chip": "A100 PCIe",
                       "source": "NVIDIA A100 datasheet: A100 40GB PCIe, 1,555 GB/s HBM2"},
    "A100 PCIe 80GB": {"bytes_per_s": 1935e9, "peak_chip": "A100 PCIe",
                       "source": "NVIDIA A100 datasheet: A100 80GB PCIe, 1,935 GB/s HBM2e"},
    # NVIDIA H100 datasheet: H100 SXM 3.35 TB/s, H100 PCIe 2 TB/s, H100 NVL 3.9 TB/s (HBM3 / HBM2e).
    "H100 SXM": {"bytes_per_s": 3.35e12, "peak_chip": "H100 SXM",
                 "source": "NVIDIA H100 datasheet: H100 SXM, 3.35 TB/s HBM3"},
    "H100 PCIe": {"bytes_per_s": 2.0e12, "peak_chip": "H100 PCIe",
                  "source": "NVIDIA H100 datasheet: H100 PCIe, 2 TB/s HBM2e"},
    "H100 NVL": {"bytes_per_s": 3.9e12, "peak_chip": "H100 NVL",
                 "source": "NVIDIA H100 datasheet: H100 NVL, 3.9 TB/s HBM3"},
    # NVIDIA H200 datasheet: 141 GB HBM3e at 4.8 TB/s (SXM and NVL).
    "H200": {"bytes_per_s": 4.8e12, "peak_chip": "H200",
             "source": "NVIDIA H200 datasheet: H200 SXM, 4.8 TB/s HBM3e"},
    "H200 NVL": {"bytes_per_s": 4.8e12, "peak_chip": "H200 NVL",
                 "source": "NVIDIA H200 datasheet: H200 NVL, 4.8 TB/s HBM3e"},
    # NVIDIA GH200 datasheet: 96 GB HBM3 at 4 TB/s, or 144 GB HBM3e at 4.9 TB/s.
    "GH200 96GB": {"bytes_per_s": 4.0e12, "peak_chip": "GH200",
                   "source": "NVIDIA GH200 datasheet: 96GB HBM3, 4 TB/s"},
    "GH200 144GB": {"bytes_per_s": 4.9e12, "peak_chip": "GH200",
                    "source": "NVIDIA GH200 datasheet: 144GB HBM3e, 4.9 TB/s"},
    # NVIDIA H800 (export variants of H100): same memory system as H100 SXM (3.35 TB/s) and
    # H100 PCIe (2 TB/s); only NVLink is cut.
    "H800": {"bytes_per_s": 3.35e12, "peak_chip": "H800",
             "source": "NVIDIA H800 SXM product brief: 80GB HBM3, 3.35 TB/s (as H100 SXM)"},
    "H800 PCIe": {"bytes_per_s": 2.0e12, "peak_chip": "H800 PCIe",
                  "source": "NVIDIA H800 PCIe product brief: 80GB HBM2e, 2 TB/s (as H100 PCIe)"},
    # NVIDIA HGX B200 datasheet: 8 GPUs with 64 TB/s HBM3e in total -> 8 TB/s per GPU.
    "B200": {"bytes_per_s": 8.0e12, "peak_chip": "B200",
             "source": "NVIDIA HGX B200 datasheet: 64 TB/s for 8 GPUs, 8 TB/s HBM3e per GPU"},
    # Google Cloud TPU system-architecture pages ("HBM bandwidth per chip"): v2 700 GB/s and v3
    # 900 GB/s per chip (two TensorCores, one JAX device each -> half per device), v4 1,200 GB/s,
    # v5e 819 GB/s, v5p 2,765 GB/s, v6e (Trillium) 1,640 GB/s.
    "TPU v2": {"bytes_per_s": 350e9, "peak_chip": "TPU v2",
               "source": "Google Cloud TPU docs: v2 700 GB/s per chip / 2 TensorCores"},
    "TPU v3": {"bytes_per_s": 450e9, "peak_chip": "TPU v3",
               "source": "Google Cloud TPU docs: v3 900 GB/s per chip / 2 TensorCores"},
    "TPU v4": {"bytes_per_s": 1200e9, "peak_chip": "TPU v4",
               "source": "Google Cloud TPU docs: v4, 32 GiB HBM2 at 1,200 GB/s per chip"},
    "TPU v5e": {"bytes_per_s": 819e9, "peak_chip": "TPU v5e",
                "source": "Google Cloud TPU docs: v5e, 16 GB HBM2 at 819 GB/s per chip"},
    "TPU v5p": {"bytes_per_s": 2765e9, "peak_chip": "TPU v5p",
                "source": "Google Cloud TPU docs: v5p, 95 GB HBM2e at 2,765 GB/s per chip"},
    "TPU v6e": {"bytes_per_s": 1640e9, "peak_chip": "TPU v6e",
                "source": "Google Cloud TPU docs: v6e (Trillium), 32 GB HBM at 1,640 GB/s per chip"},
}

# normalized chip spelling -> HBM_BANDWIDTH key; first match wins (specific before generic).
# A value of None marks a name that exists with several memory systems: it must be made precise.
_BW_PATTERNS: list[tuple[str, str | None]] = [
    (r"\bgh200\b.*(\b144 ?gb?\b|hbm3e)", "GH200 144GB"),
    (r"\bgh200\b.*\b(96|480) ?gb?\b", "GH200 96GB"),
    (r"\bgh200\b", None),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bh200\b", "H200"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b", "H100 SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"\bh800\b.*\bpcie\b", "H800 PCIe"),
    (r"\bh800\b", "H800"),
    (r"\bb200\b", "B200"),  # \b keeps "GB200" unknown
    (r"\ba100\b.*\bpcie\b.*\b80 ?gb\b|\ba100\b.*\b80 ?gb\b.*\bpcie\b", "A100 PCIe 80GB"),
    (r"\ba100\b.*\bpcie\b.*\b40 ?gb\b|\ba100\b.*\b40 ?gb\b.*\bpcie\b", "A100 PCIe 40GB"),
    (r"\ba100\b.*\b80 ?gb\b", "A100 80GB"),
    (r"\ba100\b.*\b40 ?gb\b", "A100 40GB"),
    (r"\ba100\b", None),
    (r"^tpu v2\b", "TPU v2"),
    (r"^tpu v3\b", "TPU v3"),
    (r"^tpu v4\b", "TPU v4"),
    (r"^tpu v5 ?(lite|e)\b", "TPU v5e"),
    (r"^tpu v5p?\b", "TPU v5p"),
    (r"^tpu v6 ?(lite|e)?\b", "TPU v6e"),
]

_AMBIGUOUS = {
    "a100": "A100 has 1,555 GB/s (40GB) or 2,039 GB/s (80GB SXM) / 1,935 GB/s (80GB PCIe): "
            "pass --chip=a100-40gb, a100-80gb, a100-pcie-40gb or a100-pcie-80gb",
    "gh200": "GH200 has 4 TB/s (96GB HBM3) or 4.9 TB/s (144GB HBM3e): pass --chip=gh200-96gb or gh200-144gb",
}


def normalize_chip(spec: str) -> str:
    """Lower-case a chip spelling, turn ``-``/``_`` into spaces and prefix bare TPU generations.

    ``"H100-SXM"`` -> ``"h100 sxm"``; ``"v5e"`` / ``"tpu_v5e"`` -> ``"tpu v5e"``;
    ``"NVIDIA A100-SXM4-80GB"`` -> ``"nvidia a100 sxm4 80gb"``.
    """
    s = " ".join(re.sub(r"[-_]", " ", spec.strip().lower()).split())
    if re.match(r"^v\d", s):
        s = "tpu " + s
    return s


def hbm_chip_name(spec: str) -> str | None:
    """The ``HBM_BANDWIDTH`` key for a chip spelling or jax ``device_kind``, or None if unknown.

    Raises:
      UnknownAcceleratorError: the name is known but ambiguous (A100 or GH200 without the memory
        size), with the spellings that resolve it.
    """
    s = normalize_chip(spec)
    for pattern, key in _BW_PATTERNS:
        if re.search(pattern, s):
            if key is None:
                family = "a100" if "a100" in s else "gh200"
                raise UnknownAcceleratorError(f"chip {spec!r} is ambiguous: {_AMBIGUOUS[family]} "
                                              f"(or {_BW_FIX}).")
            return key
    return None


def lookup_hbm_bandwidth(spec: str) -> tuple[float, str, str]:
    """Peak HBM bandwidth of one device from the vendor table.

    Args:
      spec: a chip spelling (``"h100"``, ``"h100-pcie"``, ``"a100-80gb"``, ``"v5e"``,
        ``"tpu v6e"``, ``"b200"``) or a jax ``device_kind`` (``"NVIDIA H100 80GB HBM3"``).

    Returns:
      (bytes/s per device, source label naming the chip and the datasheet, the ``HBM_BANDWIDTH``
      key). The ``PEAK_FLOPS`` chip of the same part is ``HBM_BANDWIDTH[key]["peak_chip"]``.

    Raises:
      UnknownAcceleratorError: unknown or ambiguous chip; the message names ``--hbm_bandwidth``
        and the known chips.
    """
    key = hbm_chip_name(spec)
    if key is None:
        raise UnknownAcceleratorError(
            f"Unknown chip {spec!r}: no HBM bandwidth in the table (known: {', '.join(HBM_BANDWIDTH)}). "
            f"For a roofline on it, {_BW_FIX}.")
    entry = HBM_BANDWIDTH[key]
    return float(entry["bytes_per_s"]), f"table: {key} -- {entry['source']}", key


# ---------------------------------------------------------------------------
# CPU calibration
# ---------------------------------------------------------------------------
# glibc malloc setting for XLA:CPU runs (`make train`, benchmarks/train_step.py and
# benchmarks/mixers.py --malloc-tunables; the Makefile spells the same string, a test keeps them
# equal). XLA:CPU allocates each executable's temporaries afresh per call; glibc serves large blocks
# (always from 32 MiB, from 128 KiB up under its dynamic threshold) with a new mmap, so every step
# page-faults its whole temporary footprint in 4 KiB pages. ``hugetlb=1`` asks for transparent huge
# pages on those maps (2 MiB faults); no effect where THP is off, redundant where it is `always`,
# ignored by glibc < 2.35. The earlier setting (mmap_max=0, no trim, one arena: freed blocks kept)
# grew peak RSS by a whole temporary footprint per step until ~3x (the previous call's temporaries
# are freed on XLA's thread after the outputs are ready, so the next call allocates before the
# free): benchmarks/NOTES.md "session 7".
CPU_MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"

_CACHE_FILE = "cpu_peak.json"
# (cache file, key) pairs this process has already re-measured with ``refresh``: one measurement per
# process is enough (a sweep or table runs many trainings in one process; each re-measurement cost
# 1-3 s and, taken while the same process is busy, could only read lower).
_REFRESHED_IN_PROCESS: set[tuple[str, str]] = set()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _fingerprint(dtype: str) -> dict[str, Any]:
    import jax

    return {
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "cores": _n_cores(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "dtype": dtype,
    }


def _time_matmul(n: int, dtype: str, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds for one n x n x n matmul, and its FLOPs."""
    import jax
    import jax.numpy as jnp

    in_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(in_dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(in_dtype)
    # a device of *this* process: in a multi-process run jax.devices("cpu")[0] is process 0's
    # device, remote elsewhere, and timing a computation there measures nothing (~1e15 FLOP/s)
    cpu = jax.local_devices(backend="cpu")[0]
    a, b = jax.device_put(a, cpu), jax.device_put(b, cpu)

    @jax.jit
    def matmul(x, y):
        return jnp.matmul(x, y, preferred_element_type=jnp.float32)

    matmul(a, b).block_until_ready()  # compile + warm-up
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return min(times), 2.0 * n**3


def _measure(dtype: str, budget_s: float = 1.5) -> dict[str, Any]:
    start = time.perf_counter()
    n = 1024
    best, flops = _time_matmul(n, dtype, repeats=3)
    # On a fast machine a 1024^3 matmul is too short to time well: go to 2048.
    if best < 0.02:
        n = 2048
        best, flops = _time_matmul(n, dtype, repeats=3)
    # More repeats while the time budget allows (best of all timed runs).
    extra = max(0, min(7, int((budget_s - (time.perf_counter() - start)) / max(best, 1e-4)) - 1))
    if extra:
        best = min(best, _time_matmul(n, dtype, repeats=extra)[0])
    return {
        "flops_per_s": flops / best,
        "n": n,
        "best_matmul_s": best,
        "calibration_s": time.perf_counter() - start,
        "measured_unix_time": time.time(),
    }


def _cpu_calibration_dtype(dtype: Any) -> str:
    """``canonical_dtype(dtype)`` if a CPU matmul of it can be calibrated ("float32", "bfloat16").

    Raises:
      ValueError: any other dtype, naming the ones that work and the peak override.
    """
    key = canonical_dtype(dtype)
    if key not in ("float32", "bfloat16"):
        raise ValueError(f"CPU calibration supports float32 and bfloat16, got {dtype!r}: a CPU has no "
                         f"{key} matmul unit to calibrate; use dtype 'float32' or 'bfloat16' (the "
                         f"model's compute dtype), or {_FIX}")
    return key


def measure_cpu_matmul_peak(dtype: str = "float32", budget_s: float = 1.5) -> dict[str, Any]:
    """Measure the CPU matmul peak in *this* process, without the cache (benchmarks that compare
    a step with the same-process peak).

    Args:
      dtype: "float32" or "bfloat16" (bfloat16 inputs, float32 accumulation).
      budget_s: seconds to spend on repeats (best of all timed calls is kept).
    Returns:
      dict with ``flops_per_s`` (FLOP/s of the CPU device), ``n`` (square matmul size),
      ``best_matmul_s`` and ``calibration_s`` (seconds).
    Raises:
      ValueError: dtype other than float32 / bfloat16.
    """
    dtype = _cpu_calibration_dtype(dtype)
    return _measure(dtype, budget_s)


# No CPU core does more than ~4e12 FLOP/s (AMX bf16 at ~2 GHz: 2048 FLOP/cycle; AVX-512 float32:
# ~0.25e12): a calibration above this per usable core timed nothing (e.g. a remote device).
MAX_PLAUSIBLE_FLOPS_PER_CORE = 1e13
# A cached peak more than this many times this process's own measurement is not kept (a loaded
# machine measures a few times low, never thousands of times).
MAX_CACHED_OVER_MEASURED = 50.0


def _implausible(flops_per_s: float, measured: float | None = None) -> str | None:
    """Why a CPU peak figure cannot be right (None when it is plausible)."""
    bound = MAX_PLAUSIBLE_FLOPS_PER_CORE * _n_cores()
    if not math.isfinite(flops_per_s) or flops_per_s <= 0:
        return f"{flops_per_s!r} is not a positive FLOP/s figure"
    if flops_per_s > bound:
        return (f"{flops_per_s:.3e} FLOP/s is above {bound:.1e} ({MAX_PLAUSIBLE_FLOPS_PER_CORE:.0e} per core x "
                f"{_n_cores()} cores)")
    if measured and flops_per_s > MAX_CACHED_OVER_MEASURED * measured:
        return (f"{flops_per_s:.3e} FLOP/s is over {MAX_CACHED_OVER_MEASURED:.0f}x this process's own "
                f"measurement ({measured:.3e})")
    return None


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def calibrate_cpu_peak(
    dtype: str = "float32", *, cache_dir: str | os.PathLike | None = None, force: bool = False,
    refresh: bool = False,
) -> tuple[float, str]:
    """Measure (or read the cached) CPU matmul peak FLOP/s of this process.

    Times a jit'd square matmul on the CPU device (n=1024, or n=2048 when a
    1024 matmul takes under 20 ms), a compile + warm-up call, then the best of
    several timed calls; FLOPs per matmul are 2*n^3. For "bfloat16" the inputs
    are bfloat16 with ``preferred_element_type=float32`` (float32
    accumulation), as the models' matmuls run. Takes about 1-3 s when not
    cached.

    The result is cached as JSON in ``<cache_dir>/cpu_peak.json`` keyed by a
    machine fingerprint (CPU model from /proc/cpuinfo or platform.processor(),
    usable cores from os.sched_getaffinity, jax version, XLA_FLAGS, dtype).

    Args:
      dtype: "float32" or "bfloat16" (aliases accepted, see canonical_dtype).
      cache_dir: cache folder; None -> ~/.cache/efficient_arch.
      force: re-measure even if cached (the cache is then overwritten).
      refresh: measure in this process and keep the *best* of this and the cached measurement
        (the cache then holds the machine's best seen so far). A calibration taken while other
        work loads the machine reads low and would inflate MFU; keeping the maximum makes MFU
        conservative and converges to the machine's peak. Used by training runs. Only the first
        refresh of a process measures; later ones read the cache that it updated.

    Sanity checks (:func:`_implausible`): the matmul runs on a device of this process
    (``jax.local_devices``); a figure above ``MAX_PLAUSIBLE_FLOPS_PER_CORE`` per usable core is
    never cached (it timed nothing) and its label says so; a cached figure above that bound, or
    (``refresh``) over ``MAX_CACHED_OVER_MEASURED`` times this process's measurement, is dropped
    and replaced by the measurement, with a RuntimeWarning naming the cache file.

    Returns:
      (FLOP/s of the whole CPU device, source label such as
      "measured: 1024x1024 float32 matmul calibration (cached <path>)").

    Raises:
      ValueError: dtype other than float32 / bfloat16.
    """
    key_dtype = _cpu_calibration_dtype(dtype)
    cache_root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "efficient_arch"
    path = cache_root / _CACHE_FILE
    fp = _fingerprint(key_dtype)
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]

    if refresh and not force and (str(path), key) not in _REFRESHED_IN_PROCESS:
        _REFRESHED_IN_PROCESS.add((str(path), key))
        cached = _read_cache(path).get(key)
        result = _measure(key_dtype)
        bad = _implausible(float(result["flops_per_s"]))
        if bad:  # never cached; the figure is returned with a label saying what to do
            msg = (f"IMPLAUSIBLE CPU matmul calibration in this process ({bad}; {result['n']}x{result['n']} in "
                   f"{result.get('best_matmul_s', float('nan')):.3g} s): not cached, MFU is meaningless; pass "
                   "--config.flops.peak_flops=<FLOP/s per device>")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return float(result["flops_per_s"]), msg
        best = float(cached["flops_per_s"]) if isinstance(cached, dict) else 0.0
        dropped = _implausible(best, float(result["flops_per_s"])) if best else None
        if dropped:  # e.g. written by a multi-process run that timed a remote device
            msg = (f"dropped the cached CPU peak of {path} (key {key}): {dropped}; replaced by this process's "
                   "measurement")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            result["fingerprint"] = fp
            _write_cache_entry(cache_root, path, key, result)
            return float(result["flops_per_s"]), (
                f"measured: {result['n']}x{result['n']} {key_dtype} matmul calibration in this process "
                f"(cached {path}; {msg})")
        if result["flops_per_s"] <= best:
            n = cached.get("n", "?")
            return best, (f"measured: best {key_dtype} matmul calibration on this machine ({n}x{n}, "
                          f"cached {path}; this process measured {result['flops_per_s']:.3e} at "
                          f"{result['n']}x{result['n']})")
        label = (f"measured: {result['n']}x{result['n']} {key_dtype} matmul calibration in this process, "
                 f"the best on this machine so far (cached {path})")
        result["fingerprint"] = fp
        _write_cache_entry(cache_root, path, key, result, keep_best=True)
        return float(result["flops_per_s"]), label

    if not force:
        entry = _read_cache(path).get(key)
        if isinstance(entry, dict) and float(entry.get("flops_per_s", 0)) > 0 \
                and not _implausible(float(entry["flops_per_s"])):
            n = entry.get("n", "?")
            return float(entry["flops_per_s"]), (
                f"measured: {n}x{n} {key_dtype} matmul calibration (cached {path})"
            )

    result = _measure(key_dtype)
    bad = _implausible(float(result["flops_per_s"]))
    if bad:
        msg = (f"IMPLAUSIBLE CPU matmul calibration ({bad}): not cached, MFU is meaningless; pass "
               "--config.flops.peak_flops=<FLOP/s per device>")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return float(result["flops_per_s"]), msg
    result["fingerprint"] = fp
    label = f"measured: {result['n']}x{result['n']} {key_dtype} matmul calibration (cached {path})"
    err = _write_cache_entry(cache_root, path, key, result)
    if err:  # read-only home etc.: still return the measurement
        label = f"measured: {result['n']}x{result['n']} {key_dtype} matmul calibration (not cached: {err})"
    return float(result["flops_per_s"]), label


def _write_cache_entry(cache_root: Path, path: Path, key: str, result: dict,
                       keep_best: bool = False) -> str | None:
    """Atomically store ``result`` under ``key`` in the cache file; returns an error text or None.

    ``keep_best``: leave a (plausible) better entry that another process wrote meanwhile.
    """
    import fcntl

    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:  # processes writing at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _read_cache(path)
            old = data.get(key)
            if keep_best and isinstance(old, dict) and not _implausible(float(old.get("flops_per_s", 0))) \
                    and float(old["flops_per_s"]) >= float(result["flops_per_s"]):
                return None
            data[key] = result
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: readers never see a half-written file
    except OSError as e:
        return str(e)
    return None


def peak_flops_per_device(
    dtype: str,
    *,
    override: float | None = None,
    device: Any = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[float, str]:
    """Peak FLOP/s of one device for MFU: override, else CPU calibration, else table.

    Args:
      dtype: compute dtype of the matmuls (see canonical_dtype).
      override: user-given peak FLOP/s per device (``config.flops.peak_flops``);
        wins over everything when not None.
      device: a jax Device; None -> ``jax.devices()[0]``.
      cache_dir: CPU calibration cache folder (see calibrate_cpu_peak).

    Returns:
      (FLOP/s per device, source label: "user-given", "measured: ..." or
      "table: ..."). On CPU the measured machine peak is divided by the number of local CPU
      devices, since fake devices (``--xla_force_host_platform_device_count``) share the cores.

    Raises:
      ValueError: override not a positive finite number.
      UnknownAcceleratorError: accelerator or dtype not in the table and no
        override given.
    """
    if override is not None:
        value = float(override)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"peak_flops override must be a positive FLOP/s figure, got {override!r}")
        return value, "user-given"
    if device is None:
        import jax

        device = jax.devices()[0]
    if getattr(device, "platform", "") == "cpu":
        import jax

        peak, label = calibrate_cpu_peak(dtype, cache_dir=cache_dir, refresh=True)
        n_local = len(jax.local_devices(backend="cpu"))
        if n_local > 1:  # fake devices (xla_force_host_platform_device_count) share one CPU
            return peak / n_local, f"{label}, divided by the {n_local} CPU devices sharing it"
        return peak, label
    if getattr(device, "platform", "") in ("gpu", "cuda"):
        return lookup_matmul_peak(device.device_kind, dtype)
    return lookup_peak(device.device_kind, dtype)


def lookup_matmul_peak(chip: str, dtype: str) -> tuple[float, str]:
    """:func:`lookup_peak` for the dtype the chip's matmuls actually run in: on an NVIDIA chip
    (a table entry with a ``"tf32"`` figure) a float32 model's dots run on TF32 tensor cores at
    jax's default matmul precision, so the TF32 peak applies unless ``jax_default_matmul_precision``
    asks for true float32 (:func:`_gpu_float32_runs_as_tf32`); every other case is
    ``lookup_peak(chip, dtype)``. Used for MFU (:func:`peak_flops_per_device` on a GPU) and by
    the roofline, so both take the same peak.

    Raises:
      UnknownAcceleratorError / ValueError: as :func:`lookup_peak`.
    """
    import jax

    name = chip_name(chip) or chip
    if canonical_dtype(dtype) != "float32" or "tf32" not in PEAK_FLOPS.get(name, {}):
        return lookup_peak(chip, dtype)
    prec = jax.config.jax_default_matmul_precision
    if _gpu_float32_runs_as_tf32():
        peak, label = lookup_peak(chip, "tf32")
        return peak, (f"{label}; TF32 peak: float32 dots run on TF32 tensor cores at "
                      f"jax_default_matmul_precision={prec!r} (an H200 ran the bench float32 step at "
                      "101% of its CUDA-core FP32 rate); set it to 'highest' for true float32 matmuls")
    peak, label = lookup_peak(chip, "float32")
    return peak, f"{label}; CUDA-core FP32 rate (no tensor cores): jax_default_matmul_precision={prec!r}"


def _gpu_float32_runs_as_tf32() -> bool:
    """Whether float32 dots on an NVIDIA GPU run as TF32 under ``jax_default_matmul_precision``:
    unset / "default" / "bfloat16" / "high" / "tensorfloat32" / "TF32_TF32_F32" let XLA use the TF32
    tensor cores; anything else ("highest", "float32", "F32_F32_F32", the multi-pass bf16 / TF32
    emulations such as "BF16_BF16_F32_X3") is taken at the CUDA-core float32 rate (conservative:
    the emulations use tensor cores but do several passes per product)."""
    import jax

    prec = str(jax.config.jax_default_matmul_precision or "default").lower().replace("precision.", "")
    return prec in ("default", "bfloat16", "high", "tensorfloat32", "tf32_tf32_f32", "fastest")


def peak_flops_for_policy(
    dtype: str,
    quant: str = "none",
    *,
    override: float | None = None,
    device: Any = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[float, str]:
    """Peak FLOP/s of one device for MFU under a precision policy (``model.dtype``, ``model.quant``).

    ``quant="none"``: :func:`peak_flops_per_device` of ``dtype``. ``quant="fp8"``: the chip's
    dense ``"fp8"`` peak from ``PEAK_FLOPS`` (H100/H200: 1979e12, twice bfloat16), since the
    projection matmuls run on FP8 tensor cores. On a CPU there is no FP8 matmul hardware: XLA
    converts the FP8 operands to float32 (FP8 is simulated, fake-quantized), so the peak is the
    measured calibration of ``dtype`` and the label says "FP8 simulated".

    Args:
      dtype: compute dtype (``model.dtype``).
      quant: ``model.quant``: "none" | "fp8".
      override, device, cache_dir: as :func:`peak_flops_per_device` (an override wins).
    Returns:
      (FLOP/s per device, source label).
    Raises:
      ValueError: unknown ``quant``.
      UnknownAcceleratorError: an accelerator without a published FP8 peak (A100, TPUs) and no
        override; the message names ``--config.flops.peak_flops``.
    """
    if quant not in ("none", "fp8"):
        raise ValueError(f"quant={quant!r}: choose 'none' or 'fp8' (config.model.quant)")
    if quant == "none" or override is not None:
        return peak_flops_per_device(dtype, override=override, device=device, cache_dir=cache_dir)
    if device is None:
        import jax

        device = jax.devices()[0]
    if getattr(device, "platform", "") == "cpu":
        peak, label = peak_flops_per_device(dtype, device=device, cache_dir=cache_dir)
        return peak, (f"FP8 simulated on CPU (fake-quantized, no FP8 matmul hardware): MFU against the "
                      f"{canonical_dtype(dtype)} peak, {label}")
    return lookup_peak(device.device_kind, "fp8")


# ---------------------------------------------------------------------------
# MFU
# ---------------------------------------------------------------------------
def mfu(
    model_flops_per_step: float,
    step_time_s: float,
    n_devices: int,
    peak_flops_per_device: float,
) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over aggregate peak.

    ``mfu = model_flops_per_step / (step_time_s * n_devices * peak_flops_per_device)``

    Args:
      model_flops_per_step: FLOPs of one training step over the whole global
        batch (all devices together; analytic, no remat).
      step_time_s: wall-clock seconds per step.
      n_devices: number of devices the step ran on.
      peak_flops_per_device: FLOP/s per device.

    Returns:
      A fraction in (0, 1].

    Raises:
      ValueError: an input is non-positive or not finite, or the result exceeds
        1.0, which is impossible: the peak is too low for the chip/dtype (e.g.
        float32 peak while XLA ran TF32/bf16, or a per-chip figure on a
        per-core device) or the FLOP count is too high (double counting,
        counting per-device FLOPs as global, or the wrong step time).
    """
    for name, v in (
        ("model_flops_per_step", model_flops_per_step),
        ("step_time_s", step_time_s),
        ("n_devices", n_devices),
        ("peak_flops_per_device", peak_flops_per_device),
    ):
        if not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise ValueError(f"{name} must be a number, got {v!r}")
        if not math.isfinite(float(v)) or float(v) <= 0:
            raise ValueError(f"{name} must be positive and finite, got {v!r}")
    value = float(model_flops_per_step) / (
        float(step_time_s) * float(n_devices) * float(peak_flops_per_device)
    )
    if value > 1.0:
        raise ValueError(
            f"MFU {value:.3f} > 1 is impossible: either the peak FLOP/s per device "
            f"({peak_flops_per_device:.4g}) is wrong for this chip and dtype, or the "
            f"model FLOP count ({model_flops_per_step:.4g} per step over {n_devices} "
            f"devices, {step_time_s:.4g} s/step) is wrong."
        )
    return value


# ---------------------------------------------------------------------------
# XLA cost / memory analysis
# ---------------------------------------------------------------------------
def normalize_cost_analysis(ca: Any) -> dict[str, float]:
    """Normalize ``Lowered.cost_analysis()`` / ``Compiled.cost_analysis()`` output.

    Handles what different jax versions return:

    * a dict (jax >= 0.4.3x): used as is;
    * a list/tuple of dicts (older jax: one dict per HLO module / partition):
      a single element is taken as is; several are **summed** key by key
      (each module's work adds up); an empty list gives {};
    * None (backend without cost analysis): returns {} and the caller decides
      whether to raise.

    Note (DESIGN.md): ``compiled.cost_analysis()`` is per device under SPMD,
    ``lowered.cost_analysis()`` is global, and a scan/while body is counted
    once, not times its trip count.

    Args:
      ca: the raw cost analysis.

    Returns:
      {} for None/empty, else every numeric entry under its original key plus
      "flops" (0.0 when XLA omitted it, as it does for a function with no
      arithmetic), "bytes_accessed" (from "bytes accessed") and
      "transcendentals" when present; values are floats (FLOPs, bytes).

    Raises:
      TypeError: for anything else than a mapping, a sequence of mappings or None.
    """
    if ca is None:
        return {}
    if isinstance(ca, Mapping):
        parts = [ca]
    elif isinstance(ca, (list, tuple)):
        parts = list(ca)
        if not all(isinstance(p, Mapping) or p is None for p in parts):
            raise TypeError(f"cost analysis list must hold dicts, got {ca!r}")
        parts = [p for p in parts if p]
    else:
        raise TypeError(f"unexpected cost analysis type {type(ca).__name__}: {ca!r}")
    if not parts:
        return {}
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            try:
                fv = float(v)
            except (TypeError, ValueError):
                continue
            out[k] = out.get(k, 0.0) + fv
    out.setdefault("flops", 0.0)
    out["bytes_accessed"] = out.get("bytes accessed", out.get("bytes_accessed", 0.0))
    return out


_MEMORY_FIELDS = {
    "temp_bytes": "temp_size_in_bytes",
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
    "generated_code_bytes": "generated_code_size_in_bytes",
    "host_temp_bytes": "host_temp_size_in_bytes",
    "host_argument_bytes": "host_argument_size_in_bytes",
    "host_output_bytes": "host_output_size_in_bytes",
    "peak_memory_bytes": "peak_memory_in_bytes",
}


def memory_analysis_bytes(compiled: Any) -> dict[str, int]:
    """Per-device memory sizes (bytes) from ``compiled.memory_analysis()``.

    Args:
      compiled: a ``jax.stages.Compiled``.

    Returns:
      {} when the backend gives no memory analysis (None, or not implemented),
      else a dict with "temp_bytes", "argument_bytes", "output_bytes",
      "alias_bytes", "generated_code_bytes" (and host_* / "peak_memory_bytes"
      where this jax has them) plus "total_bytes" = argument + output + temp +
      generated code - alias (aliased outputs reuse donated argument buffers).
    """
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return {}
    if stats is None:
        return {}
    if isinstance(stats, (list, tuple)):  # some versions: one per module
        stats = stats[0] if stats else None
        if stats is None:
            return {}
    out: dict[str, int] = {}
    for name, attr in _MEMORY_FIELDS.items():
        v = stats.get(attr) if isinstance(stats, Mapping) else getattr(stats, attr, None)
        if v is not None:
            out[name] = int(v)
    if not out:
        return {}
    out["total_bytes"] = (
        out.get("argument_bytes", 0)
        + out.get("output_bytes", 0)
        + out.get("temp_bytes", 0)
        + out.get("generated_code_bytes", 0)
        - out.get("alias_bytes", 0)
    )
    return out
