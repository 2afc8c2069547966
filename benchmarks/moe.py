#!/usr/bin/env python
"""MoE benchmark: the whole train step of dense vs MoE models at equal *active* parameters.

Rows (all from experiments/configs at one size, default ``small``: d_model 192, 4 layers,
seq_len 128, batch 16 = 2,048 tokens/step):

    transformer              dense SwiGLU MLP (d_ff)
    moe capacity             8 experts, top-2, d_ff/2 each, capacity factor 1.25
    moe dropless             the same with sorted tokens + jax.lax.ragged_dot
    deepseek_v3_style        32 fine-grained experts, top-3 + 1 shared, sigmoid, bias balancing
    llama4_style             16 experts, top-1 + 1 shared, MoE every other layer

What is measured per row: the jitted ``train_step`` (forward, backward, AdamW, bias update) on a
fixed batch, one warm-up call excluded, median of ``--runs`` calls; tokens/s; MFU = analytic
*model* FLOPs (active experts only) / step time / (devices x peak); HFU = analytic *executed*
FLOPs (capacity slots incl. padding; dense ragged dot on CPU) / the same; compile time; compiled
memory per device (arguments + outputs + temporaries - donated aliases) and this process's peak
RSS; the drop fraction of the last step. The float32 peak is calibrated first in the same process
(``hardware.peak_flops_per_device("float32")``: on CPU a calibrated matmul, best of this
process and the machine's cache, divided by the number of fake devices).

``--devices 8`` runs the same rows on 8 fake CPU devices (a child process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) on a ``data 1 x expert 8`` mesh for the
MoE rows (expert parallelism: GSPMD reshuffles tokens to their experts) and ``data 8`` for the
dense row. On a 2-core CPU the fake devices share two cores, so 8-device numbers measure the
partitioned program's overhead, not a speed-up.

Usage::

    python benchmarks/moe.py [--size small] [--devices 1,8] [--runs 5] [--quick]

Writes ``benchmarks/results/moe_<date>[_quick].json`` and prints one table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
ROWS = [
    ("transformer", "transformer.py", {}),
    ("moe capacity", "moe.py", {}),
    ("moe dropless", "moe.py", {"dispatch": "dropless"}),
    ("deepseek_v3_style", "deepseek_v3_style.py", {}),
    ("llama4_style", "llama4_style.py", {}),
]


def run_rows(size: str, n_devices: int, runs: int) -> dict:
    """Time every row on ``n_devices`` devices of this process; returns the JSON payload."""
    import jax
    import numpy as np

    from efficient_arch import flops, hardware, parallel, train
    from efficient_arch.config import finalize, load_config
    from efficient_arch.models.lm import count_params
    from _timing import time_train_step

    # on CPU: calibrated in this process (best-of with the machine's cache), divided over fake devices
    peak, peak_src = hardware.peak_flops_per_device("float32")
    out = {"n_devices": n_devices, "peak_flops_per_device": peak, "peak_source": peak_src, "rows": []}
    for label, file, moe_over in ROWS:
        c = load_config(REPO / "experiments/configs" / file, size)
        c.unlock()
        for k, v in moe_over.items():
            c.model.moe[k] = v
        if n_devices > 1:
            c.mesh.data, c.mesh.expert = (1, n_devices) if c.model.ffn == "moe" else (n_devices, 1)
        c.lock()
        cfg = finalize(c, n_devices)
        mesh = parallel.make_mesh(cfg, devices=jax.devices()[:n_devices])
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (cfg.train.batch_size, cfg.model.seq_len + 1)).astype(np.int32)
        with jax.set_mesh(mesh):
            timed = time_train_step(train.build(cfg, mesh), x, warmup=1, runs=runs)
        compiled, compile_s, times, m = (timed[k] for k in ("compiled", "compile_s", "step_times_s", "metrics"))
        step = timed["step_time_s"]
        ana = flops.analytic_flops(cfg)
        counts = count_params(cfg.model)
        tokens = cfg.train.batch_size * cfg.model.seq_len
        mem = hardware.memory_analysis_bytes(compiled)
        out["rows"].append({
            "row": label, "config": f"{file}:{size}", "dispatch": cfg.model.moe.dispatch if cfg.model.ffn == "moe" else None,
            "mesh": dict(cfg.mesh), "n_params": counts["n_params"], "n_active_params": counts["n_active_params"],
            "tokens_per_step": tokens, "step_time_s": step, "step_times_s": times, "tokens_per_s": tokens / step,
            "model_flops_per_step": ana["model_flops_per_step"], "hardware_flops_per_step": ana["hardware_flops_per_step"],
            "mfu": ana["model_flops_per_step"] / step / (n_devices * peak),
            "hfu": ana["hardware_flops_per_step"] / step / (n_devices * peak),
            "compile_s": compile_s, "compiled_bytes_per_device": mem.get("total_bytes"),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "drop_fraction": float(m["moe_drop_fraction"]) if "moe_drop_fraction" in m else None,
            "final_loss": float(m["loss"]),
        })
        print(f"  {n_devices} dev  {label:18s} {step:.3f} s/step", file=sys.stderr, flush=True)
    return out


def table(results: list[dict]) -> str:
    head = ("| devices | row | dispatch | params (M) | active (M) | step s | tokens/s | MFU % | HFU % | "
            "mem/dev MiB | drop % | compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for res in results:
        for r in res["rows"]:
            mem = r["compiled_bytes_per_device"]
            drop = "-" if r["drop_fraction"] is None else f"{100 * r['drop_fraction']:.1f}"
            lines.append(
                f"| {res['n_devices']} | {r['row']} | {r['dispatch'] or '-'} | {r['n_params'] / 1e6:.2f} | "
                f"{r['n_active_params'] / 1e6:.2f} | {r['step_time_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                f"{100 * r['mfu']:.1f} | {100 * r['hfu']:.1f} | {'-' if mem is None else f'{mem / 2**20:.0f}'} | "
                f"{drop} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--devices", default="1,8", help="comma list of device counts (1 and/or 8)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny size, 2 runs: a smoke test")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.runs = "tiny", 2
    if args.child:
        print("RESULT" + json.dumps(run_rows(args.size, args.child, args.runs)))
        return 0
    results = []
    for n in [int(v) for v in args.devices.split(",")]:
        if n == 1:
            results.append(run_rows(args.size, 1, args.runs))
            continue
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                         f"--xla_force_host_platform_device_count={n}".strip())
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--size", args.size,
                               "--runs", str(args.runs)], env=env, capture_output=True, text=True, cwd=REPO)
        sys.stderr.write(proc.stderr[-3000:] if proc.returncode else "")
        if proc.returncode:
            raise SystemExit(f"{n}-device child failed (exit {proc.returncode})")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
        results.append(json.loads(line[len("RESULT"):]))
    payload = {"date": datetime.date.today().isoformat(), "size": args.size, "runs": args.runs,
               "load_avg_end": os.getloadavg(), "results": results}
    out = ROOT / "results" / f"moe_{payload['date']}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(table(results))
    print(f"\nwrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
