"""Cost and quality of every architecture config at one size and an equal token budget.

    efficient-arch table mfu_by_arch [--quick] [--workdir DIR]

One training run per ``experiments/configs/*.py`` file at size ``tiny`` (d_model 64, 2 layers;
each family's own mixer settings; the MoE configs at the transformer's *active* parameters) on
the default corpus (the running Python's standard-library sources, bytes), all with the same
sequence length, batch and steps, so every row sees the same tokens. Columns:

* ``params`` / ``active params``: :func:`efficient_arch.models.lm.count_params` (active: an MoE
  layer's unchosen experts excluded);
* ``train FLOPs/token``: analytic *model* FLOPs of one train step (forward + backward, attention
  counted causally, no remat) per token: the MFU numerator;
* ``tokens/s``, ``MFU %``, ``HFU %``: median step time after warm-up against the CPU's measured
  matmul peak (``summary.json``; HFU counts the executed FLOPs, recompute included);
* ``memory MiB``: XLA's compiled memory of the train step per device (arguments + outputs +
  temporaries - donated buffers);
* ``train loss`` / ``val loss`` / ``val bpb``: at the last step (validation on held-out files).

``full``: 13 runs, 4-8 minutes on the shared 2-core CPU (237 s of training at load 1.3-4.0).
``--quick`` (the tests): two configs, 3 steps of 4 x 32 tokens.
"""

from __future__ import annotations

import os

TITLE = "Params, FLOPs, throughput, MFU, memory and loss by architecture (equal token budget)"
SIZES = ("quick", "full")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "experiments", "configs")
QUICK_CONFIGS = ("transformer.py", "gated_deltanet.py")
# size -> (config size, seq_len, batch, steps, eval batches)
SETTINGS = {"quick": ("tiny", 32, 4, 3, 1), "full": ("tiny", 128, 16, 150, 8)}


def configs(size: str) -> list[str]:
    """The config files of the table at ``size`` (every ``experiments/configs/*.py`` for ``full``)."""
    files = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
    return [f for f in files if f in QUICK_CONFIGS] if size == "quick" else files


def sweep(size: str) -> dict:
    """One point per config file, identical data, sequence length, batch and steps."""
    cfg_size, seq, batch, steps, evb = SETTINGS[size]
    return {
        "base": f"experiments/configs/transformer.py:{cfg_size}",
        "overrides": {
            "data.source": "stdlib", "model.seq_len": seq, "train.batch_size": batch, "train.steps": steps,
            "train.warmup_steps": max(steps // 20, 1), "train.lr": 3e-3, "train.log_every": max(steps // 10, 1),
            "train.eval_every": steps, "train.eval_batches": evb, "train.ckpt_every": steps,
        },
        "points": [{"config": f"experiments/configs/{f}:{cfg_size}"} for f in configs(size)],
    }


def _mib(summary: dict):
    mem = summary.get("compiled_memory_bytes") or {}
    total = mem.get("total_bytes")
    return None if total is None else total / 2**20


def rows(ctx) -> list[dict]:
    """One row per config: the columns of the module docstring."""
    out = []
    for r in ctx.results:
        s = ctx.summary(r)
        cfg = ctx.config(r)
        tok = s.get("tokens_per_step")
        out.append({
            "config": os.path.basename(r["config"].split(":")[0]),
            "mixer": "+".join(cfg.model.layer_pattern) if cfg.model.layer_pattern else cfg.model.mixer,
            "ffn": cfg.model.ffn,
            "status": r["status"],
            "params": s.get("n_params"),
            "active params": s.get("n_active_params"),
            "train FLOPs/token": s["model_flops_per_step"] / tok if s and tok else None,
            "tokens/s": s.get("tokens_per_s"),
            "MFU %": 100 * s["mfu"] if s.get("mfu") is not None else None,
            "HFU %": 100 * s["hfu"] if s.get("hfu") is not None else None,
            "memory MiB": _mib(s),
            "train loss": s.get("final_train_loss"),
            "val loss": s.get("final_val_loss"),
            "val bpb": s.get("val_bpb"),
        })
    return out


def plot(rows, fig, ctx):
    """Left: tokens/s and MFU per config; right: validation bpb against train FLOPs/token."""
    ok = [r for r in rows if r["status"] == "ok"]
    names = [r["config"].removesuffix(".py") for r in ok]
    ax1 = fig.add_subplot(1, 2, 1)
    ax1.barh(range(len(ok)), [r["MFU %"] for r in ok], color="tab:blue")
    ax1.set_yticks(range(len(ok)), names, fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlabel("MFU % (CPU)")
    for i, r in enumerate(ok):
        ax1.text(r["MFU %"], i, f" {r['tokens/s']:,.0f} tok/s", va="center", fontsize=6)
    ax2 = fig.add_subplot(1, 2, 2)
    for r, n in zip(ok, names):
        ax2.scatter(r["train FLOPs/token"], r["val bpb"], s=14)
        ax2.annotate(n, (r["train FLOPs/token"], r["val bpb"]), fontsize=6)
    ax2.set_xlabel("train model FLOPs / token")
    ax2.set_ylabel("validation bits/byte")
    fig.set_size_inches(10, 4.5)


def notes(rows, ctx) -> str:
    """What the table is compared with (nothing published is measured on a CPU at this size)."""
    ok = [r for r in rows if r["status"] == "ok" and r["val bpb"] is not None]
    lines = []
    if ok:
        best = min(ok, key=lambda r: r["val bpb"])
        fast = max(ok, key=lambda r: r["tokens/s"])
        hi = max(ok, key=lambda r: r["MFU %"])
        lines.append(f"Lowest validation bpb: `{best['config']}` ({best['val bpb']:.3f}); fastest: "
                     f"`{fast['config']}` ({fast['tokens/s']:,.0f} tokens/s); highest MFU: `{hi['config']}` "
                     f"({hi['MFU %']:.1f}%).")
    lines.append(
        "No published figure is measured at this size or on a CPU, so nothing here reproduces a paper "
        "number. For scale: published large-scale training MFU is 38-46% for dense transformers on "
        "accelerators (PaLM Table 3: 46.2%; Llama 3 Table 4: 38-43%; `results/public_mfu.md`). At "
        "d_model 64 on a CPU the matmuls are too small to approach the calibrated matmul peak, and the "
        "recurrent mixers' chunked scans and elementwise work weigh more than at the papers' widths; "
        "the sequence is short (128), where no efficient mixer is expected to beat attention's speed. "
        "The equal-token losses rank the architectures only at this tiny budget.")
    return "\n\n".join(lines)
