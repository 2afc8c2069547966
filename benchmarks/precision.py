#!/usr/bin/env python
"""Precision policies side by side: float32 vs bf16 compute vs FP8 matmuls, loss curves and step time.

Trains one config (default ``experiments/configs/transformer.py:small`` on the default corpus, the
Python standard-library sources) for ``--steps`` steps in each policy with the same seed, data
order and hyperparameters, through the normal training loop (``train.run_training`` in a temporary
workdir), and reports per policy: train loss at four points of the curve, final validation loss
and bits per byte, the difference in validation loss to float32, the median step time of the
training run, the median step time measured with the policies *alternating* (all three train
steps compiled, then ``--timing-rounds`` rounds of ``--timing-steps`` steps each: a change of
machine load between the sequential training runs does not skew the ratio), its ratio to float32,
and MFU (against the peak the run itself reports: on CPU the measured matmul calibration of the
compute dtype). ``--seed`` changes ``train.seed`` (init and data order) of every run: a second
seed shows how large loss differences between runs of the *same* policy are.

Policies (``model.dtype`` / ``model.quant``; parameters and optimizer state float32 in all):

    f32   float32 compute
    bf16  bfloat16 compute, float32 accumulation (forward and backward matmuls)
    fp8   bfloat16 compute, projection / MLP matmuls in FP8 (qwix quantized training: E4M3
          operands forward, E5M2 gradients backward, absmax scaling per channel); attention
          products and the LM head stay bfloat16

On a CPU there is no FP8 matmul hardware: XLA converts the FP8 operands to float32 and multiplies
those, so the fp8 row has FP8's *numerics* (fake quantization) but not its speed -- its step time
includes the quantization work (absmax reductions, scaling, rounding) on top of float32 dots, and
says nothing about FP8 speed on an H100/H200.

Usage::

    python benchmarks/precision.py [--config FILE:SIZE] [--steps 100] [--policies f32,bf16,fp8]
                                   [--seed 0] [--timing-rounds 3] [--timing-steps 3] [--out PATH]

Default run (transformer.py:small, 100 steps x 3 policies + alternating timing): about 8 minutes
on 2 CPU cores shared with other jobs (load average ~5).
Prints one table; writes ``benchmarks/results/precision_<date>.json`` (full loss curves, validation
rows and each run's summary).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
POLICIES = {  # name: (model.dtype, model.quant)
    "f32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "fp8": ("bfloat16", "fp8"),
}
SHORT = {"f32": "f32 compute", "bf16": "bf16 compute", "fp8": "bf16 + FP8 E4M3/E5M2 matmuls"}


class _Stderr:
    """A console for run_training whose progress lines go to stderr (stdout keeps the table)."""

    def print(self, *args, **kwargs):
        print(*args, file=sys.stderr, flush=True)


def policy_config(config: str, name: str, steps: int, seed: int):
    """The unfinalized config ``FILE:SIZE`` in policy ``name`` for ``steps`` steps, ``train.seed``."""
    from efficient_arch.config import load_config

    path, _, size = config.partition(":")
    c = load_config(REPO / path if not os.path.isabs(path) else path, size or None)
    c.unlock()
    c.model.dtype, c.model.quant = POLICIES[name]
    c.train.steps, c.train.seed = steps, seed
    return c


def run_policy(config: str, name: str, steps: int, seed: int = 0) -> dict:
    """Train ``config`` (``FILE:SIZE``) for ``steps`` steps in policy ``name``; returns the run's
    summary, its train-loss curve ``[(step, loss), ...]`` and validation rows."""
    from efficient_arch.train import run_training

    c = policy_config(config, name, steps, seed)
    c.train.log_every = max(steps // 25, 1)
    c.train.eval_every = max(steps // 4, 1)
    c.train.ckpt_every = steps  # one save at the end: timing rows stay clean
    c.lock()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as wd:
        summary = run_training(c, wd, progress=False, console=_Stderr())
        rows = [json.loads(ln) for ln in open(os.path.join(wd, "metrics.jsonl"))]
    curve = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return {"policy": name, "dtype": c.model.dtype, "quant": c.model.quant, "summary": summary,
            "train_loss": curve, "val_loss": val, "wall_s": time.perf_counter() - t0}


def interleaved_step_times(config: str, names: list[str], rounds: int, steps: int) -> dict:
    """Median step time per policy, measured in alternation (``rounds`` x every policy x ``steps``
    steps, after compiling all and one warm-up step each) so that a change in machine load between
    the sequential training runs does not skew the ratio. Returns ``{name: {"median_s", "times_s"}}``."""
    import statistics

    import jax
    import numpy as np

    from efficient_arch import parallel, train
    from efficient_arch.config import finalize

    built = {}
    for n in names:
        cfg = finalize(policy_config(config, n, 10, 0), 1)
        mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
        x = np.random.default_rng(0).integers(0, 256, (cfg.train.batch_size, cfg.model.seq_len + 1)).astype(np.int32)
        with jax.set_mesh(mesh):
            run = train.build(cfg, mesh)
            step = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile()
            state = run.init_state()
            batch = parallel.global_batch({"inputs": x[:, :-1], "targets": x[:, 1:]}, mesh, cfg.train.batch_size)
            state, m = step(state, batch)
            jax.block_until_ready(m)
        built[n] = [mesh, step, state, batch, []]
    for _ in range(rounds):
        for n in names:
            mesh, step, state, batch, times = built[n]
            with jax.set_mesh(mesh):
                for _ in range(steps):
                    t0 = time.perf_counter()
                    state, m = step(state, batch)
                    jax.block_until_ready(m)
                    times.append(time.perf_counter() - t0)
            built[n][2] = state
    return {n: {"median_s": statistics.median(b[4]), "times_s": b[4]} for n, b in built.items()}


def _loss_at(curve: list, step: int) -> float:
    """Train loss of the logged step nearest to ``step``."""
    return min(curve, key=lambda sl: abs(sl[0] - step))[1]


def table(rows: list[dict], steps: int, timing: dict) -> str:
    """The one printed table (Markdown)."""
    marks = [max(steps // 4, 1), steps // 2, 3 * steps // 4, steps]
    ref = next((r for r in rows if r["policy"] == "f32"), None)
    head = ("| policy | precision | " + " | ".join(f"loss @{m}" for m in marks)
            + " | val loss | val bpb | d val vs f32 | step s (run) | step s (alternating) | x f32 | MFU % | peak |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s = r["summary"]
        d_val = (f"{s['final_val_loss'] - ref['summary']['final_val_loss']:+.4f}" if ref and r is not ref else "-")
        alt = timing.get(r["policy"], {}).get("median_s")
        ratio = (f"{alt / timing['f32']['median_s']:.2f}" if alt and "f32" in timing
                 else f"{s['step_time_s'] / ref['summary']['step_time_s']:.2f}" if ref else "-")
        peak = s["peak_flops_source"]
        peak = ("FP8 simulated: " if peak.startswith("FP8 simulated") else "") + (
            "measured bf16" if "bfloat16" in peak else "measured f32" if "float32" in peak else peak[:30])
        lines.append(f"| {r['policy']} | {SHORT.get(r['policy'], r['dtype'])} | "
                     + " | ".join(f"{_loss_at(r['train_loss'], m):.4f}" for m in marks)
                     + f" | {s['final_val_loss']:.4f} | {s['val_bpb']:.3f} | {d_val} | {s['step_time_s']:.3f} | "
                     f"{alt if alt is None else f'{alt:.3f}'} | {ratio} | {100 * s['mfu']:.1f} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="experiments/configs/transformer.py:small", help="FILE:SIZE")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--policies", default="f32,bf16,fp8", help=f"comma list of {sorted(POLICIES)}")
    ap.add_argument("--seed", type=int, default=0, help="train.seed of every run (init and data order)")
    ap.add_argument("--timing-rounds", type=int, default=3, help="alternating timing rounds (0: skip)")
    ap.add_argument("--timing-steps", type=int, default=3, help="steps per policy per round")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/precision_<date>.json)")
    args = ap.parse_args(argv)
    names = args.policies.split(",")
    bad = [n for n in names if n not in POLICIES]
    if bad:
        ap.error(f"--policies: unknown {bad}; choose from {sorted(POLICIES)}")
    if args.steps < 4:
        ap.error("--steps must be >= 4 (the table reads the curve at 4 points)")
    import jax

    rows = []
    for name in names:
        rows.append(run_policy(args.config, name, args.steps, args.seed))
        s = rows[-1]["summary"]
        print(f"  {name}: val loss {s['final_val_loss']:.4f}, {s['step_time_s']:.3f} s/step, "
              f"{rows[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    timing = interleaved_step_times(args.config, names, args.timing_rounds, args.timing_steps) if args.timing_rounds else {}
    payload = {"date": datetime.date.today().isoformat(), "config": args.config, "steps": args.steps, "seed": args.seed,
               "timing_alternating": timing,
               "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
               "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "load_avg_end": os.getloadavg(),
               "note": ("FP8 on CPU is simulated (fake-quantized): FP8 numerics, float32 dots"
                        if jax.default_backend() == "cpu" else ""),
               "rows": rows}
    out = Path(args.out) if args.out else ROOT / "results" / (
        f"precision_{payload['date']}" + (f"_seed{args.seed}" if args.seed else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str))
    print(table(rows, args.steps, timing))
    if payload["note"]:
        print(f"\n{payload['note']}; step times under load average {payload['load_avg_end'][0]:.1f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
