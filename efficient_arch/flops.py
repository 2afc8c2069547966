"""FLOP accounting: analytic model/hardware FLOPs and the XLA cost-analysis audit.

Two independent sources that must agree:

* **Analytic** (:func:`analytic_flops`): per token, each layer's mixer and FFN report their own
  forward FLOPs (``flops_per_token`` beside their code), plus the LM head ``2 V d``; embedding
  lookups cost 0; tied weights change nothing. Training = forward + backward = 3 x forward.
  *Model* FLOPs (MFU numerator) count no recomputation and the attention term by the configured
  convention (``causal``: mean visible keys (T+1)/2, the default; ``full``: T, PaLM App. B).
  *Hardware* FLOPs (HFU) add remat recomputation and count attention as executed
  (``attention="executed"``: the XLA form scores whole query blocks against the keys up to each
  block's end, masked entries included; ``ops.attention.key_ranges``).
* **XLA** (:func:`xla_flops_per_step`): HLO cost analysis of lowerings of the train step (global,
  all devices). XLA counts a ``while``/``scan`` body once, so the audit costs small *unrolled*
  lowerings (1 and 2 layer groups, one microbatch, every ``ops.scan`` loop unrolled) and scales
  them by the trip counts (see the function's docstring for the algebra).
"""

from __future__ import annotations

import copy

from efficient_arch.models import registry
from efficient_arch.models.lm import group_blocks, layer_kinds, n_prefix_layers


def forward_flops_per_token(mcfg, seq_len: int | None = None, *, attention: str = "causal",
                            executed: bool = False, platform: str | None = None) -> dict[str, float]:
    """Analytic forward FLOPs per token by term for a finalized ``config.model``.

    ``executed=True`` counts what the program runs (attention's scored query/key blocks, MoE capacity
    slots or dense ragged dots) instead of the model FLOPs; ``platform`` ("cpu" | "gpu" | "tpu",
    None = the running JAX backend) is where it would run (the MoE's ``ragged_dot`` is dense on
    CPU only).

    Returns:
      dict with ``mixers`` (all layers), ``ffn`` (all layers), ``lm_head`` (2 V d) and ``total``,
      in FLOPs per token (one multiply-add = 2 FLOPs).
    """
    seq_len = seq_len or mcfg.seq_len
    att = "executed" if executed else attention
    mixers = ffn = 0.0
    for mixer, ffn_name in layer_kinds(mcfg):
        mixers += registry.get_mixer(mixer).flops_per_token(mcfg, seq_len, attention=att)
        ffn += registry.get_ffn(ffn_name).flops_per_token(mcfg, seq_len, attention=att, executed=executed,
                                                          platform=platform)
    head = 2.0 * mcfg.vocab_size * mcfg.d_model
    return {"mixers": mixers, "ffn": ffn, "lm_head": head, "total": mixers + ffn + head}


def _weight_matmul_flops_per_token(mcfg, mixer: str) -> float:
    """``2 x`` the mixer's matrix parameters (>= 2-D, conv taps excluded): the FLOPs per token of
    its weight matmuls, which are dots without batch dimensions (saved by remat ``dots``)."""
    import jax
    from flax import nnx

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: registry.get_mixer(mixer)(mcfg, rngs=nnx.Rngs(0)))
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))[0]
    return 2.0 * sum(v.size for path, v in flat
                     if len(v.shape) >= 2 and "conv" not in jax.tree_util.keystr(path))


def remat_recompute_flops_per_token(mcfg, seq_len: int | None = None, *, platform: str | None = None) -> float:
    """Forward FLOPs per token that the backward pass executes again under ``model.remat``.

    * ``none``: 0.
    * ``full`` (``nothing_saveable`` around each layer group): one executed forward of the layer
      stack, minus each group's *tail*: the last block's FFN output matmul (``w_down``; MoE: the
      shared experts' ``w_down``), whose output the backward never needs, so XLA drops it.
    * ``dots`` (``dots_with_no_batch_dims_saveable``): weight matmuls are saved, so what runs
      again is every dot *with* batch dimensions: each mixer's executed FLOPs minus its weight
      matmuls (attention scores and values, chunked-recurrence matmuls), and the MoE's routed
      expert matmuls (batched over experts; ``ragged_dot`` is not a ``dot_general`` at all).

    Per-mixer weight matmuls inside a per-head einsum (a batch dimension) are recomputed by XLA
    but counted here as saved; the audit shows where that matters.
    """
    seq_len = seq_len or mcfg.seq_len
    if mcfg.remat == "none":
        return 0.0
    kinds = layer_kinds(mcfg)
    if mcfg.remat == "full":
        fwd = forward_flops_per_token(mcfg, seq_len, executed=True, platform=platform)
        glen = len(group_blocks(mcfg))
        tails = sum(getattr(registry.get_ffn(ffn), "remat_tail_flops_per_token", lambda c: 0.0)(mcfg)
                    for _, ffn in kinds[glen - 1::glen])
        return fwd["mixers"] + fwd["ffn"] - tails
    out = 0.0
    for mixer, ffn in kinds:
        out += (registry.get_mixer(mixer).flops_per_token(mcfg, seq_len, attention="executed")
                - _weight_matmul_flops_per_token(mcfg, mixer))
        out += getattr(registry.get_ffn(ffn), "batched_dot_flops_per_token",
                       lambda c, t, **kw: 0.0)(mcfg, seq_len, platform=platform)
    return out


