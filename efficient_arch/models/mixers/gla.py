"""Gated linear attention (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training", sec. 4.4 eq. 8-9).

    q = x W_q / sqrt(hd),  k = x W_k,  v = x W_v                         per head, [B, T, H, hd]
    log alpha_t = log_sigmoid(x_t W_a1 W_a2 + b_a) / tau,  tau = 16     per head and key dim (<= 0)
    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t               (eq. 3, vector decay)
    y = (RMSNorm_head(o) * swish(x W_r)) W_o

The low-rank decay projection ``W_a1 [d, 16]``, ``W_a2 [16, H * hd]`` and the temperature
``tau = 16`` are the paper's; ``b_a`` is initialised to 1 (``alpha ~= sigmoid(1)^(1/16) ~= 0.98``).
Deviations (stated): key and value widths are both ``head_dim`` (the paper uses ``d_k = d/2``); the
paper's per-head LayerNorm is an RMSNorm per head (scale ``[H, hd]``). The recurrence is
:func:`efficient_arch.ops.linear_recurrence.gated_linear_attention` in ``cfg.mixer_form``.

:func:`head_rms_norm` and :func:`gated_output` are shared with ``retnet.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_arch import parallel
from efficient_arch.config import check_flop_attention
from efficient_arch.models.layers import dtype_of, matmul, param
from efficient_arch.ops.linear_recurrence import flops_gated_linear_attention, gated_linear_attention, gla_step

GATE_RANK = 16  # low-rank dimension of the decay projection (Yang et al. 2023, sec. 4.4)
TEMPERATURE = 16.0  # tau: log alpha = log_sigmoid(.) / tau


def head_rms_norm(o: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last dim of each head: ``o [B, T, H, hd]``, ``scale [H, hd]`` -> float32."""
    of = o.astype(jnp.float32)
    return of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + eps) * scale


def gated_output(o: jax.Array, gate: jax.Array, norm_scale: jax.Array, wo: jax.Array, eps: float, dtype) -> jax.Array:
    """``(head_rms_norm(o) * swish(gate)) W_o``: o, gate ``[B, T, H, hd]``, wo ``[H, hd, D]`` ->
    ``[B, T, D]`` in ``dtype``. FLOPs: ``2 H hd D`` (matmul) per token."""
    y = head_rms_norm(o, norm_scale, eps) * jax.nn.silu(gate.astype(jnp.float32))
    y = parallel.constrain(y.astype(dtype), ("batch", "seq", "act_heads", None))
    return matmul("bthk,hkd->btd", y, wo, dtype)


