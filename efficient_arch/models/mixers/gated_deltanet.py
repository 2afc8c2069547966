"""Gated DeltaNet: the delta rule with a data-dependent scalar decay per head, and an output gate.

Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(eq. 10 and Sec. 3.4, the layer of Fig. 1)::

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ,   o_t = q_t S_t
    log alpha_t = -exp(A_log) * softplus(x_t W_a + dt_bias)           [B, T, H]  (Mamba-2 style,
                                                                        Dao & Gu 2024 Sec. 7.1)
    y = (RMSNorm_head(o) * SiLU(x W_g)) W_o

Everything else (short conv + SiLU on q, k, v, L2-normalised q and k, ``beta = sigmoid(x W_beta)``)
is :class:`~efficient_arch.models.mixers.deltanet.DeltaNet`, which this class extends.

Initialisation (Mamba-2): ``A = exp(A_log)`` uniform in [1, 16]; ``softplus(dt_bias)`` log-uniform
in [1e-3, 1e-1], so initial per-step decays ``alpha`` lie in about [0.2, 0.999].
Extra parameters: ``w_a [d_model, n_heads]``, ``A_log [n_heads]``, ``dt_bias [n_heads]``,
``w_g [d_model, n_heads, head_dim]``. Keys and values have width ``head_dim`` (the paper's
``expand_v`` is 1 here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_arch.models.layers import matmul, param
from efficient_arch.models.mixers.deltanet import DeltaNet

A_INIT_RANGE = (1.0, 16.0)
DT_INIT_RANGE = (1e-3, 1e-1)


def _a_log_init(key, shape, dtype=jnp.float32):
    a = jax.random.uniform(key, shape, jnp.float32, *A_INIT_RANGE)
    return jnp.log(a).astype(dtype)


def _dt_bias_init(key, shape, dtype=jnp.float32):
    lo, hi = jnp.log(DT_INIT_RANGE[0]), jnp.log(DT_INIT_RANGE[1])
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi))
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet sequence mixer (module docstring); same contract as DeltaNet."""

    gated = True

    def _init_gating(self, cfg, rngs):
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.w_a = param(rngs, (d, h), ("embed", "heads"), std=cfg.init_std)
        self.A_log = nnx.Param(nnx.with_partitioning(_a_log_init, ("heads",))(rngs.params(), (h,)))
        self.dt_bias = nnx.Param(nnx.with_partitioning(_dt_bias_init, ("heads",))(rngs.params(), (h,)))
        self.w_g = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std=cfg.init_std)

    def _log_decay(self, x):
        """``log alpha = -exp(A_log) softplus(x W_a + dt_bias)``: ``[B, T, H]`` float32, ``<= 0``."""
        dt = matmul("btd,dh->bth", x, self.w_a[...], self.dtype).astype(jnp.float32)
        dt = jax.nn.softplus(dt + self.dt_bias[...])
        return -jnp.exp(self.A_log[...]) * dt

    def _gate(self, x, o):
        """``o * SiLU(x W_g)`` per head (float32 product, result in the compute dtype)."""
        g = matmul("btd,dhk->bthk", x, self.w_g[...], self.dtype)
        return (o.astype(jnp.float32) * jax.nn.silu(g.astype(jnp.float32))).astype(self.dtype)