def analytic_flops(cfg, *, platform: str | None = None) -> dict[str, float | str]:
    """Training FLOPs per step (global, all devices) for a finalized config.

    ``platform`` ("cpu" | "gpu" | "tpu"; None = the running JAX backend) only affects the
    hardware count of an MoE's dropless dispatch (``ragged_dot`` is dense on CPU).

    Returns:
      ``model_flops_per_step``: 3 x forward x tokens, attention by ``cfg.flops.attention``, MoE
      by active experts only; ``hardware_flops_per_step``: as executed (attention's scored blocks,
      MoE capacity slots / dense ragged dots, see ``MoE.flops_per_token``) plus remat recompute
      (:func:`remat_recompute_flops_per_token`); ``model_flops_per_token_fwd``;
      ``attention_convention``; and ``model_flops_per_step_full`` (full-square convention) for
      comparison with XLA.
    """
    m = cfg.model
    tokens = cfg.train.batch_size * m.seq_len
    fwd = forward_flops_per_token(m, attention=cfg.flops.attention)
    fwd_full = forward_flops_per_token(m, attention="full")
    fwd_exec = forward_flops_per_token(m, executed=True, platform=platform)
    recompute = remat_recompute_flops_per_token(m, platform=platform)
    return {
        "model_flops_per_token_fwd": fwd["total"],
        "model_flops_per_step": 3.0 * fwd["total"] * tokens,
        "model_flops_per_step_full": 3.0 * fwd_full["total"] * tokens,
        "hardware_flops_per_step": (3.0 * fwd_exec["total"] + recompute) * tokens,
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
    """XLA's FLOPs for one train step (global, all devices), with every loop counted.

    XLA's cost analysis counts a ``while`` body once, and a train step has three kinds of loops:
    the scan over layer groups, the scan over microbatches (``grad_accum``) and the mixers'
    time / chunk scans in ``ops/``. The audit therefore costs unrolled lowerings (lowering only,
    no compile): with ``G(k)`` the cost of value-and-grad of the loss on one microbatch with ``k``
    unrolled layer groups and every ``ops.scan`` loop unrolled, and ``U`` the cost of the
    optimizer update,::

        xla_flops_per_step = A * (G(1) + (L - 1) * (G(2) - G(1))) + U

    for ``L`` groups and ``A`` microbatches. The raw count of the real (rolled) step is reported
    as ``xla_flops_raw`` for comparison.

    Returns:
      dict with ``xla_flops_per_step``, ``xla_flops_raw``, ``xla_optimizer_flops`` (``U``: clip +
      AdamW, ~O(10) FLOPs per parameter, which no analytic model-FLOP count includes; it matters
      when total parameters are large next to tokens per step, as in MoE) and ``correction``.
    """
    from efficient_arch import train
    from efficient_arch.ops import scan as scan_lib

    plen = len(group_blocks(cfg.model))
    prefix = n_prefix_layers(cfg.model)  # first_k_dense layers: part of G(1) and G(2)
    L = (cfg.model.n_layers - prefix) // plen
    A = cfg.train.grad_accum
    if lowered_step is None:
        run = train.build(cfg, mesh)
        lowered_step = run.train_step.lower(run.abstract_state, run.abstract_batch())
    raw = lowered_flops(lowered_step)
    micro = cfg.train.batch_size // A
    g = []
    with scan_lib.unrolled():
        for k in sorted({1, min(2, L)}):
            v = _variant(cfg, n_layers=prefix + k * plen, scan_layers=False, batch_size=micro, grad_accum=1)
            r = train.build(v, mesh)
            g.append(lowered_flops(r.loss_and_grad.lower(r.abstract_state["params"], r.abstract_batch())))
            if k == 1:
                u = lowered_flops(r.update_step.lower(r.abstract_state, r.abstract_state["params"]))
                u_per_group = None
            else:
                u2 = lowered_flops(r.update_step.lower(r.abstract_state, r.abstract_state["params"]))
                u_per_group = u2 - u
    per_group = g[1] - g[0] if len(g) == 2 else 0.0
    grad_cost = g[0] + (L - 1) * per_group
    update = u + (L - 1) * (u_per_group or 0.0)
    total = A * grad_cost + update
    return {"xla_flops_per_step": total, "xla_flops_raw": raw, "xla_optimizer_flops": update,
            "correction": "unrolled lowerings: A x (G(1) + (L-1)(G(2)-G(1))) + optimizer update, "
                          "with time/chunk scans unrolled"}


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
