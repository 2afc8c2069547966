"""DeltaNet: linear attention with the delta-rule state update.

Schlag, Irie & Schmidhuber 2021 (the delta rule as a fast-weight update); Yang, Wang, Zhang, Shen &
Kim 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (chunked
UT-transform form, and the layer used here, Sec. 3.3 / 4.1)::

    q, k, v = SiLU(ShortConv(x W_q)), SiLU(ShortConv(x W_k)), SiLU(ShortConv(x W_v))   per head
    q, k    = q / ||q||, k / ||k||                           (L2 normalisation, Yang et al. Sec 3.3)
    beta    = sigmoid(x W_beta)                                [B, T, H]
    S_t     = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ,  o_t = q_t S_t
    y       = RMSNorm_head(o) W_o

Choices: no output gate for DeltaNet (the paper's default layer; Gated DeltaNet adds one), no
``1/sqrt(K)`` query scale (the per-head RMSNorm after the recurrence makes the output invariant to
it), keys and values both of width ``cfg.head_dim`` with ``cfg.n_heads`` heads (``n_kv_heads`` is
not used). The short convolution is one depthwise causal conv of width ``cfg.conv_width`` over the
concatenated q, k, v channels (``ops/conv.py``), reset at document boundaries.

Parameters: ``w_qkv [d_model, n_heads, 3, head_dim]``, ``conv [conv_width, n_heads, 3, head_dim]``,
``w_beta [d_model, n_heads]``, ``o_norm.scale [head_dim]``, ``w_o [n_heads, head_dim, d_model]``.
The recurrence itself is ``ops/delta_rule.py``; form (``cfg.mixer_form``: chunked | recurrent)
and chunk length (``cfg.chunk_size``) come from the config.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_arch import parallel
from efficient_arch.config import check_flop_attention
from efficient_arch.models.layers import RMSNorm, dtype_of, matmul, param
from efficient_arch.ops.conv import causal_conv1d, conv_step, flops_causal_conv1d
from efficient_arch.ops.delta_rule import FORMS, delta_rule, delta_rule_step, flops_delta_rule

L2_EPS = 1e-6


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / sqrt(sum x^2 + eps)`` over the last axis, computed in float32; returns ``x.dtype``."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + L2_EPS)).astype(x.dtype)


def _form(cfg) -> str:
    if cfg.mixer_form not in FORMS:
        raise ValueError(f"config.model.mixer_form={cfg.mixer_form!r}: the delta-rule mixers run the "
                         f"forms {FORMS} (there is no quadratic form); set model.mixer_form")
    return cfg.mixer_form


class DeltaNet(nnx.Module):
    """DeltaNet sequence mixer (module docstring). ``cfg`` is the finalized ``config.model``."""

    gated = False  # Gated DeltaNet: scalar data-dependent decay per head + SiLU output gate
    forms = FORMS  # the model.mixer_form values this mixer runs (config validation reads it)

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, h, hd, w = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.conv_width
        self.n_heads, self.head_dim, self.conv_width = h, hd, w
        self.form, self.chunk_size = _form(cfg), cfg.chunk_size
        self.dtype = dtype_of(cfg.dtype)
        self.w_qkv = param(rngs, (d, h, 3, hd), ("embed", "heads", None, "head_dim"), std=cfg.init_std)
        self.conv = param(rngs, (w, h, 3, hd), (None, "heads", None, "head_dim"), std=1.0 / math.sqrt(w))
        self.w_beta = param(rngs, (d, h), ("embed", "heads"), std=cfg.init_std)
        self.o_norm = RMSNorm(hd, eps=cfg.norm_eps, rngs=rngs, names=("head_dim",))
        self.w_o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                         std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self._init_gating(cfg, rngs)

    def _init_gating(self, cfg, rngs):
        """Hook for subclasses (Gated DeltaNet adds its decay and output-gate parameters)."""

    # -- pieces shared by the training and decoding paths -------------------------------------

    def _conv_weight(self):
        return self.conv[...].reshape(self.conv_width, -1)  # [W, H*3*hd], H outermost

    def _qkv(self, y):
        """Conv output ``[B, T, H*3*hd]`` -> SiLU, split, L2-normalised q, k and v ``[B,T,H,hd]``."""
        b, t = y.shape[:2]
        y = jax.nn.silu(y.astype(jnp.float32)).astype(self.dtype)
        y = y.reshape(b, t, self.n_heads, 3, self.head_dim)
        q, k, v = y[..., 0, :], y[..., 1, :], y[..., 2, :]
        return l2_normalize(q), l2_normalize(k), v

    def _beta(self, x):
        """``[B, T, H]`` float32 writing strength in (0, 1)."""
        return jax.nn.sigmoid(matmul("btd,dh->bth", x, self.w_beta[...], self.dtype).astype(jnp.float32))

    def _log_decay(self, x):
        """``[B, T, H]`` float32 log decay, or None (DeltaNet: no decay)."""
        return None

    def _output(self, x, o):
        """Per-head RMSNorm (and the gate in subclasses), then ``W_o``: ``[B,T,H,hd]`` -> ``[B,T,D]``."""
        o = self.o_norm(o.astype(self.dtype))
        o = self._gate(x, o)
        o = parallel.constrain(o, ("batch", "seq", "act_heads", None))
        return matmul("bthk,hkd->btd", o, self.w_o[...], self.dtype)

    def _gate(self, x, o):
        return o

    # -- the mixer contract ---------------------------------------------------------------

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Mix the sequence.

        Args:
          x: ``[B, T, d_model]`` in the compute dtype.
          segment_ids: optional int ``[B, T]``; the conv and the recurrent state reset at every
            change of id (packed documents).
          positions: ignored (no positional encoding: order comes from the recurrence).
        Returns:
          ``[B, T, d_model]`` in the compute dtype.
        Raises:
          ValueError: from ``ops.delta_rule`` on inconsistent shapes.
        """
        del positions
        b, t, _ = x.shape
        qkv = matmul("btd,dhck->bthck", x, self.w_qkv[...], self.dtype).reshape(b, t, -1)
        qkv = causal_conv1d(qkv, self._conv_weight(), segment_ids=segment_ids)
        q, k, v = self._qkv(qkv)
        q = parallel.constrain(q, ("batch", "seq", "act_heads", None))
        k = parallel.constrain(k, ("batch", "seq", "act_heads", None))
        v = parallel.constrain(v, ("batch", "seq", "act_heads", None))
        o, _ = delta_rule(q, k, v, self._beta(x), self._log_decay(x), segment_ids=segment_ids,
                          form=self.form, chunk_size=self.chunk_size)
        return self._output(x, o)

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, jax.Array]:
        """Constant-size cache: ``conv [B, conv_width - 1, 3 H hd]`` (compute dtype) and
        ``state [B, H, hd, hd]`` float32. ``max_len`` is unused (the state does not grow)."""
        del max_len
        h, hd = self.n_heads, self.head_dim
        return {"conv": jnp.zeros((batch_size, self.conv_width - 1, 3 * h * hd), self.dtype),
                "state": jnp.zeros((batch_size, h, hd, hd), jnp.float32)}

    def decode(self, x: jax.Array, cache: dict, *, position=None) -> tuple[jax.Array, dict]:
        """One token: ``x [B, 1, d_model]`` -> ``(y [B, 1, d_model], cache)``; ``position`` unused.

        Equals the ``t``-th output of ``__call__`` on the first ``t + 1`` tokens (without
        segment ids) when the cache holds the first ``t`` tokens.
        """
        del position
        qkv = matmul("btd,dhck->bthck", x, self.w_qkv[...], self.dtype).reshape(x.shape[0], -1)
        y, conv = conv_step(qkv, cache["conv"], self._conv_weight())
        q, k, v = self._qkv(y[:, None])
        ld = self._log_decay(x)
        o, state = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], self._beta(x)[:, 0],
                                   None if ld is None else ld[:, 0], cache["state"])
        return self._output(x, o[:, None]), {"conv": conv, "state": state}

    def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """The prompt in the chunked (UT-transform) form, returning the conv tail and the state.

        Args:
          x: ``[B, T, d_model]`` (compute dtype), the tokens after the cache's (positions
            ``0 .. T - 1`` for a fresh :meth:`init_cache`).
          cache: ``conv [B, conv_width - 1, 3 H hd]`` (the last conv inputs) and
            ``state [B, H, hd, hd]`` float32 (the initial state).
        Returns:
          ``(y [B, T, d_model], cache)``: the conv continues after the cached tail
          (:func:`~efficient_arch.models.mixers.mamba2.conv_prefill`) and keeps the prompt's last
          ``conv_width - 1`` inputs; the recurrence is one
          :func:`~efficient_arch.ops.delta_rule.delta_rule` call, ``form="chunked"`` with
          ``cfg.chunk_size``, returning its final state.
        """
        from efficient_arch.models.mixers.mamba2 import conv_prefill

        b, t, _ = x.shape
        qkv = matmul("btd,dhck->bthck", x, self.w_qkv[...], self.dtype).reshape(b, t, -1)
        qkv, conv = conv_prefill(qkv, cache["conv"], self._conv_weight())
        q, k, v = self._qkv(qkv)
        o, state = delta_rule(q, k, v, self._beta(x), self._log_decay(x), initial_state=cache["state"],
                              form="chunked", chunk_size=self.chunk_size)
        return self._output(x, o), {"conv": conv, "state": state}

    @classmethod
    def flops_per_token(cls, cfg, seq_len: int, *, attention: str = "causal") -> float:
        """Forward FLOPs per token of one layer (``attention`` is only validated: no softmax attention).

        With ``d = d_model``, ``H = n_heads``, ``K = V = head_dim``, ``W = conv_width``:
          projections ``2 d (3 H K) + 2 d H`` (q, k, v, beta) ``+ 2 H V d`` (output)
          (+ Gated DeltaNet: ``2 d H`` decay, ``2 d H V`` output gate),
          short conv ``2 W 3 H K`` (depthwise multiply-adds),
          recurrence :func:`efficient_arch.ops.delta_rule.flops_delta_rule` of ``cfg.mixer_form``.
        Norms, SiLU, sigmoid and the gate's elementwise product are not counted.
        """
        check_flop_attention(attention)
        d, h, hd, w = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.conv_width
        proj = 2.0 * d * 3 * h * hd + 2.0 * d * h + 2.0 * h * hd * d
        if cls.gated:
            proj += 2.0 * d * h + 2.0 * d * h * hd
        conv = flops_causal_conv1d(3 * h * hd, w)
        core = flops_delta_rule(seq_len, h, hd, hd, form=_form(cfg), chunk_size=cfg.chunk_size,
                                gated=cls.gated)
        return proj + conv + core