class GLA(nnx.Module):
    """Gated linear attention mixer.

    Parameters: ``wqkvg [d_model, 4, n_heads, head_dim]`` (q, k, v, output gate),
    ``wa1 [d_model, 16]``, ``wa2 [16, n_heads, head_dim]``, ``ba [n_heads, head_dim]``,
    ``norm [n_heads, head_dim]``, ``wo [n_heads, head_dim, d_model]``.
    Decode cache: ``{"state": [B, H, hd, hd] float32}``.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.eps = h, hd, cfg.norm_eps
        self.form, self.chunk_size = cfg.mixer_form, cfg.chunk_size
        self.dtype = dtype_of(cfg.dtype)
        self.wqkvg = param(rngs, (d, 4, h, hd), ("embed", None, "heads", "head_dim"), std=cfg.init_std)
        self.wa1 = param(rngs, (d, GATE_RANK), ("embed", None), std=cfg.init_std)
        self.wa2 = param(rngs, (GATE_RANK, h, hd), (None, "heads", "head_dim"), std=GATE_RANK ** -0.5)
        self.ba = param(rngs, (h, hd), ("heads", "head_dim"), std=None)  # ones
        self.norm = param(rngs, (h, hd), ("heads", "head_dim"), std=None)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                        std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _project(self, x):
        """x ``[B, T, D]`` -> q, k, v, gate ``[B, T, H, hd]`` (compute dtype), log decay float32."""
        p = matmul("btd,dchk->btchk", x, self.wqkvg[...], self.dtype)
        q = (p[:, :, 0].astype(jnp.float32) * self.head_dim ** -0.5).astype(self.dtype)
        k, v, gate = p[:, :, 1], p[:, :, 2], p[:, :, 3]
        low = matmul("btd,dr->btr", x, self.wa1[...], self.dtype)
        a = jnp.einsum("btr,rhk->bthk", low.astype(jnp.float32), self.wa2[...].astype(jnp.float32))
        log_decay = jax.nn.log_sigmoid(a + self.ba[...]) / TEMPERATURE
        cons = lambda y: parallel.constrain(y, ("batch", "seq", "act_heads", None))
        return cons(q), cons(k), cons(v), cons(gate), cons(log_decay)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """``x`` ``[B, T, d_model]`` -> ``[B, T, d_model]`` (compute dtype); ``positions`` ignored."""
        del positions
        q, k, v, gate, log_decay = self._project(x)
        o, _ = gated_linear_attention(q, k, v, log_decay, segment_ids=segment_ids, form=self.form,
                                      chunk_size=self.chunk_size)
        return gated_output(o, gate, self.norm[...], self.wo[...], self.eps, self.dtype)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """Zero state ``[B, H, hd, hd]`` float32 (``max_len`` unused: constant size)."""
        del max_len
        return {"state": jnp.zeros((batch_size, self.n_heads, self.head_dim, self.head_dim), jnp.float32)}

    def decode(self, x: jax.Array, cache: dict, *, position=None) -> tuple[jax.Array, dict]:
        """One token: ``x`` ``[B, 1, d_model]`` -> ``(y [B, 1, d_model], cache)``."""
        del position
        q, k, v, gate, log_decay = self._project(x)
        o, s = gla_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], cache["state"])
        return gated_output(o[:, None], gate, self.norm[...], self.wo[...], self.eps, self.dtype), {"state": s}

    def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """The prompt in the chunked form, returning the recurrent state for decoding.

        Args:
          x: ``[B, T, d_model]`` (compute dtype), the tokens after the cache's (positions
            ``0 .. T - 1`` for a fresh :meth:`init_cache`).
          cache: ``{"state": [B, H, hd, hd] float32}``, the initial state.
        Returns:
          ``(y [B, T, d_model], {"state": final state})`` from one
          :func:`~efficient_arch.ops.linear_recurrence.gated_linear_attention` call (vector
          decay), ``form="chunked"`` with ``cfg.chunk_size``.
        """
        q, k, v, gate, log_decay = self._project(x)
        o, s = gated_linear_attention(q, k, v, log_decay, initial_state=cache["state"], form="chunked",
                                      chunk_size=self.chunk_size)
        return gated_output(o, gate, self.norm[...], self.wo[...], self.eps, self.dtype), {"state": s}

    @staticmethod
    def flops_per_token(cfg, seq_len: int, *, attention: str = "causal") -> float:
        """Forward matmul FLOPs per token.

        Projections: ``2 d 4 H hd`` (q, k, v, gate) + ``2 d r + 2 r H hd`` (low-rank decay,
        ``r = 16``) + ``2 H hd d`` (output); core: :func:`flops_gated_linear_attention` with
        ``K = V = hd`` and vector decay in ``cfg.mixer_form``. Norm, swish, sigmoid and the decay
        exponentials are elementwise and not counted. ``attention`` is only validated (ValueError).
        """
        check_flop_attention(attention)
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        proj = 2.0 * d * 4 * h * hd + 2.0 * d * GATE_RANK + 2.0 * GATE_RANK * h * hd + 2.0 * h * hd * d
        core = flops_gated_linear_attention(seq_len, h, hd, hd, form=cfg.mixer_form, chunk_size=cfg.chunk_size,
                                            vector_decay=True)
        return proj + core
