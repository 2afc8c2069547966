"""Mixture-of-Experts FFN (``model.ffn = "moe"``): router, SwiGLU experts, two dispatch modes.

    x [B, T, d] -> router scores [B, T, E] -> top-k experts per token -> experts -> weighted sum
                (+ n_shared_experts always-active SwiGLU experts, DeepSeekMoE / Llama-4)

Router (``model.moe.router``):

* ``softmax``: probabilities ``softmax(x W_r)``; top-k of them; weights = the top-k probabilities,
  renormalized to sum to 1 when ``norm_top_k`` (Mixtral) or not (Switch, GShard).
* ``sigmoid``: scores ``sigmoid(x W_r)``; top-k; weights = the top-k scores, divided by their sum
  when ``norm_top_k`` (DeepSeek-V3, Liu et al. 2024, eqs. 15-16) or used as they are (Llama-4's
  top-1 router: a normalized top-1 weight would be 1 and give the router no gradient).

Weights are finally multiplied by ``route_scale`` (DeepSeek-V3's routed scaling factor).

Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): a per-expert ``expert_bias`` is added to the
scores *for the top-k selection only* (weights use the unbiased scores). It is not trained by
gradient: after each step :meth:`MoE.post_step` moves it by ``bias_update_rate * sign(mean load -
load)`` (:func:`efficient_arch.models.lm.update_expert_bias`), raising under-loaded experts.

Losses (added to the training loss through ``aux["aux_loss"]``):

* load balancing (Switch Transformer, Fedus et al. 2022, eq. 4): ``E * sum_i f_i P_i`` with
  ``f_i`` the fraction of the N*k assignments that chose expert i and ``P_i`` the mean router
  probability of expert i (sigmoid scores are normalized per token first); 1.0 when uniform.
* router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): ``mean_tokens(logsumexp(logits)^2)``.

Dispatch (``model.moe.dispatch``):

* ``capacity``: each *sequence* is a dispatch group (so dropping never depends on the mesh or on
  gradient accumulation); an expert takes at most ``C = min(T, ceil(capacity_factor * T * k /
  E))`` of a sequence's tokens. Slots go first to every token's first choice in token order,
  then to second choices, ... (GShard, Lepikhin et al. 2021, Algorithm 1's priority). Tokens
  over capacity get no output from that expert (with a residual block they pass through
  unchanged). Tokens are moved by index scatter / gather into an ``[B, E, C, d]`` buffer: no
  one-hot dispatch matmul, so dispatch adds no matmul FLOPs (XLA counts the scatter's adds only).
  Executed expert FLOPs are those of all ``E * C`` slots, padded or not.
* ``dropless``: all ``B*T*k`` assignments sorted by expert and run through two grouped matmuls
  (``jax.lax.ragged_dot``); nothing is dropped. On CPU, JAX lowers ``ragged_dot`` *densely*
  (every assignment row masked and multiplied by every expert: E times the active FLOPs; see
  ``jax/_src/lax/lax.py:_ragged_dot_general_impl``); GPU and TPU get XLA's ragged-dot
  instruction. The hardware-FLOP count says which.

Both modes give the same output when nothing is dropped (tested).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_arch import parallel
from efficient_arch.models.layers import MLP, dtype_of, matmul, param, swiglu

ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("capacity", "dropless")


def capacity(seq_len: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Expert capacity per sequence: ``min(T, ceil(capacity_factor * T * k / E))`` (>= 1) tokens.

    An expert can never usefully hold more than ``T`` tokens of one sequence (a token picks an
    expert at most once), hence the clamp.
    """
    c = math.ceil(capacity_factor * seq_len * top_k / n_experts)
    return max(1, min(seq_len, c))


def route(logits: jax.Array, bias: jax.Array, *, router: str, top_k: int, norm_top_k: bool,
          route_scale: float):
    """Top-k routing from router logits.

    Args:
      logits: float32 ``[..., E]`` router logits ``x W_r``.
      bias: float32 ``[E]`` selection bias (aux-loss-free balancing; zeros when unused).
    Returns:
      ``(idx int32 [..., k], weights float32 [..., k], probs float32 [..., E])`` where ``probs``
      are the per-token normalized router probabilities used by the load-balancing loss. Ties
      between equal scores go to the lower expert index (``jax.lax.top_k``).
    """
    if router == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
        scores = probs
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    _, idx = jax.lax.top_k(scores + jax.lax.stop_gradient(bias), top_k)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if norm_top_k:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return idx, weights * route_scale, probs


