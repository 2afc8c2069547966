"""Based linear attention: Taylor-feature-map linear attention (Arora et al. 2024, "Simple linear
attention language models balance the recall-throughput tradeoff", the Based architecture
section: "Taylor linear attention"), i.e. normalised kernel linear attention (Katharopoulos et
al. 2020, eq. 2 with ``sim(q, k) = phi(q) . phi(k)``) with the 2nd-order Taylor map.

Per head ``h`` with a small feature dimension ``F = cfg.feature_dim`` for queries and keys and
``D = head_dim`` for values::

    q_t = x_t W_q,  k_t = x_t W_k      [H, F]          v_t = x_t W_v      [H, D]
    phi(u) = [1, u / F^{1/4}, vec(u u^T) / (sqrt(2) sqrt(F))]   in R^{1 + F + F^2}
    phi(q) . phi(k) = 1 + q.k / sqrt(F) + (q.k)^2 / (2F)  ~  exp(q.k / sqrt(F))      (Taylor, 2nd order)
    y_t = phi(q_t) sum_{s<=t} phi(k_s)^T v_s  /  phi(q_t) sum_{s<=t} phi(k_s)^T      (normalised)
    out = y W_o

The numerator and the normaliser are one call of the gated linear attention op (no decay,
``normalize=True``: the state's last column accumulates ``z = sum phi(k)``; ``feature_map="taylor"``:
the op applies ``phi`` and its chunked form takes the intra-chunk scores from the ``F``-wide ``q.k``
through ``1 + s + s^2/2`` instead of the ``1 + F + F^2``-wide features). Since
``1 + s + s^2/2 >= 1/2`` the normaliser is ``>= 1/2`` times the number of visible keys: no
division blow-up. ``cfg.mixer_form`` picks the chunked / recurrent / quadratic form of the op.

**Design choice (layer vs architecture).** In the paper, *Based* is an architecture: a stack
mixing these Taylor linear-attention layers with sliding-window softmax-attention layers
(window 64, Sec. 4 "Sliding window attention") and gated-convolution (BaseConv) layers. Here
``based`` is the Taylor linear-attention *layer* only; the Based architecture is a
``layer_pattern`` hybrid with ``sliding_window`` (``experiments/configs/based.py``: pattern
``("based", "sliding_window")``). BaseConv layers are not implemented (the repo has no
gated-convolution mixer), so that config is "Based without BaseConv".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_arch import parallel
from efficient_arch.config import check_flop_attention
from efficient_arch.models.layers import dtype_of, matmul, param
from efficient_arch.ops.linear_recurrence import (flops_gated_linear_attention, gated_linear_attention,
                                                  gla_step, taylor_feature_map)


class Based(nnx.Module):
    """Based Taylor linear attention (module docstring). MHA only (``n_heads`` heads for q, k, v).

    Config fields: ``d_model``, ``n_heads``, ``head_dim``, ``feature_dim`` (F), ``mixer_form``,
    ``chunk_size``, ``init_std``, ``n_layers``.

    Parameters: ``wqk [d, 2, H, F]``, ``wv [d, H, head_dim]``, ``wo [H, head_dim, d]``.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, h, hd, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.feature_dim
        self.n_heads, self.head_dim, self.feature_dim = h, hd, f
        self.form, self.chunk_size = cfg.mixer_form, cfg.chunk_size
        self.dtype = dtype_of(cfg.dtype)
        self.wqk = param(rngs, (d, 2, h, f), ("embed", None, "heads", None), std=cfg.init_std)
        self.wv = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std=cfg.init_std)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                        std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _projections(self, x):
        """``x [..., d]`` -> raw ``q, k [..., H, F]`` and ``v [..., H, hd]``."""
        qk = matmul("...d,dchf->...chf", x, self.wqk[...], self.dtype)
        v = matmul("...d,dhk->...hk", x, self.wv[...], self.dtype)
        return qk[..., 0, :, :], qk[..., 1, :, :], v

    def _output(self, o):
        """The op's normalised output (denominator ``>= 1/2``: module docstring) projected."""
        return matmul("...hk,hkd->...d", o, self.wo[...], self.dtype)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Based linear attention over a sequence.

        Args:
          x: ``[B, T, d_model]`` compute dtype; segment_ids: optional int ``[B, T]`` (the state
            resets at document boundaries); positions: ignored (no positional encoding).
        Returns:
          ``[B, T, d_model]`` in the compute dtype.
        """
        del positions
        q, k, v = self._projections(x)
        q = parallel.constrain(q, ("batch", "seq", "act_heads", None))
        k = parallel.constrain(k, ("batch", "seq", "act_heads", None))
        o, _ = gated_linear_attention(q, k, v, None, segment_ids=segment_ids, form=self.form,
                                      chunk_size=self.chunk_size, normalize=True, feature_map="taylor")
        return self._output(o)

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, jax.Array]:
        """Constant-size state ``{"state": [B, H, 1+F+F^2, head_dim+1]}`` float32 (the last
        column is the normaliser ``sum phi(k)``); ``max_len`` is unused."""
        del max_len
        k = 1 + self.feature_dim + self.feature_dim ** 2
        return {"state": jnp.zeros((batch_size, self.n_heads, k, self.head_dim + 1), jnp.float32)}

    def decode(self, x: jax.Array, cache: dict, *, position) -> tuple[jax.Array, dict]:
        """One token ``x [B, 1, d_model]`` -> ``(y [B, 1, d_model], cache)``; ``position`` unused.

        FLOPs: projections + ``5 H (1+F+F^2)(head_dim+1)`` (:func:`gla_step`'s state update and
        read-out, normalised).
        """
        del position
        q, k, v = self._projections(x[:, 0])
        o, s = gla_step(taylor_feature_map(q), taylor_feature_map(k), v, None, cache["state"], normalize=True)
        return self._output(o)[:, None], {"state": s}

    def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """The prompt in the chunked form, returning the recurrent state for decoding.

        Args:
          x: ``[B, T, d_model]`` (compute dtype), the tokens after the cache's (positions
            ``0 .. T - 1`` for a fresh :meth:`init_cache`).
          cache: ``{"state": [B, H, 1+F+F^2, head_dim+1] float32}``, the initial state.
        Returns:
          ``(y [B, T, d_model], {"state": final state})`` from one
          :func:`~efficient_arch.ops.linear_recurrence.gated_linear_attention` call,
          ``form="chunked"`` with ``cfg.chunk_size``.
        """
        q, k, v = self._projections(x)
        o, s = gated_linear_attention(q, k, v, None, initial_state=cache["state"], form="chunked",
                                      chunk_size=self.chunk_size, normalize=True, feature_map="taylor")
        return self._output(o), {"state": s}

    @staticmethod
    def flops_per_token(cfg, seq_len: int, *, attention: str = "causal") -> float:
        """Forward FLOPs per token of the form ``cfg.mixer_form`` executes.

        ``K = 1 + F + F^2`` (Taylor features), ``V = head_dim``, normalised::

            projections   2 d H (2F + head_dim) + 2 H head_dim d
            linear attn   flops_gated_linear_attention(T, H, K, V, form, chunk_size, normalize=True,
                                                       score_dim=F if chunked)
                            chunked: H [2 C (F + V) + 4 K V + 2 K] (scores from the F-wide q.k);
                            recurrent 5 H K (V + 1); quadratic 2 H T (K + V + 1)

        The feature map (``F^2`` multiplies per head for q and k), the chunked form's score kernel
        ``1 + s + s^2/2`` and the normalising division are elementwise and not counted.
        ``attention`` does not apply and is only validated.

        Raises:
          ValueError: unknown ``attention`` convention or form.
        """
        check_flop_attention(attention)
        d, h, hd, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.feature_dim
        proj = 2.0 * d * h * (2 * f + hd) + 2.0 * h * hd * d
        la = flops_gated_linear_attention(seq_len, h, 1 + f + f * f, hd, form=cfg.mixer_form,
                                          chunk_size=cfg.chunk_size, vector_decay=False, has_decay=False,
                                          normalize=True, score_dim=f if cfg.mixer_form == "chunked" else None)
        return proj + la
