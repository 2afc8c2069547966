#!/usr/bin/env python
"""One GPU check: fast paths against the XLA path, then ~1B-parameter train steps and their MFU.

Run on one GPU (sized for an H200, 139 GiB; bounded to finish within 8 minutes)::

    python benchmarks/gpu.py [--budget-s 450] [--archs transformer,moe,gla,mamba2,transformer_fp8]
    python benchmarks/gpu.py --smoke        # any machine: tiny sizes, same code, in one process
                                            # (CPU: XLA optimizations off, ~30-60 s; numbers meaningless)

1. Correctness (``checks``):
   * attention: ``layers.dot_product_attention`` with ``implementation="cudnn"`` (cuDNN fused flash
     attention) against ``implementation="xla"`` at bf16, GQA 16 query / 8 KV heads, head_dim 128,
     causal, without and with a segment mask: forward and the gradients of q, k, v within bf16
     tolerance (max abs error <= 2e-2 x max |reference|), and the automatic choice
     (``attention_implementation``) reports cuDNN; the compiled HLO is searched for the cuDNN
     custom call. On a CPU the cuDNN half is reported as skipped (the selection then says xla).
   * FP8: ``layers.fp8_einsum`` (qwix quantized training, E4M3 forward / E5M2 backward) against the
     bf16 matmul, forward and gradients within FP8 tolerance (<= 8% of the max), whether the compiled
     HLO holds an FP8 GEMM (cuBLASLt ``f8`` custom call), and its fwd+bwd time against bf16's.
2. Train steps (``archs``), each in its own child process with its own timeout (a failure or an
   out-of-memory is a row with the error; the rest still run): transformer (GQA attention, cuDNN
   attention on GPU), MoE (top-2 of 8 experts, dropless ``ragged_dot``), GLA (chunked, pure JAX)
   and Mamba-2 (chunked SSD, pure JAX) at ~1B parameters, bf16 compute, float32 params + AdamW,
   seq 2048 x batch 8, remat "dots"; plus the transformer with FP8 matmuls when time remains. Times
   ``--steps`` steps after ``--warmup`` (median); MFU = analytic model FLOPs per step / step time /
   the peak of ``hardware.peak_flops_for_policy`` (chip from ``jax.devices()[0].device_kind`` in
   ``hardware.PEAK_FLOPS``: H200 bf16 989e12, fp8 1979e12 dense; on CPU the measured calibration).

Budget: the checks child gets at most 240 s (seen: over 90 s, under 170 s on an H200), then each row in order the time left of ``--budget-s``
(default 450 s of an 8-minute slot), at most ``--row-timeout-s`` (150 s); a row is killed at its
timeout and reported, and rows that cannot start with 45 s left are listed as skipped.
Prints one table; writes ``benchmarks/results/gpu_<date>[_smoke].json``.

Run on an H200 on 2026-11-29 (jax 0.11.2; ``benchmarks/results/gpu_2026-11-29.json``, table in
benchmarks/README.md): every check passed; transformer 44.0% MFU, MoE (dropless) 7.1%, GLA 20.7%,
Mamba-2 22.0%; compiles 8-16 s per 1B row. The checks took over 90 s (the FP8 half: XLA's FP8
GEMM compile), and the FP8 transformer row did not finish in 200 s: both still to be explained.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent

# ~1B-parameter overrides on each family's base config (count_params: transformer 0.98B, MoE 1.12B
# total / 0.49B active, GLA 1.02B, Mamba-2 0.97B; vocab 32768 untied, 128-dim attention heads).
# remat "dots": XLA:CPU's memory analysis of these compiled steps gives 42 / 37 / 56 / 47 GiB
# (transformer / MoE / GLA / Mamba-2) with it and 102 GiB (transformer) / 220 GiB (Mamba-2)
# without; a GPU's buffer assignment differs, but 139 GiB leaves room. MFU counts model FLOPs
# (no recompute); HFU includes it.
_1B = {"d_model": 2048, "n_layers": 18, "n_heads": 16, "vocab_size": 32768, "tie_embeddings": False,
       "seq_len": 2048, "max_seq_len": None, "remat": "dots"}
ARCHS = {  # name: (config file, model overrides)
    "transformer": ("transformer.py", {**_1B, "n_kv_heads": 8, "d_ff": 5632}),
    "moe": ("moe.py", {**_1B, "n_layers": 12, "n_kv_heads": 8, "d_ff": 5632, "moe.d_ff_expert": 1408,
                       "moe.dispatch": "dropless"}),
    "gla": ("gla.py", {**_1B, "d_ff": 4608}),
    "mamba2": ("mamba2.py", {**_1B, "head_dim": 64, "state_size": 128, "d_ff": 3328}),
    "transformer_fp8": ("transformer.py", {**_1B, "n_kv_heads": 8, "d_ff": 5632, "quant": "fp8"}),
}
BATCH, SMOKE_BATCH = 8, 2


def arch_config(name: str, smoke: bool):
    """Finalized config of row ``name``: the family's ``base`` config with the ~1B overrides (smoke:
    its ``tiny`` config with only the precision / dispatch overrides), bf16 compute, float32 params."""
    from efficient_arch.config import finalize, load_config

    file, over = ARCHS[name]
    c = load_config(REPO / "experiments/configs" / file, "tiny" if smoke else "base")
    c.unlock()
    if smoke:
        over = {k: v for k, v in over.items() if k in ("quant", "moe.dispatch")}
    for key, v in over.items():
        node = c.model
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    c.model.dtype = "bfloat16"
    c.train.batch_size = SMOKE_BATCH if smoke else BATCH
    c.flops.peak_flops = None
    return finalize(c, 1)


_PEAKS: dict = {}


def _peak(dtype: str, quant: str, dev) -> tuple[float | None, str]:
    """``hardware.peak_flops_for_policy`` once per (dtype, quant) in this process (a CPU
    calibration takes seconds); (None, reason) for an accelerator not in the table."""
    from efficient_arch import hardware

    if (dtype, quant) not in _PEAKS:
        try:
            _PEAKS[dtype, quant] = hardware.peak_flops_for_policy(dtype, quant, device=dev)
        except hardware.UnknownAcceleratorError as e:
            _PEAKS[dtype, quant] = (None, f"unknown: {e}")
    return _PEAKS[dtype, quant]


def _hlo_flags(hlo: str) -> dict:
    """Which fast kernels a compiled program calls (searched in its optimized HLO text)."""
    return {"cudnn_attention_in_hlo": "cudnn$fmha" in hlo,
            "cublas_f8_gemm_in_hlo": "cublas$lt$matmul$f8" in hlo,
            "hlo_mentions_f8": "f8e4m3" in hlo}


def run_arch(name: str, smoke: bool, warmup: int, steps: int) -> dict:
    """Build, compile and time one row's train step in this process; returns its JSON record."""
    import jax
    import numpy as np

    from efficient_arch import flops, hardware, parallel, train  # noqa: F401
    from efficient_arch.models.layers import describe_precision
    from efficient_arch.models.lm import count_params
    from _timing import time_train_step

    cfg = arch_config(name, smoke)
    dev = jax.devices()[0]
    peak, peak_src = _peak(cfg.model.dtype, cfg.model.quant, dev)
    mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
    x = np.random.default_rng(0).integers(0, cfg.model.vocab_size,
                                          (cfg.train.batch_size, cfg.model.seq_len + 1)).astype(np.int32)
    with jax.set_mesh(mesh):
        timed = time_train_step(train.build(cfg, mesh), x, warmup=warmup, runs=steps)
    step = timed["step_time_s"]
    ana = flops.analytic_flops(cfg)
    mem = hardware.memory_analysis_bytes(timed["compiled"])
    tokens = cfg.train.batch_size * cfg.model.seq_len
    return {
        "arch": name, "params": count_params(cfg.model), "precision": describe_precision(cfg.model, dev.platform),
        "seq_len": cfg.model.seq_len, "batch": cfg.train.batch_size, "tokens_per_step": tokens,
        "compile_s": timed["compile_s"], "step_times_s": timed["step_times_s"], "step_time_s": step,
        "tokens_per_s": tokens / step, "model_flops_per_step": ana["model_flops_per_step"],
        "hardware_flops_per_step": ana["hardware_flops_per_step"], "peak_flops_per_s": peak,
        "peak_source": peak_src, "mfu": ana["model_flops_per_step"] / step / peak if peak else None,
        "hfu": ana["hardware_flops_per_step"] / step / peak if peak else None, "remat": cfg.model.remat,
        "loss": float(timed["metrics"]["loss"]), "memory_bytes": mem,
        **_hlo_flags(timed["compiled"].as_text()),
    }


