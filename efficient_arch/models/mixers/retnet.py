"""Multi-scale retention (Sun et al. 2023, "Retentive Network", sec. 2.1-2.2, eq. 1-8).

    q = RoPE(x W_q) / sqrt(hd),  k = RoPE(x W_k),  v = x W_v              per head [B, T, H, hd]
    S_t = gamma_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t                      (eq. 6, recurrent form)
    gamma_h = 1 - 2^(-5 - h),  h = 0 .. H-1                                 (sec. 2.2, fixed per head)
    y = (RMSNorm_head(o) * swish(x W_G)) W_O                                (eq. 8)

Deviations (stated): the paper's xPos rotation ``e^{i n theta}`` is applied as RoPE (rotation only,
without xPos's length-extrapolation scale); the per-head GroupNorm is an RMSNorm per head (scale
``[H, hd]``); the value width is ``head_dim`` (the paper uses ``2 d`` total). The decay enters the op
as a fixed scalar log decay ``log gamma_h`` per head (the op's chunked form is the paper's chunkwise
recurrent representation, eq. 7; its quadratic form is the parallel representation, eq. 5).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_arch import parallel
from efficient_arch.config import check_flop_attention
from efficient_arch.models.layers import apply_rope, dtype_of, matmul, param, rope_angles
from efficient_arch.models.mixers.gla import gated_output
from efficient_arch.ops.linear_recurrence import flops_gated_linear_attention, gated_linear_attention, gla_step


def retention_log_decays(n_heads: int) -> np.ndarray:
    """``log gamma_h`` float32 ``[H]`` with ``gamma_h = 1 - 2^(-5 - h)`` (Sun et al. 2023, sec. 2.2)."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(n_heads, dtype=np.float64)))).astype(np.float32)


class Retention(nnx.Module):
    """Multi-scale retention mixer.

    Parameters: ``wqkvg [d_model, 4, n_heads, head_dim]`` (q, k, v, swish gate),
    ``norm [n_heads, head_dim]``, ``wo [n_heads, head_dim, d_model]``; the decays are constants.
    Decode cache: ``{"state": [B, H, hd, hd] float32}``.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.n_heads, self.head_dim, self.eps = h, hd, cfg.norm_eps
        self.rope_theta = cfg.rope_theta
        self.form, self.chunk_size = cfg.mixer_form, cfg.chunk_size
        self.dtype = dtype_of(cfg.dtype)
        self.log_gamma = tuple(float(g) for g in retention_log_decays(h))  # static, not a parameter
        self.wqkvg = param(rngs, (d, 4, h, hd), ("embed", None, "heads", "head_dim"), std=cfg.init_std)
        self.norm = param(rngs, (h, hd), ("heads", "head_dim"), std=None)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                        std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _project(self, x, positions):
        p = matmul("btd,dchk->btchk", x, self.wqkvg[...], self.dtype)
        sin, cos = rope_angles(positions, self.head_dim, self.rope_theta)
        q = apply_rope(p[:, :, 0], sin, cos)
        q = (q.astype(jnp.float32) * self.head_dim ** -0.5).astype(self.dtype)
        k = apply_rope(p[:, :, 1], sin, cos)
        cons = lambda y: parallel.constrain(y, ("batch", "seq", "act_heads", None))
        return cons(q), cons(k), cons(p[:, :, 2]), cons(p[:, :, 3])

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """``x`` ``[B, T, d_model]`` -> ``[B, T, d_model]`` (compute dtype).

        ``positions`` (int ``[B, T]``, default ``arange(T)``) drive the rotation only; the decay
        depends on token order, and is reset at ``segment_ids`` boundaries.
        """
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)
        q, k, v, gate = self._project(x, positions)
        log_decay = jnp.broadcast_to(jnp.asarray(self.log_gamma, jnp.float32), (b, t, self.n_heads))
        o, _ = gated_linear_attention(q, k, v, log_decay, segment_ids=segment_ids, form=self.form,
                                      chunk_size=self.chunk_size)
        return gated_output(o, gate, self.norm[...], self.wo[...], self.eps, self.dtype)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """Zero state ``[B, H, hd, hd]`` float32 (``max_len`` unused: constant size)."""
        del max_len
        return {"state": jnp.zeros((batch_size, self.n_heads, self.head_dim, self.head_dim), jnp.float32)}

    def decode(self, x: jax.Array, cache: dict, *, position) -> tuple[jax.Array, dict]:
        """One token at index ``position`` (int32 scalar): ``x`` ``[B, 1, d_model]`` ->
        ``(y [B, 1, d_model], cache)``."""
        b = x.shape[0]
        pos = jnp.full((b, 1), position, jnp.int32)
        q, k, v, gate = self._project(x, pos)
        log_decay = jnp.broadcast_to(jnp.asarray(self.log_gamma, jnp.float32), (b, self.n_heads))
        o, s = gla_step(q[:, 0], k[:, 0], v[:, 0], log_decay, cache["state"])
        return gated_output(o[:, None], gate, self.norm[...], self.wo[...], self.eps, self.dtype), {"state": s}

    def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """The prompt (positions ``0 .. T - 1``) in the chunked form, returning the state.

        Args:
          x: ``[B, T, d_model]`` (compute dtype); the rotation uses positions ``arange(T)``, so
            the cache must be a fresh :meth:`init_cache` (the prompt starts the sequence).
          cache: ``{"state": [B, H, hd, hd] float32}``.
        Returns:
          ``(y [B, T, d_model], {"state": final state})`` from one
          :func:`~efficient_arch.ops.linear_recurrence.gated_linear_attention` call,
          ``form="chunked"`` with ``cfg.chunk_size``.
        """
        b, t, _ = x.shape
        q, k, v, gate = self._project(x, jnp.arange(t, dtype=jnp.int32))
        log_decay = jnp.broadcast_to(jnp.asarray(self.log_gamma, jnp.float32), (b, t, self.n_heads))
        o, s = gated_linear_attention(q, k, v, log_decay, initial_state=cache["state"], form="chunked",
                                      chunk_size=self.chunk_size)
        return gated_output(o, gate, self.norm[...], self.wo[...], self.eps, self.dtype), {"state": s}

    @staticmethod
    def flops_per_token(cfg, seq_len: int, *, attention: str = "causal") -> float:
        """Forward matmul FLOPs per token.

        Projections ``2 d 4 H hd`` (q, k, v, gate) + ``2 H hd d`` (output); core:
        :func:`flops_gated_linear_attention` with ``K = V = hd``, scalar decay, ``cfg.mixer_form``.
        RoPE, norm, swish and decay masks are elementwise and not counted. ``attention`` is only
        validated (ValueError: unknown convention).
        """
        check_flop_attention(attention)
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        proj = 2.0 * d * 4 * h * hd + 2.0 * h * hd * d
        core = flops_gated_linear_attention(seq_len, h, hd, hd, form=cfg.mixer_form, chunk_size=cfg.chunk_size,
                                            vector_decay=False)
        return proj + core