def load_balancing_loss(idx: jax.Array, probs: jax.Array, n_experts: int) -> jax.Array:
    """Switch load-balancing loss ``E * sum_i f_i P_i`` (Fedus et al. 2022, eq. 4), float32 scalar.

    Args:
      idx: int ``[N, k]`` chosen experts; ``probs``: float32 ``[N, E]`` router probabilities.
    ``f_i`` = share of the ``N k`` assignments that went to expert ``i`` (not differentiable);
    ``P_i`` = mean probability of expert ``i`` (carries the gradient). Equals 1 when balanced.
    """
    counts = jnp.sum(jax.nn.one_hot(idx, n_experts, dtype=jnp.float32), axis=(0, 1))
    f = counts / idx.size
    p = jnp.mean(probs, axis=0)
    return n_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def z_loss(logits: jax.Array) -> jax.Array:
    """Router z-loss ``mean(logsumexp(logits, -1)^2)`` (ST-MoE, Zoph et al. 2022, eq. 5).

    ``logits`` float32 ``[N, E]`` -> float32 scalar.
    """
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def slot_positions(idx: jax.Array, n_experts: int) -> jax.Array:
    """Position of each assignment in its expert's queue within one sequence (0-based).

    Args:
      idx: int32 ``[B, T, k]`` chosen experts.
    Returns:
      int32 ``[B, T, k]``: assignment ``(b, t, j)`` is number ``pos`` in expert ``idx[b,t,j]``'s
      queue for sequence ``b``, counting all first choices in token order, then all second
      choices, ... (GShard priority). An assignment is kept iff ``pos < capacity``.
    """
    B, T, k = idx.shape
    flat = jnp.swapaxes(idx, 1, 2).reshape(B, k * T)  # priority order: choice-major, then token
    # a stable sort by expert keeps priority order inside each expert's run; rank in the run = pos
    # (O(n log n); a cumsum over a one-hot [B, kT, E] would cost O((kT)^2 E) as XLA reduce-window)
    order = jnp.argsort(flat, axis=1, stable=True)
    sorted_e = jnp.take_along_axis(flat, order, axis=1)
    counts = jax.vmap(lambda e: jnp.bincount(e, length=n_experts))(flat)
    starts = jnp.cumsum(counts, axis=1) - counts  # [B, E] first sorted index of each expert
    rank = jnp.arange(k * T)[None, :] - jnp.take_along_axis(starts, sorted_e, axis=1)
    pos = jnp.zeros_like(flat).at[jnp.arange(B)[:, None], order].set(rank)
    return jnp.swapaxes(pos.reshape(B, k, T), 1, 2)


def swiglu_experts(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, dtype) -> jax.Array:
    """Expert SwiGLU on a dispatch buffer.

    Args:
      x: ``[B, E, C, d]`` tokens per expert slot; w_gate_up ``[E, d, 2, f]``; w_down ``[E, f, d]``.
    Returns:
      ``[B, E, C, d]`` in ``dtype``. FLOPs: ``6 d f`` per slot.
    """
    # experts leading ([E, B, C, d]): XLA:CPU then runs the batched bf16 dots (its fallback dot
    # kernel has no bf16 x bf16 -> f32, which an expert axis in second place reached: "Unsupported
    # element type for DotThunk::Execute"); a layout change only, same FLOPs and sharding
    xe = jnp.moveaxis(x, 1, 0)
    gu = matmul("ebcd,edkf->ebckf", xe, w_gate_up, dtype)
    return jnp.moveaxis(matmul("ebcf,efd->ebcd", swiglu(gu), w_down, dtype), 0, 1)