def _max_rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def run_checks(smoke: bool) -> dict:
    """Fast paths against the XLA path (see the module docstring); returns ``{name: record}``,
    each record with ``ok`` (True / False / None = skipped) and the measured errors."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from efficient_arch.models import layers

    out: dict = {}
    platform = jax.default_backend()
    b, t, n, kv, hd = (1, 64, 4, 2, 16) if smoke else (2, 2048, 16, 8, 128)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, n, hd)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, t, kv, hd)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, t, kv, hd)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((b, t, n, hd)), jnp.float32)
    seg = np.zeros((b, t), np.int32)
    seg[:, t // 3:] = 1
    masks = {"causal": None, "causal+segments": jnp.asarray(seg[:, None, :, None] == seg[:, None, None, :])}
    auto, why = layers.attention_implementation(platform=platform, dtype=jnp.bfloat16, head_dim=hd, seq_q=t,
                                                seq_k=t)
    for label, mask in masks.items():
        rec: dict = {"auto_choice": auto, "auto_reason": why}
        if platform not in ("gpu", "cuda"):
            rec.update(ok=None, skipped=f"platform {platform}: no cuDNN")
            out[f"attention cudnn vs xla ({label})"] = rec
            continue

        def loss(q, k, v, impl, mask=mask):
            o = layers.dot_product_attention(q, k, v, mask=mask, dtype=jnp.bfloat16, implementation=impl)
            return jnp.sum(o.astype(jnp.float32) * g), o

        try:
            res = {}
            for impl in ("xla", "cudnn"):
                f = jax.jit(jax.value_and_grad(lambda q, k, v, impl=impl: loss(q, k, v, impl), argnums=(0, 1, 2),
                                               has_aux=True))
                (_, o), grads = f(q, k, v)
                res[impl] = (o, grads)
                if impl == "cudnn":
                    rec.update(_hlo_flags(f.lower(q, k, v).compile().as_text()))
            errs = {"out": _max_rel(res["cudnn"][0], res["xla"][0])}
            errs.update({f"d{nm}": _max_rel(a, r) for nm, a, r in zip("qkv", res["cudnn"][1], res["xla"][1])})
            rec.update(errors=errs, ok=bool(max(errs.values()) <= 2e-2 and auto == "cudnn"))
        except Exception as e:  # noqa: BLE001  (reported, never hidden)
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:400])
        out[f"attention cudnn vs xla ({label})"] = rec

    m, d, f_ = (64, 64, 64) if smoke else (8192, 2048, 8192)
    x = jnp.asarray(rng.standard_normal((m, d)), jnp.bfloat16)
    w = jnp.asarray(0.02 * rng.standard_normal((d, f_)), jnp.float32)
    gy = jnp.asarray(rng.standard_normal((m, f_)), jnp.float32)
    rec = {}
    try:
        def mk(quant):
            def loss(x, w):
                y = layers.matmul("md,df->mf", x, w, jnp.bfloat16, quant=quant)
                return jnp.sum(y.astype(jnp.float32) * gy), y
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

        res, times = {}, {}
        for quant in ("none", "fp8"):
            fn = mk(quant)
            (_, y), grads = fn(x, w)
            jax.block_until_ready(grads)
            t0 = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(fn(x, w))
            times[quant] = (time.perf_counter() - t0) / 5
            res[quant] = (y, grads)
            if quant == "fp8":
                rec.update(_hlo_flags(fn.lower(x, w).compile().as_text()))
        errs = {"out": _max_rel(res["fp8"][0], res["none"][0]), "dx": _max_rel(res["fp8"][1][0], res["none"][1][0]),
                "dw": _max_rel(res["fp8"][1][1], res["none"][1][1])}
        rec.update(errors=errs, fwd_bwd_s={"bf16": times["none"], "fp8": times["fp8"]},
                   fp8_speedup=times["none"] / times["fp8"], ok=bool(max(errs.values()) <= 0.08 and min(errs.values()) > 0),
                   simulated=platform == "cpu")
    except Exception as e:  # noqa: BLE001
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:400])
    out[f"fp8 matmul vs bf16 ({m}x{d}x{f_})"] = rec
    return out


def _child(args, task: str) -> dict:
    if task == "checks":
        return {"checks": run_checks(args.smoke)}
    return run_arch(task, args.smoke, args.warmup, args.steps)


def _spawn(task: str, args, timeout: float) -> dict:
    """Run one task in a child process (isolated memory and timeout); returns its record."""
    cmd = [sys.executable, __file__, "--child", task, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--smoke"] if args.smoke else []
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (budget)", "wall_s": time.perf_counter() - t0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode or not lines:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-3:]
        return {"error": " | ".join(tail)[-600:] or f"exit {proc.returncode}", "wall_s": time.perf_counter() - t0}
    rec = json.loads(lines[-1][len("RESULT"):])
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def table(checks: dict, rows: list[dict]) -> str:
    """The printed summary: one line per check, then one table row per architecture."""
    lines = []
    for name, c in checks.items():
        state = {True: "ok", False: "FAIL", None: "skipped"}[c.get("ok")]
        extra = c.get("skipped") or c.get("error") or ", ".join(f"{k} {v:.2e}" for k, v in c.get("errors", {}).items())
        if "fp8_speedup" in c:
            extra += f"; fp8/bf16 speed {c['fp8_speedup']:.2f}x" + (" (simulated)" if c.get("simulated") else "")
        lines.append(f"check {state:7s} {name}: {extra}")
    head = "| arch | params (active) | precision | step s | tokens/s | MFU % | HFU % | peak | compile s | mem GiB |"
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | error: {r['error'][:160]} |" + " |" * 8)
            continue
        p = r["params"]
        mfu = f"{100 * r['mfu']:.1f}" if r["mfu"] is not None else "-"
        hfu = f"{100 * r['hfu']:.1f}" if r.get("hfu") is not None else "-"
        peak = f"{r['peak_flops_per_s']:.3g}" if r["peak_flops_per_s"] else "unknown"
        prec = "bf16 + FP8" if "FP8" in r["precision"] else "bf16"
        size = (lambda n: f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M")  # noqa: E731
        lines.append(f"| {r['arch']} | {size(p['n_params'])} ({size(p['n_active_params'])}) | {prec} | "
                     f"{r['step_time_s']:.3f} | {r['tokens_per_s']:,.0f} | {mfu} | {hfu} | {peak} | {r['compile_s']:.0f} | "
                     f"{r['memory_bytes'].get('total_bytes', 0) / 2**30:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, in-process: seconds on a CPU")
    ap.add_argument("--optimize", action="store_true", help="with --smoke: keep XLA optimizations on")
    ap.add_argument("--archs", default=",".join(ARCHS), help=f"comma list of {list(ARCHS)}")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=450.0, help="total seconds for checks + rows")
    ap.add_argument("--row-timeout-s", type=float, default=150.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT" + json.dumps(_child(args, args.child), default=str), flush=True)
        return 0
    names = args.archs.split(",")
    bad = [n for n in names if n not in ARCHS]
    if bad:
        ap.error(f"--archs: unknown {bad}; choose from {list(ARCHS)}")
    if args.smoke:
        args.warmup, args.steps = 1, 2
        if not args.optimize:  # XLA:CPU compiles dominate a smoke run: most optimizations off (~2x faster)
            import jax

            jax.config.update("jax_disable_most_optimizations", True)
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    if args.smoke:  # in-process: one jax import, seconds
        checks = run_checks(True)
        rows = []
        for n in names:
            try:
                rows.append(run_arch(n, True, args.warmup, args.steps))
            except Exception as e:  # noqa: BLE001
                rows.append({"arch": n, "error": f"{type(e).__name__}: {e}"[:400]})
    else:
        rec = _spawn("checks", args, min(240.0, max(left(), 1.0)))
        checks = rec.get("checks", {"checks": {"ok": False, "error": rec.get("error", "?")}})
        rows = []
        for n in names:  # in priority order; a row gets what is left, at most --row-timeout-s
            if left() < 45:
                rows.append({"arch": n, "error": f"skipped: {left():.0f} s of the budget left"})
                continue
            rows.append({"arch": n, **_spawn(n, args, min(args.row_timeout_s, left()))})
            print(f"  {n}: {rows[-1].get('step_time_s', rows[-1].get('error'))}", file=sys.stderr, flush=True)
    import jax

    from efficient_arch import hardware

    payload = {"date": datetime.date.today().isoformat(), "smoke": args.smoke, "backend": jax.default_backend(),
               "device_kind": jax.devices()[0].device_kind, "chip": hardware.chip_name(jax.devices()[0].device_kind),
               "jax": jax.__version__, "wall_s": time.perf_counter() - start, "checks": checks, "rows": rows}
    out = Path(args.out) if args.out else ROOT / "results" / f"gpu_{payload['date']}{'_smoke' if args.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str))
    print(f"{payload['device_kind']} ({payload['backend']}, jax {payload['jax']}), {payload['wall_s']:.0f} s")
    print(table(checks, rows))
    print(f"wrote {out}")
    failed = [k for k, c in checks.items() if c.get("ok") is False] + [r["arch"] for r in rows if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
