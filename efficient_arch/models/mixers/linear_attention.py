"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", eq. 4-10).

    phi_q = phi(x W_q),  phi_k = phi(x W_k),  v = x W_v           per head
    S_t = S_{t-1} + phi_k_t^T v_t,   z_t = z_{t-1} + phi_k_t           (eq. 10 numerator / denominator)
    o_t = phi_q_t S_t / (phi_q_t . z_t + eps)     (cfg.normalize; eq. 9)   else  o_t = phi_q_t S_t
    y = o W_o

Feature maps (``cfg.feature_map``): ``identity``; ``elu`` = elu(x) + 1 (the paper's eq. 7);
``taylor``: the 2nd-order Taylor map of Based (Arora et al. 2024) applied to ``cfg.feature_dim``-wide
q/k projections (output ``1 + f + f^2`` per head). ``identity`` and ``elu`` use ``head_dim``-wide q/k.
Without normalization q is scaled by ``f^(-1/2)`` (Taylor already includes its ``f^(-1/4)`` scale);
with it the scale cancels. Note: ``identity`` with ``normalize=True`` has a denominator of either
sign and can be unstable; ``elu`` and ``taylor`` features give a positive denominator.

The denominator comes from the same op as the numerator (``normalize=True``): the op's state is
``[K_f, head_dim + 1]`` and its last column is ``z``. The recurrence is
:func:`efficient_arch.ops.linear_recurrence.gated_linear_attention` with no decay, in the form
``cfg.mixer_form`` (chunk ``cfg.chunk_size``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_arch import parallel
from efficient_arch.config import check_flop_attention
from efficient_arch.models.layers import dtype_of, matmul, param
from efficient_arch.ops.linear_recurrence import (
    feature_dim, feature_map, flops_gated_linear_attention, gated_linear_attention, gla_step)

EPS = 1e-6


def _qk_dim(cfg) -> int:
    return cfg.feature_dim if cfg.feature_map == "taylor" else cfg.head_dim


class LinearAttention(nnx.Module):
    """Causal linear attention mixer.

    Parameters: ``wqk [d_model, 2, n_heads, f]`` (``f = feature_dim`` for the Taylor map, else
    ``head_dim``), ``wv [d_model, n_heads, head_dim]``, ``wo [n_heads, head_dim, d_model]``.
    Decode cache: ``{"state": [B, H, K_f, head_dim + normalize] float32}`` (constant size).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        f = _qk_dim(cfg)
        self.n_heads, self.head_dim, self.qk_dim = h, hd, f
        self.feature_map, self.normalize = cfg.feature_map, bool(cfg.normalize)
        self.form, self.chunk_size = cfg.mixer_form, cfg.chunk_size
        self.dtype = dtype_of(cfg.dtype)
        self.wqk = param(rngs, (d, 2, h, f), ("embed", None, "heads", "head_dim"), std=cfg.init_std)
        self.wv = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std=cfg.init_std)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                        std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _op_map(self) -> str | None:
        """The feature map the op applies itself: ``taylor`` (its chunked form then scores with
        the ``f``-wide ``q . k``); the others are applied here, before the op."""
        return "taylor" if self.feature_map == "taylor" else None

    def _qkv(self, x, *, raw: bool = False):
        """x ``[B, T, D]`` -> featurised q, k ``[B, T, H, K_f]`` (``raw``: unmapped ``[B, T, H, f]``,
        for the op's ``feature_map``), v ``[B, T, H, hd]``."""
        qk = matmul("btd,dchf->btchf", x, self.wqk[...], self.dtype)
        q, k = qk[:, :, 0], qk[:, :, 1]
        if not raw:
            q, k = feature_map(self.feature_map, q), feature_map(self.feature_map, k)
        if not raw and not self.normalize and self.feature_map != "taylor":
            q = (q.astype(jnp.float32) * self.qk_dim ** -0.5).astype(self.dtype)
        v = matmul("btd,dhk->bthk", x, self.wv[...], self.dtype)
        q = parallel.constrain(q, ("batch", "seq", "act_heads", None))
        k = parallel.constrain(k, ("batch", "seq", "act_heads", None))
        v = parallel.constrain(v, ("batch", "seq", "act_heads", None))
        return q, k, v

    def _out(self, o):
        """Op output ``[B, T, H, hd]`` (normalised by the op) -> ``[B, T, D]``."""
        o = parallel.constrain(o.astype(self.dtype), ("batch", "seq", "act_heads", None))
        return matmul("bthk,hkd->btd", o, self.wo[...], self.dtype)

    def _norm(self) -> dict:
        """The op's normalisation arguments: ``o = phi_q S / (phi_q . z + EPS)`` or none."""
        return {"normalize": True, "eps": EPS} if self.normalize else {}

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """``x`` ``[B, T, d_model]`` (compute dtype) -> ``[B, T, d_model]``; ``positions`` ignored;
        no information crosses a ``segment_ids`` boundary."""
        del positions
        q, k, v = self._qkv(x, raw=self._op_map() is not None)
        o, _ = gated_linear_attention(q, k, v, None, segment_ids=segment_ids, form=self.form,
                                      chunk_size=self.chunk_size, feature_map=self._op_map(), **self._norm())
        return self._out(o)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """Zero state ``[B, H, K_f, head_dim + normalize]`` float32 (``max_len`` unused)."""
        del max_len
        k_f = feature_dim(self.feature_map, self.qk_dim)
        return {"state": jnp.zeros((batch_size, self.n_heads, k_f, self.head_dim + self.normalize), jnp.float32)}

    def decode(self, x: jax.Array, cache: dict, *, position=None) -> tuple[jax.Array, dict]:
        """One token: ``x`` ``[B, 1, d_model]`` -> ``(y [B, 1, d_model], cache)``."""
        del position
        q, k, v = self._qkv(x)
        o, s = gla_step(q[:, 0], k[:, 0], v[:, 0], None, cache["state"], **self._norm())
        return self._out(o[:, None]), {"state": s}

    def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """The prompt in the chunked form, returning the recurrent state for decoding.

        Args:
          x: ``[B, T, d_model]`` (compute dtype), the tokens after the cache's (positions
            ``0 .. T - 1`` for a fresh :meth:`init_cache`).
          cache: ``{"state": [B, H, K_f, head_dim + normalize] float32}``, the initial state.
        Returns:
          ``(y [B, T, d_model], {"state": final state})`` from one
          :func:`~efficient_arch.ops.linear_recurrence.gated_linear_attention` call,
          ``form="chunked"`` with ``cfg.chunk_size`` (whatever ``mixer_form`` trains with).
        """
        q, k, v = self._qkv(x, raw=self._op_map() is not None)
        o, s = gated_linear_attention(q, k, v, None, initial_state=cache["state"], form="chunked",
                                      chunk_size=self.chunk_size, feature_map=self._op_map(), **self._norm())
        return self._out(o), {"state": s}

    @staticmethod
    def flops_per_token(cfg, seq_len: int, *, attention: str = "causal") -> float:
        """Forward matmul FLOPs per token.

        Projections ``2 d H (2 f + hd)`` (q, k, v) and ``2 H hd d`` (output), plus
        :func:`flops_gated_linear_attention` with key width ``K_f`` (``f``, or ``1 + f + f^2``
        for the Taylor map, whose chunked scores contract ``f``: ``score_dim``), value width
        ``hd`` and ``normalize=cfg.normalize``, in ``cfg.mixer_form``. Feature maps and the
        normalising division are elementwise and not counted. ``attention`` is only validated
        (there is no softmax square).

        Raises:
          ValueError: unknown ``attention`` convention.
        """
        check_flop_attention(attention)
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        f = _qk_dim(cfg)
        proj = 2.0 * d * h * (2 * f + hd) + 2.0 * h * hd * d
        core = flops_gated_linear_attention(seq_len, h, feature_dim(cfg.feature_map, f), hd, form=cfg.mixer_form,
                                            chunk_size=cfg.chunk_size, vector_decay=False, has_decay=False,
                                            normalize=bool(cfg.normalize),
                                            score_dim=f if cfg.feature_map == "taylor" and cfg.mixer_form == "chunked"
                                            else None)
        return proj + core
