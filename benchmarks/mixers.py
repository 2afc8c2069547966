#!/usr/bin/env python
"""Sequence-mixer layer benchmark: forward+backward throughput and MFU of every registered mixer
in every training form it supports, at several sequence lengths with a constant token count.

What is timed: one mixer layer (no norm, no FFN, no LM), ``jax.jit(jax.value_and_grad(f))`` with
``f(params, x) = sum(mixer(x) * r)`` differentiated w.r.t. the parameters and ``x`` (float32
throughout). Compile time is measured separately (``lower`` + ``compile``), one warm-up call is
excluded, and the step time is the median of ``--runs`` (>= 3) timed calls.

FLOPs: analytic *model* FLOPs, ``3 x flops_per_token(cfg, T, attention="causal") x B T`` (forward
+ backward = 3 x forward; the mixers' own ``flops_per_token`` of the executed form; softmax
attention counts the mean number of visible keys, (T + 1) / 2, not the full square; elementwise
work is not counted). MFU divides achieved model FLOP/s by the float32 matmul peak calibrated in
this process before anything else runs (``hardware.calibrate_cpu_peak("float32", refresh=True)``,
which keeps the best of this measurement and the machine's cached one, so MFU is conservative).
The JSON also holds the *executed* FLOPs (``attention="executed"``) and XLA's compiled cost analysis
(FLOPs and bytes accessed; note XLA counts a loop body once, so these under-count the scans of the
recurrent forms and the chunk loop of the chunked forms).

Skips: a combination is skipped (and reported as ``skipped (reason)``) when its compiled memory
footprint exceeds ``--mem-gib``, or when its predicted measuring time (warm-up + runs, extrapolated
from the same mixer/form at shorter T) exceeds ``--max-combo-s``; a quadratic form over the memory
budget at a shorter T is skipped at longer T without compiling.

Allocator note: XLA:CPU allocates an executable's temporaries afresh on every call; with glibc's
default malloc these large blocks are new ``mmap``s, so every step page-faults its whole temporary
footprint (the ``sys_s_per_step`` and ``minor_faults_per_step`` fields measure it).
``--malloc-tunables`` re-runs the benchmark under ``GLIBC_TUNABLES=`` ``hardware.CPU_MALLOC_TUNABLES``
(the setting of ``make train``: transparent huge pages for malloc's large blocks, so the per-call
faults are 2 MiB, not 4 KiB) for an A/B comparison.

``--quick`` is a smoke run (d_model 64, T 64/128, XLA optimisations off to halve compile times;
~40 s on 2 idle cores): its numbers are not comparable to a full run.

``--breakdown-seq T`` (default 2048; off with --quick; 0 disables) adds, for every chunked form, a decomposition at
that T: the core op alone (``gated_linear_attention`` / ``delta_rule`` on inputs of the shapes the
mixer feeds it), a *matmul skeleton* of the op (only its matmuls, at the op's shapes, no masks,
decays or sequential loop: the FLOPs the analytic count charges to the core), and the rest of the
layer (projections, feature maps, norms, gates, convs) = total - core, plus XLA's bytes accessed
against a measured memory bandwidth.

Usage::

    python benchmarks/mixers.py [--seq 512,2048,8192] [--mixers a,b] [--forms chunked,softmax] [--quick]
        [--malloc-tunables]

Writes ``benchmarks/results/mixers_<date>[_quick|_partial][_malloc].json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

from efficient_arch.hardware import CPU_MALLOC_TUNABLES

if __name__ == "__main__" and "--malloc-tunables" in sys.argv and os.environ.get("GLIBC_TUNABLES") != CPU_MALLOC_TUNABLES:
    os.environ["GLIBC_TUNABLES"] = CPU_MALLOC_TUNABLES  # read by glibc at process start: re-exec
    os.execv(sys.executable, [sys.executable] + sys.argv)

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_arch import hardware
from efficient_arch.config import default_config, finalize
from efficient_arch.models import registry

ROOT = Path(__file__).resolve().parent
# Forms each mixer supports: (label, cfg.model.mixer_form). Softmax attention has one form
# (mixer_form is ignored); sliding_window's "chunked" and "recurrent" both run the blocked form.
FORMS: dict[str, list[tuple[str, str]]] = {
    "attention": [("softmax", "chunked")],
    "sliding_window": [("blocked", "chunked"), ("quadratic", "quadratic")],
    "linear_attention": [("chunked", "chunked"), ("recurrent", "recurrent"), ("quadratic", "quadratic")],
    "retnet": [("chunked", "chunked"), ("recurrent", "recurrent"), ("quadratic", "quadratic")],
    "gla": [("chunked", "chunked"), ("recurrent", "recurrent"), ("quadratic", "quadratic")],
    "based": [("chunked", "chunked"), ("recurrent", "recurrent"), ("quadratic", "quadratic")],
    "mamba2": [("chunked", "chunked"), ("recurrent", "recurrent"), ("quadratic", "quadratic")],
    "deltanet": [("chunked", "chunked"), ("recurrent", "recurrent")],
    "gated_deltanet": [("chunked", "chunked"), ("recurrent", "recurrent")],
}
DEFAULT_FORMS = [("chunked", "chunked"), ("recurrent", "recurrent"), ("quadratic", "quadratic")]

FULL = dict(d_model=512, n_heads=8, head_dim=64, tokens=8192, seqs=(512, 2048, 8192),
            chunk_size=64, window_size=64, state_size=64, feature_dim=16)
QUICK = dict(d_model=64, n_heads=4, head_dim=16, tokens=256, seqs=(64, 128),
             chunk_size=16, window_size=16, state_size=16, feature_dim=4)


# ----------------------------------------------------------------------------- machine info


def machine_info() -> dict:
    cpu = hardware._cpu_model()
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in have)
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        import psutil
        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        pass
    return {"cpu_model": cpu, "cores": hardware._n_cores(), "cpu_flags": flags, "memory_gib": mem_gib,
            "machine": platform.machine(), "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
            "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "load_avg_start": os.getloadavg()}


def _jaxlib_version():
    try:
        import jaxlib
        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


def measure_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 7) -> dict:
    """Memory bandwidth (bytes/s) of a jit'd ``y = x * a + b`` over ``n_bytes`` of float32 (one
    read + one write per element), best of ``repeats``:

    * ``stream``: the input buffer is donated, so the output reuses it (no fresh pages);
    * ``fresh_output``: the output is a new ``n_bytes`` buffer on every call. Buffers above glibc's
      mmap threshold are fresh ``mmap``s, so every call page-faults them in; XLA:CPU allocates an
      executable's temporaries the same way, so a step with large temporaries pays this too.
    """
    f = jax.jit(lambda v: v * 1.0001 + 0.5)
    g = jax.jit(lambda v: v * 1.0001 + 0.5, donate_argnums=0)
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f(x).block_until_ready()
    fresh = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        fresh = min(fresh, time.perf_counter() - t0)
    y = g(jnp.ones((n_bytes // 4,), jnp.float32))
    y.block_until_ready()
    stream = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = g(y)
        y.block_until_ready()
        stream = min(stream, time.perf_counter() - t0)
    return {"stream": 2.0 * n_bytes / stream, "fresh_output": 2.0 * n_bytes / fresh,
            "fresh_page_rate": n_bytes / max(fresh - stream, 1e-9), "n_bytes": n_bytes}


# ----------------------------------------------------------------------------- building


def model_cfg(mixer: str, form: str, seq: int, sizes: dict):
    c = default_config()
    m = c.model
    m.mixer = mixer
    m.mixer_form = form
    m.seq_len = seq
    m.d_model = sizes["d_model"]
    m.n_heads = sizes["n_heads"]
    m.head_dim = sizes["head_dim"]
    m.chunk_size = sizes["chunk_size"]
    m.window_size = sizes["window_size"]
    m.state_size = sizes["state_size"]
    m.feature_dim = sizes["feature_dim"]
    m.dtype = "float32"
    m.param_dtype = "float32"
    return finalize(c).model


def _timed_compile(fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _mem_bytes(compiled) -> int | None:
    mem = hardware.memory_analysis_bytes(compiled)
    return mem.get("total_bytes") if mem else None


def _cost(compiled) -> dict:
    try:
        ca = hardware.normalize_cost_analysis(compiled.cost_analysis())
    except Exception:  # noqa: BLE001
        return {}
    return {"xla_flops": ca.get("flops"), "xla_bytes_accessed": ca.get("bytes_accessed")}


def _time_calls(compiled, args, runs: int) -> tuple[float, list[float], dict]:
    """Warm-up call (excluded) then ``runs`` timed calls; also CPU user/system seconds and minor
    page faults per timed call (``getrusage``: the system time is mostly the kernel faulting in
    the executable's freshly allocated temporaries)."""
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))  # warm-up, excluded
    warm = time.perf_counter() - t0
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ru = {"user_s_per_step": (r1.ru_utime - r0.ru_utime) / runs,
          "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / runs,
          "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / runs}
    return warm, times, ru


def randn(shape, scale: float = 1.0, seed: int = 0) -> jax.Array:
    """float32 normal array from numpy's RNG (a jax.random call would compile per new shape,
    ~0.5-1 s each on a small CPU)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))


_PARAMS: dict = {}  # (mixer, sizes) -> (params, rest): parameters do not depend on T or the form


def mixer_step(mcfg, batch: int, seed: int = 0):
    """(loss-and-grad function, its args) for one mixer layer: d/d(params, x) sum(mixer(x) * r).

    The mixer is initialised with its own init inside one jit (cached per mixer and sizes: the
    parameters do not depend on ``seq_len`` or ``mixer_form``, which are static attributes in the
    graph definition).
    """
    cls = registry.get_mixer(mcfg.mixer)

    def construct():
        with nnx.use_eager_sharding(False):  # as models.lm.new_model: logical names only, no mesh
            return cls(mcfg, rngs=nnx.Rngs(seed))

    graphdef, _, _ = nnx.split(nnx.eval_shape(construct), nnx.Param, ...)
    key = (mcfg.mixer, mcfg.d_model, mcfg.n_heads, mcfg.head_dim, mcfg.state_size, mcfg.feature_dim,
           mcfg.expand, seed)
    if key not in _PARAMS:
        _PARAMS[key] = jax.jit(lambda: nnx.split(construct(), nnx.Param, ...)[1:])()
    params, rest = _PARAMS[key]
    x = randn((batch, mcfg.seq_len, mcfg.d_model), seed=seed + 1)
    r = randn(x.shape, seed=seed + 2)

    def loss(p, xx, rest_, rr):
        y = nnx.merge(graphdef, p, rest_)(xx)
        return jnp.sum(y.astype(jnp.float32) * rr)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    return grad, (params, x, rest, r)


def fmt_reason(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s[:160]


# ----------------------------------------------------------------------------- main table


def run_combo(mixer, label, form, seq, batch, sizes, args, peak, hist) -> dict:
    mcfg = model_cfg(mixer, form, seq, sizes)
    cls = registry.get_mixer(mixer)
    tokens = batch * seq
    fwd_model = cls.flops_per_token(mcfg, seq, attention="causal")
    fwd_exec = cls.flops_per_token(mcfg, seq, attention="executed")
    row = {"mixer": mixer, "form": label, "mixer_form": form, "seq_len": seq, "batch": batch,
           "tokens": tokens, "model_flops_per_step": 3.0 * fwd_model * tokens,
           "executed_flops_per_step": 3.0 * fwd_exec * tokens,
           "fwd_flops_per_token_causal": fwd_model, "status": "ok"}
    # Skip predictions from the same mixer/form at shorter T (``hist``: rows measured or skipped
    # before, shortest first). Time: a power law through the last two measured points (exponent
    # clamped to [0, 2]); from one point: linear in T for quadratic/softmax forms (per-token work
    # ~T at a constant token count), constant for chunked/recurrent/blocked forms (per-token work
    # independent of T). Memory: a quadratic/softmax form skipped for memory at a shorter T is
    # skipped without compiling.
    measured = [h for h in hist if h.get("step_s")]
    if measured:
        last = measured[-1]
        expo = 1.0 if label in ("quadratic", "softmax") else 0.0
        if len(measured) >= 2:
            a0, a1 = measured[-2], measured[-1]
            expo = math.log(a1["step_s"] / a0["step_s"]) / math.log(a1["seq_len"] / a0["seq_len"])
            expo = min(max(expo, 0.0), 2.0)
        pred = last["step_s"] * (seq / last["seq_len"]) ** expo
        row["predicted_step_s"] = pred
        if pred * (args.runs + 1) > args.max_combo_s:
            row["status"] = (f"skipped (predicted {pred:.0f} s/step x {args.runs + 1} calls > "
                             f"{args.max_combo_s:.0f} s; T={last['seq_len']}: {last['step_s']:.1f} s/step)")
            return row
    if label in ("quadratic", "softmax") and any(h["status"].startswith("skipped (compiled memory") for h in hist):
        row["status"] = "skipped (memory: over budget at a shorter T, O(T^2) per sequence)"
        return row
    try:
        fn, fargs = mixer_step(mcfg, batch)
        compiled, comp_s = _timed_compile(fn, *fargs)
        row["compile_s"] = comp_s
        mem = _mem_bytes(compiled)
        row["memory_bytes"] = mem
        row.update(_cost(compiled))
        if mem is not None and mem > args.mem_gib * 2**30:
            row["status"] = f"skipped (compiled memory {mem / 2**30:.1f} GiB > {args.mem_gib:g} GiB budget)"
            return row
        warm, times, ru = _time_calls(compiled, fargs, args.runs)
        row.update(ru, load_avg_1min=os.getloadavg()[0])  # other work on the machine skews timings
    except Exception as e:  # noqa: BLE001
        row["status"] = f"error ({fmt_reason(e)})"
        if args.verbose:
            traceback.print_exc()
        return row
    step = statistics.median(times)
    row.update(warmup_s=warm, times_s=times, step_s=step, tokens_per_s=tokens / step,
               model_flops_per_s=row["model_flops_per_step"] / step,
               executed_flops_per_s=row["executed_flops_per_step"] / step,
               min_step_s=min(times), mfu=row["model_flops_per_step"] / step / peak)
    if row.get("xla_bytes_accessed"):
        row["xla_bytes_per_s"] = row["xla_bytes_accessed"] / step
    return row


# ----------------------------------------------------------------------------- breakdown


def _core_inputs(mixer: str, mcfg, batch: int):
    """Random inputs of the shapes (and plausible values) the mixer feeds its core op.

    Returns (kind, dict of arrays) with kind "gla" (``gated_linear_attention``) or "delta"
    (``delta_rule``), or None for mixers without a chunked core op.
    """
    from efficient_arch.ops.linear_recurrence import feature_dim

    b, t, h, hd = batch, mcfg.seq_len, mcfg.n_heads, mcfg.head_dim
    rng = np.random.default_rng(7)
    n = lambda *s: rng.standard_normal(s, dtype=np.float32) * np.float32(0.5)  # noqa: E731
    j = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    if _core_map(mixer, mcfg) == "taylor":  # raw q, k: the op applies the Taylor map itself
        f = mcfg.feature_dim
        return "gla", dict(q=j(n(b, t, h, f)), k=j(n(b, t, h, f)), v=j(n(b, t, h, hd)), g=None)
    if mixer == "linear_attention":
        kf = feature_dim(mcfg.feature_map, hd)
        return "gla", dict(q=j(np.abs(n(b, t, h, kf))), k=j(np.abs(n(b, t, h, kf))), v=j(n(b, t, h, hd)), g=None)
    if mixer == "retnet":
        g = np.broadcast_to(np.log1p(-(2.0 ** (-5.0 - np.arange(h)))), (b, t, h))
        return "gla", dict(q=j(n(b, t, h, hd)), k=j(n(b, t, h, hd)), v=j(n(b, t, h, hd)), g=j(g))
    if mixer == "gla":
        g = -np.log1p(np.exp(-(1.0 + n(b, t, h, hd)))) / 16.0  # log_sigmoid(1 + noise) / 16
        return "gla", dict(q=j(n(b, t, h, hd)), k=j(n(b, t, h, hd)), v=j(n(b, t, h, hd)), g=j(g))
    if mixer == "mamba2":
        hh = mcfg.expand * mcfg.d_model // hd
        ns = mcfg.state_size
        g = -np.abs(n(b, t, hh)) * 0.2
        return "gla", dict(q=j(n(b, t, hh, ns)), k=j(n(b, t, hh, ns)), v=j(n(b, t, hh, hd)), g=j(g))
    if mixer in ("deltanet", "gated_deltanet"):
        q, k = n(b, t, h, hd), n(b, t, h, hd)
        q = q / np.linalg.norm(q, axis=-1, keepdims=True)
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
        beta = 1.0 / (1.0 + np.exp(-n(b, t, h)))
        g = -np.abs(n(b, t, h)) * 0.2 if mixer == "gated_deltanet" else None
        return "delta", dict(q=j(q), k=j(k), v=j(n(b, t, h, hd)), beta=j(beta), g=j(g))
    return None


def _core_normalized(mixer: str, mcfg) -> bool:
    """Whether the mixer calls its core op with ``normalize=True`` (normalised linear attention)."""
    return mixer == "based" or (mixer == "linear_attention" and bool(mcfg.normalize))


def _core_map(mixer: str, mcfg) -> str | None:
    """The ``feature_map`` the mixer passes to its core op (Based and the Taylor linear attention
    hand it raw ``q``, ``k``; see their ``__call__``), or None."""
    if mixer == "based" or (mixer == "linear_attention" and mcfg.feature_map == "taylor"):
        return "taylor"
    return None


def _core_kind(mixer: str) -> str | None:
    if mixer in ("linear_attention", "based", "retnet", "gla", "mamba2"):
        return "gla"
    if mixer in ("deltanet", "gated_deltanet"):
        return "delta"
    return None


def _core_step(kind: str, chunk: int, normalize: bool = False, feature_map: str | None = None):
    from efficient_arch.ops.delta_rule import delta_rule
    from efficient_arch.ops.linear_recurrence import gated_linear_attention

    if kind == "gla":
        def loss(q, k, v, g, r):
            o, _ = gated_linear_attention(q, k, v, g, form="chunked", chunk_size=chunk, normalize=normalize,
                                          feature_map=feature_map)
            return jnp.sum(o * r)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))

    def loss_d(q, k, v, beta, g, r):
        o, _ = delta_rule(q, k, v, beta, g, form="chunked", chunk_size=chunk)
        return jnp.sum(o * r)
    return jax.value_and_grad(loss_d, argnums=(0, 1, 2, 3, 4))


def _skeleton(kind: str, shapes: dict, chunk: int, score_dim: int | None = None):
    """The chunked op's matmuls only (at its shapes; no masks, decays, cumsums, sequential loop).

    ``shapes["q"]`` is ``[B, T, H, K]`` with ``K`` the state's key width; ``score_dim``: the
    width the intra-chunk scores contract (the Taylor kernel's raw ``F``; default ``K``).
    Returns (loss-and-grad fn, args, forward matmul FLOPs of one call). The FLOPs are those the
    analytic ``flops_gated_linear_attention`` / ``flops_delta_rule`` charge to the chunked core.
    """
    from efficient_arch.ops.delta_rule import unit_lower_inverse
    from efficient_arch.ops.dots import dot_canonical as _mm

    b, t, h, kd = shapes["q"]
    vd = shapes["v"][-1]
    c = min(chunk, t)
    n = t // c
    f32 = jnp.float32
    if kind == "gla":
        sd = kd if score_dim is None else score_dim
        q = randn((b, n, c, h, kd), seed=11)
        k = randn((b, n, c, h, kd), seed=12)
        v = randn((b, n, c, h, vd), seed=13)
        s = randn((b, n, h, kd, vd), seed=14)
        qs, ks = (q, k) if sd == kd else (randn((b, n, c, h, sd), seed=15), randn((b, n, c, h, sd), seed=16))

        def loss(q, k, v, s, qs, ks):
            a = _mm("bnihk,bnjhk->bnhij", qs, ks, f32, f32)
            o = _mm("bnhij,bnjhv->bnihv", a, v, f32, f32)
            u = _mm("bnjhk,bnjhv->bnhkv", k, v, f32, f32)
            o = o + _mm("bnihk,bnhkv->bnihv", q, s, f32, f32)
            return jnp.sum(o) + jnp.sum(u)
        flops = b * n * h * (2.0 * c * c * sd + 2.0 * c * c * vd + 4.0 * c * kd * vd)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)), (q, k, v, s, qs, ks), flops
    p2 = 1 << max(c - 1, 0).bit_length()
    q = randn((b, h, n, c, kd), seed=11)
    k = randn((b, h, n, c, kd), 1.0 / math.sqrt(kd), seed=12)
    v = randn((b, h, n, c, vd), seed=13)
    s = randn((b, h, n, kd, vd), seed=14)
    tril = jnp.tril(jnp.ones((c, c), bool), -1)

    def loss_d(q, k, v, s):
        kk = jnp.einsum("...ik,...jk->...ij", k, k)
        tinv = unit_lower_inverse(jnp.where(tril, kk, 0.0))
        wu = jnp.einsum("...ij,...jd->...id", tinv, jnp.concatenate([k, v], axis=-1))
        w, ubar = wu[..., :kd], wu[..., kd:]
        u = ubar - jnp.einsum("...ck,...kv->...cv", w, s)
        qk = jnp.einsum("...ik,...jk->...ij", q, k)
        o = jnp.einsum("...ck,...kv->...cv", q, s) + jnp.einsum("...ij,...jv->...iv", qk, u)
        s_new = jnp.einsum("...ck,...cv->...kv", k, u)
        return jnp.sum(o) + jnp.sum(s_new)
    flops = b * h * n * (c * c * (6.0 * kd + 4.0 * vd) + c * 2.0 * (p2 * p2 - 1) / 3.0 + 6.0 * c * kd * vd)
    return jax.value_and_grad(loss_d, argnums=(0, 1, 2, 3)), (q, k, v, s), flops


def _time_fn(fn, fargs, runs):
    compiled, comp_s = _timed_compile(fn, *fargs)
    _, times, _ = _time_calls(compiled, fargs, runs)
    return statistics.median(times), comp_s, _cost(compiled)


def breakdown(mixer: str, row: dict, sizes: dict, args, peak: float, bandwidth: float) -> dict | None:
    from efficient_arch.ops.linear_recurrence import feature_dim

    mcfg = model_cfg(mixer, "chunked", row["seq_len"], sizes)
    spec = _core_inputs(mixer, mcfg, row["batch"])
    if spec is None:
        return None
    kind, arrs = spec
    out = {"mixer": mixer, "seq_len": row["seq_len"], "batch": row["batch"], "total_s": row["step_s"]}
    try:
        core_args = tuple(arrs[k] for k in (("q", "k", "v", "g") if kind == "gla" else ("q", "k", "v", "beta", "g")))
        r = randn(arrs["v"].shape, seed=3)
        norm, fmap = _core_normalized(mixer, mcfg), _core_map(mixer, mcfg)
        core_s, core_comp, core_cost = _time_fn(_core_step(kind, mcfg.chunk_size, norm, fmap), core_args + (r,),
                                                args.runs)
        shapes = {k: a.shape for k, a in arrs.items() if a is not None}
        raw_f = shapes["q"][-1]
        if fmap is not None:  # the op's state and products use the mapped width
            shapes["q"] = shapes["q"][:3] + (feature_dim(fmap, raw_f),)
        score_dim = raw_f if fmap == "taylor" else None
        skel_fn, skel_args, skel_fwd = _skeleton(kind, shapes, mcfg.chunk_size, score_dim)
        skel_s, _, skel_cost = _time_fn(skel_fn, skel_args, args.runs)
    except Exception as e:  # noqa: BLE001
        out["status"] = f"error ({fmt_reason(e)})"
        if args.verbose:
            traceback.print_exc()
        return out
    # analytic split of the layer's model FLOPs: core (the op, form "chunked") vs the rest
    fwd_total = row["fwd_flops_per_token_causal"]
    from efficient_arch.ops.delta_rule import flops_delta_rule
    from efficient_arch.ops.linear_recurrence import flops_gated_linear_attention
    b, t, hh, kd = shapes["q"]
    vd = arrs["v"].shape[-1]
    if kind == "gla":
        vec = arrs["g"] is not None and arrs["g"].ndim == 4
        fwd_core = flops_gated_linear_attention(t, hh, kd, vd, form="chunked", chunk_size=mcfg.chunk_size,
                                                vector_decay=vec, has_decay=arrs["g"] is not None,
                                                normalize=norm, score_dim=score_dim)
    else:
        fwd_core = flops_delta_rule(t, hh, kd, vd, form="chunked", chunk_size=mcfg.chunk_size,
                                    gated=arrs["g"] is not None)
    tokens = row["tokens"]
    core_flops = 3.0 * fwd_core * tokens
    rest_flops = 3.0 * (fwd_total - fwd_core) * tokens
    rest_s = row["step_s"] - core_s  # <= 0: the op alone was not faster than the whole layer (noise)
    out.update(
        status="ok", core_op=kind, core_shapes={k: list(a.shape) for k, a in arrs.items() if a is not None},
        core_s=core_s, core_share=core_s / row["step_s"], core_compile_s=core_comp,
        core_model_flops=core_flops, core_flops_per_s=core_flops / core_s, core_frac_peak=core_flops / core_s / peak,
        core_xla=core_cost,
        skeleton_s=skel_s, skeleton_flops=3.0 * skel_fwd, skeleton_flops_per_s=3.0 * skel_fwd / skel_s,
        skeleton_frac_peak=3.0 * skel_fwd / skel_s / peak, skeleton_xla=skel_cost,
        core_non_matmul_s=max(core_s - skel_s, 0.0),
        rest_s=rest_s, rest_model_flops=rest_flops,
        rest_flops_per_s=rest_flops / rest_s if rest_s > 0 else None,
        rest_frac_peak=rest_flops / rest_s / peak if rest_s > 0 else None,
        total_xla_bytes=row.get("xla_bytes_accessed"),
        total_bytes_per_s=(row.get("xla_bytes_accessed") or 0.0) / row["step_s"],
        total_frac_bandwidth=(row.get("xla_bytes_accessed") or 0.0) / row["step_s"] / bandwidth,
        core_bytes_per_s=(core_cost.get("xla_bytes_accessed") or 0.0) / core_s,
        core_frac_bandwidth=(core_cost.get("xla_bytes_accessed") or 0.0) / core_s / bandwidth,
    )
    return out


# ----------------------------------------------------------------------------- output


def _fmt_row(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [r["mixer"], r["form"], str(r["seq_len"]), str(r["batch"]), "-", "-",
                f"{r['model_flops_per_step'] / 1e9:.1f}", "-", "-", "-",
                f"{r['compile_s']:.1f}" if "compile_s" in r else "-", r["status"]]
    return [r["mixer"], r["form"], str(r["seq_len"]), str(r["batch"]), f"{r['step_s']:.3f}",
            f"{r['tokens_per_s']:,.0f}", f"{r['model_flops_per_step'] / 1e9:.1f}",
            f"{r['model_flops_per_s'] / 1e9:.1f}", f"{100 * r['mfu']:.1f}",
            f"{100 * r['sys_s_per_step'] / r['step_s']:.0f}", f"{r['compile_s']:.1f}", "ok"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


MAIN_HEADER = ["mixer", "form", "T", "B", "step s", "tokens/s", "model GFLOP", "GFLOP/s", "MFU %",
               "sys %", "compile s", "status"]
BREAK_HEADER = ["mixer", "T", "layer s", "core op s (share)", "core GFLOP/s", "skeleton GFLOP/s (% peak)",
                "core non-matmul s", "rest s", "rest GFLOP/s (% peak)", "layer GB/s (% BW)"]


def _fmt_break(b: dict, peak: float) -> list[str]:
    if b.get("status") != "ok":
        return [b["mixer"], str(b["seq_len"])] + ["-"] * 7 + [b.get("status", "?")]
    return [b["mixer"], str(b["seq_len"]), f"{b['total_s']:.3f}", f"{b['core_s']:.3f} ({100 * b['core_share']:.0f}%)",
            f"{b['core_flops_per_s'] / 1e9:.1f}",
            f"{b['skeleton_flops_per_s'] / 1e9:.1f} ({100 * b['skeleton_frac_peak']:.0f}%)",
            f"{b['core_non_matmul_s']:.3f}", f"{b['rest_s']:.3f}",
            (f"{b['rest_flops_per_s'] / 1e9:.1f} ({100 * b['rest_frac_peak']:.0f}%)" if b["rest_flops_per_s"]
             else "n/a (core >= layer)"),
            f"{b['total_bytes_per_s'] / 1e9:.1f} ({100 * b['total_frac_bandwidth']:.0f}%)"]


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default=None, help="comma-separated sequence lengths (default 512,2048,8192; "
                   "--quick: 64,128)")
    p.add_argument("--mixers", default=None, help="comma-separated registered mixer names (default: all)")
    p.add_argument("--forms", default=None, help="comma-separated form labels to run (chunked, recurrent, "
                   "quadratic, softmax, blocked; default: every form of each mixer)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (d_model 64, T 64/128): a < 60 s smoke run")
    p.add_argument("--optimize", action="store_true", help="with --quick: keep XLA optimizations on "
                   "(--quick turns most of them off to compile faster)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step B*T (default 8192; quick 256)")
    p.add_argument("--runs", type=int, default=3, help="timed calls per combination (median; >= 3)")
    p.add_argument("--max-combo-s", type=float, default=30.0,
                   help="skip a combination whose predicted warm-up + timed calls exceed this (s)")
    p.add_argument("--mem-gib", type=float, default=8.0, help="skip a combination whose compiled "
                   "memory footprint exceeds this (GiB)")
    p.add_argument("--breakdown-seq", type=int, default=None, help="T of the chunked-form breakdown "
                   "(default 2048; --quick: off; 0 disables)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/mixers_<date>[_quick|"
                   "_partial].json)")
    p.add_argument("--malloc-tunables", action="store_true", help="re-exec under GLIBC_TUNABLES=hardware."
                   "CPU_MALLOC_TUNABLES (huge pages for XLA's per-call temporaries); for A/B runs")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed combinations")
    a = p.parse_args(argv)
    if a.runs < 3:
        p.error("--runs must be >= 3 (the step time is a median of >= 3 calls)")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.quick and not args.optimize:
        # A smoke run: XLA:CPU compiles (~1-4 s per mixer fwd+bwd here) dominate, so compile with
        # most optimizations off (about 2x faster compiles, slower steps). Numbers are not comparable.
        jax.config.update("jax_disable_most_optimizations", True)
    sizes = dict(QUICK if args.quick else FULL)
    if args.tokens:
        sizes["tokens"] = args.tokens
    seqs = [int(s) for s in args.seq.split(",")] if args.seq else list(sizes["seqs"])
    names = registry.mixer_names()
    mixers = args.mixers.split(",") if args.mixers else names
    unknown = [m for m in mixers if m not in names]
    if unknown:
        print(f"unknown mixer(s) {unknown}; registered: {names}", file=sys.stderr)
        return 2
    labels = sorted({lb for fs in [DEFAULT_FORMS, *FORMS.values()] for lb, _ in fs})
    forms = args.forms.split(",") if args.forms else labels
    if set(forms) - set(labels):
        print(f"unknown form label(s) {sorted(set(forms) - set(labels))}; choose from {labels}", file=sys.stderr)
        return 2
    for s in seqs:
        if sizes["tokens"] % s:
            print(f"--seq {s} does not divide the token count {sizes['tokens']} (--tokens)", file=sys.stderr)
            return 2
    bseq = args.breakdown_seq
    if bseq is None:
        bseq = 0 if args.quick else 2048  # --quick --breakdown-seq 128 exercises it (+~5 s)
    if bseq and bseq not in seqs:
        bseq = 0

    # 1. calibrate first, in this process, before any other jax work. refresh=True measures now and
    # keeps the best of this and the machine's cached calibration (conservative MFU on a loaded box).
    peak, peak_label = hardware.calibrate_cpu_peak("float32", refresh=True)
    m = re.search(r"this process (?:measured )?([0-9][0-9.eE+-]*)", peak_label)
    peak_this = float(m.group(1)) if m else peak
    bw = measure_bandwidth(64 * 2**20 if args.quick else 256 * 2**20)
    bandwidth = bw["stream"]
    info = machine_info()
    info.update(peak_flops_per_s=peak, peak_label=peak_label, peak_this_process_flops_per_s=peak_this,
                stream_bandwidth_bytes_per_s=bandwidth, fresh_output_bandwidth_bytes_per_s=bw["fresh_output"],
                fresh_page_fault_bytes_per_s=bw["fresh_page_rate"])
    print(f"# {info['cpu_model']}, {info['cores']} cores, jax {info['jax']}, load avg {info['load_avg_start']}")
    print(f"# float32 peak {peak / 1e9:.1f} GFLOP/s (this process {peak_this / 1e9:.1f}; {peak_label})")
    print(f"# stream bandwidth {bandwidth / 1e9:.1f} GB/s (fresh output buffer: {bw['fresh_output'] / 1e9:.1f} GB/s; "
          f"page-in of fresh memory {bw['fresh_page_rate'] / 1e9:.1f} GB/s)")
    print(f"# d_model {sizes['d_model']}, heads {sizes['n_heads']}x"
          f"{sizes['head_dim']}, {sizes['tokens']} tokens/step, chunk {sizes['chunk_size']}, window "
          f"{sizes['window_size']}", flush=True)

    rows, breaks, kinds_done = [], [], set()
    for mixer in mixers:
        for label, form in FORMS.get(mixer, DEFAULT_FORMS):
            if label not in forms:
                continue
            hist = []
            for seq in sorted(seqs):
                batch = sizes["tokens"] // seq
                row = run_combo(mixer, label, form, seq, batch, sizes, args, peak, hist)
                hist.append(row)
                rows.append(row)
                print("  " + " | ".join(_fmt_row(row)), flush=True)
                if row["status"] == "ok":
                    kind = _core_kind(mixer)
                    if label == "chunked" and seq == bseq and kind and not (args.quick and kind in kinds_done):
                        kinds_done.add(kind)  # --quick: one mixer per core op (a smoke test of the code)
                        b = breakdown(mixer, row, sizes, args, peak, bandwidth)
                        if b is not None:
                            breaks.append(b)
                            print("    breakdown: " + " | ".join(_fmt_break(b, peak)), flush=True)
                gc.collect()

    wall = time.perf_counter() - t_start
    info["load_avg_end"] = os.getloadavg()
    print()
    print(f"Mixer layer fwd+bwd, float32, {sizes['tokens']} tokens/step, d_model {sizes['d_model']}; model FLOPs = "
          f"3 x flops_per_token(causal) x tokens; MFU vs {peak / 1e9:.1f} GFLOP/s; sys % = kernel CPU time "
          f"(page faults) / step time")
    print(markdown_table(MAIN_HEADER, [_fmt_row(r) for r in rows]))
    if breaks:
        print()
        print(f"Chunked-form breakdown at T={bseq} (core = the op alone; skeleton = its matmuls only; "
              f"rest = layer - core; BW = {bandwidth / 1e9:.1f} GB/s)")
        print(markdown_table(BREAK_HEADER, [_fmt_break(b, peak) for b in breaks]))
    print(f"\nwall time {wall:.0f} s")

    date = datetime.date.today().isoformat()
    default_suffix = "_quick" if args.quick else ("_partial" if (args.mixers or args.seq or args.tokens or args.forms)
                                                   else "")
    if args.malloc_tunables:
        default_suffix += "_malloc"
    out = Path(args.out) if args.out else ROOT / "results" / f"mixers_{date}{default_suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "benchmarks/mixers.py", "date": date, "argv": sys.argv[1:], "wall_s": wall,
        "machine": info, "sizes": sizes, "quick": args.quick,
        "xla_optimizations": not (args.quick and not args.optimize), "seqs": seqs, "runs": args.runs,
        "conventions": {
            "timed": "jax.jit(value_and_grad(sum(mixer(x) * r))) w.r.t. params and x, float32; one warm-up "
                     "call excluded; step_s = median of runs",
            "model_flops": "3 x flops_per_token(cfg, T, attention='causal') x tokens (causal model FLOPs: "
                           "softmax attention counts (T+1)/2 visible keys; elementwise work not counted)",
            "executed_flops": "3 x flops_per_token(cfg, T, attention='executed') x tokens (scored query/key blocks "
                              "for softmax forms)",
            "mfu": "model_flops_per_s / peak_flops_per_s (float32 matmul peak calibrated in this process, "
                   "best-of with the cached calibration)",
            "xla_cost": "compiled.cost_analysis(); loop bodies (scans) counted once",
        },
        "results": rows, "breakdown": breaks,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=float)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