class MoE(nnx.Module):
    """Mixture-of-Experts SwiGLU FFN; see the module docstring for the routing and dispatch.

    Parameters: ``router`` ``[d, E]``, ``expert_bias`` ``[E]`` (not trained by gradient),
    ``w_gate_up`` ``[E, d, 2, d_ff_expert]``, ``w_down`` ``[E, d_ff_expert, d]`` (experts sharded
    over the ``expert`` mesh axis), and ``shared`` (an :class:`MLP` of width
    ``n_shared_experts * d_ff_expert``) when ``n_shared_experts > 0``.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        mo = cfg.moe
        d, E, f = cfg.d_model, mo.n_experts, mo.d_ff_expert
        self.cfg, self.dtype = cfg, dtype_of(cfg.dtype)
        self.router = param(rngs, (d, E), ("embed", None), std=cfg.init_std)
        self.expert_bias = param(rngs, (E,), (None,), std=0.0)
        self.w_gate_up = param(rngs, (E, d, 2, f), ("expert", "embed", None, "mlp"), std=cfg.init_std)
        self.w_down = param(rngs, (E, f, d), ("expert", "mlp", "embed"),
                            std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.shared = MLP(cfg, rngs=rngs, d_ff=mo.n_shared_experts * f) if mo.n_shared_experts else None

    def __call__(self, x: jax.Array, *, segment_ids=None) -> tuple[jax.Array, dict]:
        """``x`` ``[B, T, d_model]`` -> ``(y [B, T, d_model], aux)`` in the compute dtype.

        ``aux`` (float32): ``aux_loss`` (= aux_loss_coef * lb + z_loss_coef * z, added to the
        training loss), ``moe_lb_loss``, ``moe_z_loss``, ``moe_dropped`` / ``moe_assigned``
        (assignment counts) and the vector ``expert_counts`` ``[E]`` (assignments per expert
        before dropping), which the LM keeps per layer for the bias update and load metrics.
        """
        del segment_ids
        mo = self.cfg.moe
        B, T, d = x.shape
        E, k = mo.n_experts, mo.top_k
        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        idx, weights, probs = route(logits, self.expert_bias[...], router=mo.router, top_k=k,
                                    norm_top_k=mo.norm_top_k, route_scale=mo.route_scale)
        flat_idx = idx.reshape(B * T, k)
        lb = load_balancing_loss(flat_idx, probs.reshape(B * T, E), E)
        zl = z_loss(logits.reshape(B * T, E))
        counts = jnp.sum(jax.nn.one_hot(flat_idx, E, dtype=jnp.float32), axis=(0, 1))
        if mo.dispatch == "capacity":
            y, kept = self._capacity(x, idx, weights)
        else:
            y, kept = self._dropless(x, idx, weights), jnp.float32(B * T * k)
        if self.shared is not None:
            y = y + self.shared(x)[0]
        aux = {"aux_loss": mo.aux_loss_coef * lb + mo.z_loss_coef * zl, "moe_lb_loss": lb, "moe_z_loss": zl,
               "moe_dropped": jnp.float32(B * T * k) - kept, "moe_assigned": jnp.float32(B * T * k),
               "expert_counts": counts}
        return parallel.constrain(y, ("batch", "seq", "act_embed")), aux

    def _capacity(self, x, idx, weights):
        """Capacity dispatch: scatter into ``[B, E, C, d]``, run experts, gather back."""
        B, T, d = x.shape
        E, k = self.cfg.moe.n_experts, self.cfg.moe.top_k
        C = capacity(T, E, k, self.cfg.moe.capacity_factor)
        pos = slot_positions(idx, E)
        keep = pos < C
        slot = jnp.where(keep, pos, C)  # out of range: the scatter drops it, the gather fills 0
        b = jnp.broadcast_to(jnp.arange(B)[:, None, None], idx.shape)
        xk = jnp.broadcast_to(x[:, :, None, :], (B, T, k, d)).astype(self.dtype)
        buf = jnp.zeros((B, E, C, d), self.dtype).at[b, idx, slot].set(xk, mode="drop")
        buf = parallel.constrain(buf, ("act_batch_exp", "act_expert", None, "act_embed"))
        out = swiglu_experts(buf, self.w_gate_up[...], self.w_down[...], self.dtype)
        out = parallel.constrain(out, ("act_batch_exp", "act_expert", None, "act_embed"))
        yk = out.at[b, idx, slot].get(mode="fill", fill_value=0)  # [B, T, k, d]
        w = (weights * keep).astype(jnp.float32)
        y = jnp.einsum("btkd,btk->btd", yk.astype(jnp.float32), w).astype(self.dtype)
        return y, jnp.sum(keep).astype(jnp.float32)

    def _dropless(self, x, idx, weights):
        """Dropless dispatch: sort assignments by expert, two ``ragged_dot`` grouped matmuls."""
        B, T, d = x.shape
        E, k = self.cfg.moe.n_experts, self.cfg.moe.top_k
        f = self.cfg.moe.d_ff_expert
        flat = idx.reshape(-1)  # [N k], assignment a belongs to token a // k
        order = jnp.argsort(flat, stable=True)
        group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
        xs = x.reshape(B * T, d)[order // k].astype(self.dtype)
        wgu = self.w_gate_up[...].reshape(E, d, 2 * f).astype(self.dtype)
        gu = jax.lax.ragged_dot(xs, wgu, group_sizes, preferred_element_type=jnp.float32)
        h = swiglu(gu.reshape(-1, 2, f))
        ys = jax.lax.ragged_dot(h.astype(self.dtype), self.w_down[...].astype(self.dtype), group_sizes,
                                preferred_element_type=jnp.float32)
        y = jnp.zeros_like(ys).at[order].set(ys).reshape(B, T, k, d)
        return jnp.einsum("btkd,btk->btd", y, weights.astype(jnp.float32)).astype(self.dtype)

    @staticmethod
    def flops_per_token(cfg, seq_len: int, *, attention: str = "causal", executed: bool = False,
                        platform: str | None = None) -> float:
        """Forward FLOPs per token of one MoE layer.

        Model FLOPs (``executed=False``): router ``2 d E`` + ``top_k`` routed experts and the
        shared experts at ``6 d d_ff_expert`` each; never the total parameter count. With
        ``executed=True`` (hardware FLOPs): capacity dispatch runs all ``E * C`` slots of a
        sequence (``E C / T`` expert passes per token, padding included); dropless dispatch on
        CPU, where ``ragged_dot`` lowers densely, runs ``E * top_k``. ``platform`` ("cpu" |
        "gpu" | "tpu") says where; None = the running JAX backend.
        Dispatch scatter / gather are data movement: 0 FLOPs.
        """
        del attention
        mo = cfg.moe
        per_expert = 6.0 * cfg.d_model * mo.d_ff_expert
        routed = float(mo.top_k)
        if executed:
            if mo.dispatch == "capacity":
                routed = mo.n_experts * capacity(seq_len, mo.n_experts, mo.top_k, mo.capacity_factor) / seq_len
            elif (platform or jax.default_backend()) == "cpu":
                routed = float(mo.n_experts * mo.top_k)
        return 2.0 * cfg.d_model * mo.n_experts + (routed + mo.n_shared_experts) * per_expert

    @staticmethod
    def post_step(cfg, params: dict, metrics: dict) -> tuple[dict, dict]:
        """After each optimizer step (called by the train step through ``lm.apply_step_stats``):
        the aux-loss-free bias step from the per-layer ``expert_counts`` when
        ``moe.bias_update_rate > 0``, and the counts turned into loggable load metrics
        (:func:`summarize_metrics`)."""
        from efficient_arch.models.lm import update_expert_bias

        counts = {k: v for k, v in metrics.items() if jnp.ndim(v) and "/expert_counts/" in k}
        if cfg.moe.bias_update_rate > 0 and counts:
            params = update_expert_bias(params, counts, cfg.moe.bias_update_rate)
        return params, summarize_metrics(metrics)

    @staticmethod
    def remat_tail_flops_per_token(cfg) -> float:
        """Under full remat the shared experts' ``w_down`` output is not needed by the backward
        (``2 d n_shared d_ff_expert``); the routed experts' outputs are (combine weights' grad)."""
        return 2.0 * cfg.d_model * cfg.moe.n_shared_experts * cfg.moe.d_ff_expert

    @staticmethod
    def batched_dot_flops_per_token(cfg, seq_len: int, *, platform: str | None = None) -> float:
        """Executed routed-expert FLOPs: dots batched over experts (or ``ragged_dot``), which
        remat ``dots`` does not save."""
        mo = cfg.moe
        shared_and_router = 2.0 * cfg.d_model * mo.n_experts + mo.n_shared_experts * 6.0 * cfg.d_model * mo.d_ff_expert
        return MoE.flops_per_token(cfg, seq_len, executed=True, platform=platform) - shared_and_router

    @staticmethod
    def n_inactive_params(cfg) -> int:
        """Parameters of one MoE layer a token does not use: ``(E - k) * 3 d d_ff_expert``."""
        mo = cfg.moe
        return (mo.n_experts - mo.top_k) * 3 * cfg.d_model * mo.d_ff_expert


def load_metrics(counts: jax.Array) -> dict[str, jax.Array]:
    """Expert-load statistics from per-layer assignment counts.

    Args:
      counts: float32 ``[n_layers, E]`` assignments per expert (any positive scale).
    Returns:
      float32 scalars averaged over layers: ``moe_load_max`` (largest share / uniform share:
      1 is balanced; at most E / top_k, when every token picks the same top_k experts) and
      ``moe_load_cv`` (coefficient of variation of the shares), plus ``moe_load_min`` (smallest
      share / uniform share).
    """
    frac = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1e-9)
    mean = 1.0 / counts.shape[-1]
    return {"moe_load_max": jnp.mean(jnp.max(frac, -1) / mean),
            "moe_load_min": jnp.mean(jnp.min(frac, -1) / mean),
            "moe_load_cv": jnp.mean(jnp.std(frac, -1) / mean)}


def summarize_metrics(metrics: dict) -> dict:
    """Turn a step's raw MoE aux into loggable scalars.

    Replaces the per-layer vectors ``*/expert_counts/*`` by :func:`load_metrics` over all MoE
    layers and the counts ``moe_dropped`` / ``moe_assigned`` by ``moe_drop_fraction`` (share of
    token-to-expert assignments dropped by capacity, all layers). Other entries pass through.
    """
    counts = [v for k, v in metrics.items() if jnp.ndim(v)]
    out = {k: v for k, v in metrics.items() if not jnp.ndim(v) and k not in ("moe_dropped", "moe_assigned")}
    if counts:
        out.update(load_metrics(jnp.concatenate([c.reshape(-1, c.shape[-1]) for c in counts])))
    if "moe_assigned" in metrics:
        out["moe_drop_fraction"] = metrics["moe_dropped"] / jnp.maximum(metrics["moe_assigned"], 1.0)
    return out
