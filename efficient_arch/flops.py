"""FLOP accounting: analytic model/hardware FLOPs and the XLA cost-analysis audit.

Two independent sources that must agree:

* **Analytic** (:func:`analytic_flops`): per token, each layer's mixer and FFN report their own
  forward FLOPs (``flops_per_token`` beside their code), plus the LM head ``2 V d``; embedding
  lookups cost 0; tied weights change nothing. Training = forward + backward = 3 x forward.
  *Model* FLOPs (MFU numerator) count no recomputation and the attention term by the configured
  convention (``causal``: mean visible keys (T+1)/2, the default; ``full``: T, PaLM App. B).
  *Hardware* FLOPs (HFU) add remat recomputation and count attention as executed (full square:
  the XLA form computes masked scores too).
* **XLA** (:func:`xla_flops_per_step`): the lowered train step's HLO cost analysis (global, all
  devices). XLA counts a ``while``/``scan`` body once, so the scanned layer loop and the
  gradient-accumulation loop are corrected by trip count: the per-group and per-microbatch costs
  are measured on small *unrolled* lowerings of the same step (1 and 2 layer groups) and scaled
  (see the function's docstring for the algebra).
"""

from __future__ import annotations

import copy

from efficient_arch.models import registry
from efficient_arch.models.lm import layer_pattern


def forward_flops_per_token(mcfg, seq_len: int | None = None, *, attention: str = "causal") -> dict[str, float]:
    """Analytic forward FLOPs per token by term for a finalized ``config.model``.

    Returns:
      dict with ``mixers`` (all layers), ``ffn`` (all layers), ``lm_head`` (2 V d) and ``total``,
      in FLOPs per token (one multiply-add = 2 FLOPs).
    """
    seq_len = seq_len or mcfg.seq_len
    pattern = layer_pattern(mcfg)
    reps = mcfg.n_layers // len(pattern)
    mixers = reps * sum(registry.get_mixer(n).flops_per_token(mcfg, seq_len, attention=attention)
                        for n in pattern)
    ffn = mcfg.n_layers * registry.get_ffn(mcfg.ffn).flops_per_token(mcfg, seq_len, attention=attention)
    head = 2.0 * mcfg.vocab_size * mcfg.d_model
    return {"mixers": mixers, "ffn": ffn, "lm_head": head, "total": mixers + ffn + head}


def analytic_flops(cfg) -> dict[str, float | str]:
    """Training FLOPs per step (global, all devices) for a finalized config.

    Returns:
      ``model_flops_per_step``: 3 x forward x tokens, attention by ``cfg.flops.attention``;
      ``hardware_flops_per_step``: plus remat recompute (``full``: one extra forward of the layer
      stack; ``dots``: matmul outputs are saved, so no extra matmul FLOPs) with attention counted
      as executed (full square); ``model_flops_per_token_fwd``; ``attention_convention``; and
      ``model_flops_per_step_full`` (full-square convention) for comparison with XLA.
    """
    m = cfg.model
    tokens = cfg.train.batch_size * m.seq_len
    fwd = forward_flops_per_token(m, attention=cfg.flops.attention)
    fwd_full = forward_flops_per_token(m, attention="full")
    recompute = fwd_full["mixers"] + fwd_full["ffn"] if m.remat == "full" else 0.0
    return {
        "model_flops_per_token_fwd": fwd["total"],
        "model_flops_per_step": 3.0 * fwd["total"] * tokens,
        "model_flops_per_step_full": 3.0 * fwd_full["total"] * tokens,
        "hardware_flops_per_step": (3.0 * fwd_full["total"] + recompute) * tokens,
        "attention_convention": cfg.flops.attention,
    }


def _variant(cfg, **model):
    c = copy.deepcopy(cfg)
    c.unlock()
    for k, v in model.items():
        if k in ("batch_size", "grad_accum"):
            c.train[k] = v
        else:
            c.model[k] = v
    c.lock()
    return c


def lowered_flops(lowered) -> float:
    """Global FLOPs of a ``jax.stages.Lowered`` from XLA's HLO cost analysis (raises if absent)."""
    from efficient_arch.hardware import normalize_cost_analysis

    ca = normalize_cost_analysis(lowered.cost_analysis())
    if "flops" not in ca:
        raise RuntimeError("XLA cost analysis returned no 'flops' entry for this backend")
    return float(ca["flops"])


def xla_flops_per_step(cfg, mesh, lowered_step=None) -> dict[str, float | str]:
    """XLA's FLOPs for one train step (global), corrected for loops XLA counts once.

    With ``L`` layer groups scanned and ``A`` microbatches accumulated in a scan, the cost
    analysis of the step ``S`` counts one group and one microbatch. Let ``G(k)`` be the cost of
    value-and-grad of the loss on one microbatch with ``k`` *unrolled* groups. Then one group
    costs ``f = G(2) - G(1)`` and the rest of a microbatch ``o = G(1) - f``, and::

        corrected = S + (L - 1) f            [scan over layers]
                      + (A - 1) (o + L f)    [scan over microbatches]

    (the second term only if ``A > 1``; the first only if layers are scanned). The optimizer
    update is outside both loops and is counted once, as executed.

    Returns:
      dict with ``xla_flops_per_step`` (corrected), ``xla_flops_raw`` (``S``), ``correction``
      (a sentence naming the method).
    """
    from efficient_arch import train

    L = cfg.model.n_layers // len(layer_pattern(cfg.model))
    A = cfg.train.grad_accum
    if lowered_step is None:
        run = train.build(cfg, mesh)
        lowered_step = run.train_step.lower(run.abstract_state, run.abstract_batch())
    raw = lowered_flops(lowered_step)
    scanned = cfg.model.scan_layers and L > 1
    if not scanned and A == 1:
        return {"xla_flops_per_step": raw, "xla_flops_raw": raw, "correction": "none (no loops)"}
    g = []
    plen = len(layer_pattern(cfg.model))
    micro = cfg.train.batch_size // A
    for k in (1, 2):
        v = _variant(cfg, n_layers=k * plen, scan_layers=False, batch_size=micro, grad_accum=1)
        r = train.build(v, mesh)
        g.append(lowered_flops(r.loss_and_grad.lower(r.abstract_state["params"], r.abstract_batch())))
    f = g[1] - g[0]
    o = g[0] - f
    total = raw + (L - 1) * f * (1 if scanned else 0) + (A - 1) * (o + L * f)
    return {"xla_flops_per_step": total, "xla_flops_raw": raw,
            "correction": "scan bodies x trip count; per-group and per-microbatch costs from unrolled "
                          "1- and 2-group lowerings"}


def palm_training_flops_per_token(n_params: float, n_layers: int, n_heads: int, head_dim: int,
                                  seq_len: int, *, attention: bool = True) -> float:
    """Training FLOPs per token in the PaLM convention (Chowdhery et al. 2022, App. B).

    ``6 N + 12 L H Q T``: 6N for the parameter matmuls (forward 2N, backward 4N) and, with
    ``attention``, both attention matmuls over the full ``T x T`` square (not halved for causal
    masking). Embedding parameters are included in N, as PaLM does.
    """
    flops = 6.0 * n_params
    if attention:
        flops += 12.0 * n_layers * n_heads * head_dim * seq_len
    return flops
