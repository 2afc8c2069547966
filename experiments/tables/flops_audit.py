"""FLOP audit of every experiment config: analytic model / hardware FLOPs vs XLA, with the
difference explained term by term.

    python experiments/tables/flops_audit.py [--size tiny] [--out results] [--configs a.py,b.py]

Writes ``results/flops_audit.md`` and ``results/flops_audit.csv`` and prints the table. For each
``experiments/configs/*.py`` at ``--size`` (default ``tiny``: the whole audit takes about a minute
on 2 CPU cores):

* ``analytic model`` / ``analytic hardware``: :func:`efficient_arch.flops.analytic_flops` per
  train step (model: the MFU numerator; hardware: as executed, attention full square);
* ``XLA``: :func:`efficient_arch.flops.xla_flops_per_step` (HLO cost analysis of unrolled
  lowerings, loops counted times their trip counts) and the ratio ``XLA / hardware``;
* the difference ``XLA - hardware`` split into terms (FLOPs, and % of analytic hardware):

  - ``optimizer``: XLA's count of the lowered optimizer update alone (global-norm clipping,
    AdamW, the schedule), costed separately;
  - ``matmuls - analytic``: ``dot_general`` FLOPs of the value-and-grad program minus the
    analytic hardware count (the analytic formulas also count a few elementwise terms: short
    convolutions ``2 W C``, recurrent state additions, vector-decay pairwise scores; those appear
    here as a negative and again in the elementwise terms below);
  - elementwise FLOPs of the value-and-grad program, attributed to the code that issued them
    (the innermost ``efficient_arch`` / optax frame of each jaxpr equation's source
    information, which forward and backward equations both carry): ``norms`` (RMSNorm, per-head
    norms, L2 normalisation), ``rope``, ``attention softmax/mask``, ``ffn activation`` (SwiGLU's
    SiLU and product), ``moe elementwise`` (router softmax / top-k, the experts' SwiGLU,
    combine), ``short conv``, ``recurrence elementwise``
    (``ops/``: decays, masks, cumulative sums, state updates), ``mixer elementwise`` (gates,
    feature maps, decay projections), ``cross-entropy`` (log-softmax over the vocabulary),
    ``residual/other``;
  - ``unattributed``: XLA's count minus this estimate (the estimator applies XLA's
    HloCostAnalysis rules per jaxpr primitive, calibrated on this backend: elementwise 1 FLOP per
    output element, transcendentals 0 FLOPs (XLA counts them apart), ``logistic`` 3, reductions
    ``in - out``, cumulative sums ``out (n - 1)``, dots ``2 out K``; it also absorbs the audit's
    loop-correction rounding).

The terms sum to ``XLA - hardware`` exactly. A config whose ratio lies outside ``[0.95, 1.05]``
gets a verdict naming its largest terms: the difference is explained, never tuned away.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import pathlib
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TOLERANCE = 0.05

TERMS = ["optimizer", "matmuls - analytic", "norms", "rope", "attention softmax/mask", "ffn activation",
         "moe elementwise", "short conv", "recurrence elementwise", "mixer elementwise", "cross-entropy",
         "residual/other", "unattributed"]

# jaxpr primitives XLA counts as transcendentals (0 FLOPs in "flops")
_TRANSCENDENTAL = {"exp", "exp2", "log", "log1p", "expm1", "tanh", "rsqrt", "sqrt", "cbrt", "sin", "cos",
                   "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "pow",
                   "erf", "erfc", "erf_inv", "lgamma", "digamma"}
# data movement and bookkeeping: 0 FLOPs
_FREE = {"broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
         "dynamic_update_slice", "concatenate", "pad", "gather", "iota", "copy", "copy_p", "rev",
         "stop_gradient", "sharding_constraint", "mesh_cast", "reduce_precision", "device_put",
         "random_bits", "random_seed", "random_wrap", "random_unwrap", "threefry2x32", "split", "full_like",
         "zeros_like", "optimization_barrier", "pvary", "convert_element_type_noop"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor",
           "argmax", "argmin"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}


def _size(aval) -> float:
    return float(np.prod(aval.shape)) if hasattr(aval, "shape") else 1.0


def eqn_flops(eqn) -> float:
    """FLOPs XLA's HloCostAnalysis assigns to one jaxpr equation (no sub-jaxprs).

    Rules measured on the lowered HLO of single ops on CPU (jax 0.10.2): ``dot_general``
    ``2 x out x contracted``; reductions ``in - out``; cumulative ops ``out x (n - 1)``
    (reduce-window lowering); ``logistic`` 3 per element; transcendentals 0 (counted apart);
    data movement 0; every other elementwise op (including converts, compares, selects) 1 per
    output element.
    """
    name = eqn.primitive.name
    out = sum(_size(v.aval) for v in eqn.outvars)
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        k = float(np.prod([eqn.invars[0].aval.shape[i] for i in lhs_contract]))
        return 2.0 * out * k
    if name in _FREE or name in _TRANSCENDENTAL:
        return 0.0
    if name in _REDUCE:
        return _size(eqn.invars[0].aval) - out
    if name in _CUMULATIVE:
        return out * (eqn.invars[0].aval.shape[eqn.params["axis"]] - 1)
    if name == "logistic":
        return 3.0 * out
    if any(hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns") for v in _param_values(eqn)):
        return 0.0  # a call / loop: its body is walked
    return out


def _param_values(eqn):
    for v in eqn.params.values():
        yield from (v if isinstance(v, (list, tuple)) else [v])


def _term(eqn) -> str | None:
    """The audit term of an equation from its innermost project / optax frame (None: no such
    frame, e.g. inside a jitted library function such as ``jax.nn.silu``, whose equations take
    the term of the call site)."""
    from jax._src import source_info_util

    in_swiglu = False  # layers.swiglu: the caller decides (MLP -> ffn activation, MoE experts -> moe)
    for frame in source_info_util.user_frames(eqn.source_info.traceback):
        path, fn = frame.file_name.replace(os.sep, "/"), frame.function_name
        if fn == "swiglu" and path.endswith("/models/layers.py"):
            in_swiglu = True
            continue
        if in_swiglu:
            return "moe elementwise" if path.endswith("/moe.py") else "ffn activation"
        if "/optax/" in path:
            return "cross-entropy"
        if "/efficient_arch/" not in path:
            continue
        base = path.rsplit("/", 1)[-1]
        low = fn.lower()
        if "norm" in low and "normalize" not in low or "l2_normalize" in low or "rms" in low:
            return "norms"
        if "rope" in low:
            return "rope"
        if base in ("attention.py", "sliding_window.py"):
            return "attention softmax/mask"
        if fn.startswith("MLP."):
            return "ffn activation"
        if base == "moe.py":
            return "moe elementwise"
        if base == "conv.py" or fn.startswith("ShortConv."):
            return "short conv"
        if "/ops/" in path:
            return "recurrence elementwise"
        if "/mixers/" in path:
            return "mixer elementwise"
        if base == "train.py" and "cross_entropy" in fn:
            return "cross-entropy"
        return "residual/other"
    return None


def estimate(jaxpr, mult: float = 1.0, out: dict | None = None, inherited: str | None = None) -> dict[str, float]:
    """Per-term FLOP estimate of a (closed) jaxpr: ``{"matmuls": ..., term: ...}``.

    Loops: a ``scan`` body counts ``length`` times, a ``cond`` its first branch, every other
    sub-jaxpr once (``while`` trip counts are unknown statically: the audit lowers without them).
    Equations without a project frame of their own take the term of the enclosing call
    (``inherited``), else ``residual/other``.
    """
    out = {} if out is None else out
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        subs = [v for v in _param_values(eqn) if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")]
        if subs:
            if eqn.primitive.name == "cond":
                subs = subs[:1]
            m = mult * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
            for s in subs:
                estimate(s, m, out, _term(eqn) or inherited)
            continue
        f = eqn_flops(eqn) * mult
        if f:
            key = "matmuls" if eqn.primitive.name == "dot_general" else (_term(eqn) or inherited or "residual/other")
            out[key] = out.get(key, 0.0) + f
    return out


def _unrolled(cfg):
    c = copy.deepcopy(cfg)
    c.unlock()
    c.model.scan_layers = False
    c.train.batch_size //= c.train.grad_accum
    c.train.grad_accum = 1
    c.lock()
    return c


def audit(path: str | os.PathLike, size: str) -> dict:
    """Audit one config file at ``size``; returns one table row (FLOPs per train step, global).

    Raises:
      ConfigError / ValueError: the config does not build at that size.
    """
    import jax

    from efficient_arch import flops as F
    from efficient_arch import parallel, train
    from efficient_arch.config import finalize, load_config
    from efficient_arch.ops import scan as scan_lib

    t0 = time.perf_counter()
    cfg = finalize(load_config(path, size), jax.device_count())
    mesh = parallel.make_mesh(cfg)
    ana = F.analytic_flops(cfg)
    hw = ana["hardware_flops_per_step"]
    with jax.set_mesh(mesh):
        xla = F.xla_flops_per_step(cfg, mesh)["xla_flops_per_step"]
        run = train.build(cfg, mesh)
        update = F.lowered_flops(run.update_step.lower(run.abstract_state, run.abstract_state["params"]))
        u = _unrolled(cfg)
        with scan_lib.unrolled():
            r = train.build(u, mesh)
            jaxpr = jax.make_jaxpr(r.loss_and_grad)(r.abstract_state["params"], r.abstract_batch())
    accum = cfg.train.grad_accum
    est = {k: accum * v for k, v in estimate(jaxpr).items()}
    terms = {t: 0.0 for t in TERMS}
    terms["optimizer"] = update
    terms["matmuls - analytic"] = est.pop("matmuls", 0.0) - hw
    for k, v in est.items():
        terms[k] += v
    terms["unattributed"] = (xla - hw) - sum(v for k, v in terms.items() if k != "unattributed")
    ratio = xla / hw
    row = {"config": pathlib.Path(path).name, "size": size,
           "mixers": "+".join(dict.fromkeys(cfg.model.layer_pattern or [cfg.model.mixer])),
           "tokens_per_step": cfg.train.batch_size * cfg.model.seq_len,
           "analytic_model": ana["model_flops_per_step"], "analytic_hardware": hw, "xla": xla,
           "xla_over_hardware": ratio, "within_5pct": abs(ratio - 1) <= TOLERANCE}
    row.update({f"{t} %": 100.0 * v / hw for t, v in terms.items()})
    top = sorted(((abs(v), t, v) for t, v in terms.items() if t != "unattributed"), reverse=True)[:3]
    why = ", ".join(f"{t} {100 * v / hw:+.1f}%" for _, t, v in top)
    row["verdict"] = "ok" if row["within_5pct"] else f"outside 5%: largest terms {why}"
    row["seconds"] = time.perf_counter() - t0
    return row


def write(rows: list[dict], out_dir: str) -> tuple[str, str]:
    """Write ``flops_audit.md`` and ``flops_audit.csv`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, md_path = os.path.join(out_dir, "flops_audit.csv"), os.path.join(out_dir, "flops_audit.md")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = ["config", "mixers", "analytic model", "analytic hardware", "XLA", "XLA / hw"] + TERMS + ["verdict"]
    lines = ["# FLOP audit: analytic vs XLA per train step (global)", "",
             f"Size `{rows[0]['size']}`; terms in % of analytic hardware FLOPs, summing to XLA / hw - 1 "
             "(`experiments/tables/flops_audit.py` explains each).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], r["mixers"], f"{r['analytic_model']:.4g}", f"{r['analytic_hardware']:.4g}",
                 f"{r['xla']:.4g}", f"{r['xla_over_hardware']:.4f}"]
        cells += [f"{r[t + ' %']:+.2f}" for t in TERMS] + [r["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md_path, csv_path


def print_table(rows: list[dict]) -> None:
    """Print the audit as a rich table (one row per config)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"FLOP audit per train step, size {rows[0]['size']} (terms: % of analytic hardware)")
    for col in ["config", "analytic model", "analytic hw", "XLA", "XLA/hw"] + TERMS + ["verdict"]:
        table.add_column(col, justify="left" if col in ("config", "verdict") else "right",
                         no_wrap=col == "config")
    for r in rows:
        table.add_row(r["config"], f"{r['analytic_model']:.4g}", f"{r['analytic_hardware']:.4g}", f"{r['xla']:.4g}",
                      f"{r['xla_over_hardware']:.4f}", *[f"{r[t + ' %']:+.2f}" for t in TERMS], r["verdict"])
    Console(width=max(Console().width, 260)).print(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="FLOP audit of every experiment config: analytic model / "
                                "hardware FLOPs vs XLA, with the difference explained term by term.")
    p.add_argument("--size", default="tiny", help="config size (default tiny)")
    p.add_argument("--out", default=str(REPO_ROOT / "results"), help="output folder")
    p.add_argument("--configs", default=None, help="comma-separated config file names (default: all)")
    args = p.parse_args(argv)
    folder = REPO_ROOT / "experiments" / "configs"
    names = args.configs.split(",") if args.configs else sorted(
        f.name for f in folder.glob("*.py") if not f.name.startswith("_"))
    rows = []
    for name in names:
        rows.append(audit(folder / name, args.size))
        print(f"{name}: XLA / hardware = {rows[-1]['xla_over_hardware']:.4f} ({rows[-1]['seconds']:.1f} s)",
              file=sys.stderr)
    print_table(rows)
    md, csv_path = write(rows, args.out)
    print(f"wrote {md} and {csv_path}")
    return 0 if all(r["within_5pct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
