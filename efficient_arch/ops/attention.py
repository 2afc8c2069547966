"""Softmax attention core with a hand-written backward pass that keeps the probabilities, not the scores.

For one (batch, KV head, query-group) slice, with ``s = q k^T * scale`` masked to ``-inf`` where not
allowed (Vaswani et al. 2017, eq. 1)::

    p = softmax(s)            o = p v
    dv = p^T do               dp = do v^T
    ds = p * (dp - rowsum(p * dp))             (softmax Jacobian; rowsum(p dp) = rowsum(do o))
    dq = ds k * scale         dk = ds^T q * scale

This is the backward of FlashAttention (Dao et al. 2022, Alg. 4, ``D = rowsum(dO o O)``: a sum over
the head dim instead of ``rowsum(P o dP)`` over the ``S`` keys) without the tiling: the forward
saves ``q, k, v``, ``o`` and ``p`` (in the compute dtype), nothing else. Plain autodiff of the same
forward keeps the float32 scores, the masked scores and the float32 probabilities as well (3-4
``[B, H, T, S]`` arrays per layer; 1.2 GB of the 3.9 GB of temporaries of the bench train step),
and runs XLA:CPU's elementwise passes over them twice.

Matmuls take ``dtype`` inputs and accumulate in float32 (``preferred_element_type``); softmax and
its gradient are float32. Saved for the backward: ``q, k, v, o, p`` and one bool per query row.
FLOPs (XLA count): forward ``4 T S H`` per (batch, query head) plus the softmax; backward ``8 T S
H`` (four products). Same as autodiff of the forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from efficient_arch.ops import dots

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # as jax.nn.dot_product_attention's XLA form


_dot = dots.dot


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float,
                   dtype) -> jax.Array:
    """Masked softmax attention over grouped query heads.

    Args:
      q: ``[B, T, K, G, H]`` queries (``K`` KV heads, ``G`` query heads per KV head).
      k, v: ``[B, S, K, H]``.
      allowed: bool, broadcastable to ``[B, K, G, T, S]``; True = may attend. A row with nothing
        allowed averages ``v`` uniformly (as ``jax.nn.dot_product_attention``) and passes no
        gradient to ``q`` or ``k`` (its scores are constants).
      scale: score scale (``1 / sqrt(H)``).
      dtype: matmul input dtype (float32 / bfloat16 / float16; float64 in tests); accumulation is
        float32 (float64 for float64).
    Returns:
      ``[B, T, K, G, H]`` in ``dtype``.
    """
    return _forward(q, k, v, allowed, scale, dtype)[0]


def _forward(q, k, v, allowed, scale, dtype):
    s = _dot("btkgh,bskh->bkgts", q, k, dtype) * scale
    p = jax.nn.softmax(jnp.where(allowed, s, _NEG), axis=-1).astype(dtype)
    o = _dot("bkgts,bskh->btkgh", p, v, dtype).astype(dtype)
    return o, p


def _fwd(q, k, v, allowed, scale, dtype):
    o, p = _forward(q, k, v, allowed, scale, dtype)
    # rows with nothing allowed: their (uniform) probabilities do not depend on q, k
    row_ok = jnp.any(allowed, axis=-1, keepdims=True)
    # zero-size arrays carry the primal dtypes (residuals must be arrays)
    return o, (q.astype(dtype), k.astype(dtype), v.astype(dtype), p, o, row_ok,
               jnp.zeros((0,), q.dtype), jnp.zeros((0,), k.dtype), jnp.zeros((0,), v.dtype))


def _bwd(scale, dtype, res, do):
    q, k, v, p, o, row_ok, q0, k0, v0 = res
    dp = _dot("btkgh,bskh->bkgts", do, v, dtype)
    pf = p.astype(dp.dtype)
    # rowsum(p * dp) = rowsum(do * o): a sum over the head dim, not over the S keys (FlashAttention's D)
    d = jnp.sum(do.astype(dp.dtype) * o.astype(dp.dtype), axis=-1)  # [B, T, K, G]
    ds = jnp.where(row_ok, pf * (dp - jnp.moveaxis(d, 1, -1)[..., None]), 0.0)
    dq = _dot("bkgts,bskh->btkgh", ds, k, dtype) * scale
    dk = _dot("bkgts,btkgh->bskh", ds, q, dtype) * scale
    dv = _dot("bkgts,btkgh->bskh", p, do, dtype)
    return dq.astype(q0.dtype), dk.astype(k0.dtype), dv.astype(v0.dtype), None  # mask: no gradient


attention_core.defvjp(_fwd, _bwd)
