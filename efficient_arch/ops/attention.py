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

Layout: the ``G`` query heads that share a KV head are folded into the query rows (``[B, K, G*T,
H]``, the usual GQA trick), so scores and probabilities are 4-D ``[B, K, G*T, S]`` arrays. With a
``G`` axis of its own (size 1 for multi-head attention), XLA:CPU laid the scores out key-major
and the mask, softmax and ``ds`` passes each ran a ``T x S`` transpose: folded, the bench-size
causal layer fwd+bwd runs 1.59x faster on one core (benchmarks/NOTES.md, session 6).

:func:`blocked_attention` runs the core per block of queries over only the keys the block can see
(causal: ``(n + 1) / (2 n)`` of the square for ``n`` blocks); :func:`key_ranges` gives the blocks
and :func:`executed_pairs` their size, which the hardware FLOP count uses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from efficient_arch.ops import dots
from efficient_arch.ops import scan as scan_lib

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
    return _fwd(q, k, v, allowed, scale, dtype)[0]  # residuals unused here: XLA drops them


def _fold(x):
    """``[B, T, K, G, H]`` -> ``[B, K, G*T, H]``: each KV head's query rows, all groups stacked."""
    b, t, kv, g, h = x.shape
    return jnp.moveaxis(x, 1, 3).reshape(b, kv, g * t, h)


def _unfold(x, g):
    """Inverse of :func:`_fold`."""
    b, kv, gt, h = x.shape
    return jnp.moveaxis(x.reshape(b, kv, g, gt // g, h), 3, 1)


def _as_5d(allowed):
    """``allowed`` broadcastable to ``[B, K, G, T, S]`` with leading size-1 axes added to 5-D."""
    return allowed.reshape((1,) * (5 - allowed.ndim) + allowed.shape)


def _fold_mask(allowed, g, t):
    """``allowed`` (broadcastable to ``[B, K, G, T, S]``) -> ``[B|1, K|1, G*T, S]``."""
    allowed = _as_5d(allowed)
    b, kv, ga, ta, s = allowed.shape
    if (ga, ta) == (1, 1):  # one row for all queries (a key-padding mask): stays broadcast
        return allowed.reshape(b, kv, 1, s)
    if (ga, ta) != (g, t):  # the G*T folded rows need both axes in full
        allowed = jnp.broadcast_to(allowed, (b, kv, g, t, s))
    return allowed.reshape(b, kv, g * t, s)


def _forward(q, k, v, allowed, scale, dtype):
    """Folded forward: ``q [B, K, G*T, H]``, ``allowed [.., G*T, S]`` -> ``(o [B, K, G*T, H], p)``."""
    s = _dot("bkqh,bskh->bkqs", q, k, dtype) * scale
    p = jax.nn.softmax(jnp.where(allowed, s, _NEG), axis=-1).astype(dtype)
    o = _dot("bkqs,bskh->bkqh", p, v, dtype).astype(dtype)
    return o, p


def _fwd(q, k, v, allowed, scale, dtype):
    g = q.shape[3]
    qf, mask = _fold(q).astype(dtype), _fold_mask(allowed, g, q.shape[1])
    o, p = _forward(qf, k, v, mask, scale, dtype)
    # rows with nothing allowed: their (uniform) probabilities do not depend on q, k
    row_ok = jnp.any(mask, axis=-1, keepdims=True)
    # zero-size arrays carry the primal dtypes (residuals must be arrays)
    return _unfold(o, g), (q.astype(dtype), k.astype(dtype), v.astype(dtype), p, o, row_ok,
                           jnp.zeros((0,), q.dtype), jnp.zeros((0,), k.dtype), jnp.zeros((0,), v.dtype))


def _grads(scale, dtype, res, do):
    """``(dq [B, T, K, G, H], dk [B, K, H, S], dv [B, K, H, S])`` in the accumulation dtype; dk
    and dv in the products' head-dim-major layout (the callers transpose them)."""
    q, k, v, p, o, row_ok = res[:6]
    b, t, kv, g, _ = q.shape
    dof = _fold(do)
    dp = _dot("bkqh,bskh->bkqs", dof, v, dtype)
    pf = p.astype(dp.dtype)
    # rowsum(p * dp) = rowsum(do * o): a sum over the head dim, not over the S keys (FlashAttention's D)
    d = jnp.sum(dof.astype(dp.dtype) * o.astype(dp.dtype), axis=-1, keepdims=True)  # [B, K, G*T, 1]
    ds = jnp.where(row_ok, pf * (dp - d), 0.0)
    dq = _dot("bkqs,bskh->bkqh", ds, k, dtype) * scale
    dq = _unfold(dq, g)
    # dk, dv as [B, K, H, S], then -> [B, S, K, H]. Both operands of these products are query-major.
    # float32: straight from the folded q, do. 16-bit: XLA:CPU runs a dot contracting a non-minor dim
    # of both operands in float32, so q, do enter in their [B, T, K, G, H] layout (XLA copies them
    # head-dim-major): all-bf16 products, 1.08x the folded form; in float32 the folded is 1.1x faster.
    if jnp.dtype(dtype).itemsize >= 4:
        dk = _dot("bkqh,bkqs->bkhs", _fold(q), ds, dtype)
        dv = _dot("bkqh,bkqs->bkhs", dof, p, dtype)
    else:
        ds, p = ds.reshape(b, kv, g, t, -1), p.reshape(b, kv, g, t, -1)
        dk = _dot("btkgh,bkgts->bkhs", q, ds, dtype)
        dv = _dot("btkgh,bkgts->bkhs", do, p, dtype)
    return dq, dk * scale, dv


def _bskh(x, dtype):
    """A key / value gradient ``[B, K, H, S]`` -> ``[B, S, K, H]`` in ``dtype``."""
    return jnp.transpose(x, (0, 3, 1, 2)).astype(dtype)


def _bwd(scale, dtype, res, do):
    q0, k0, v0 = res[6:]
    dq, dk, dv = _grads(scale, dtype, res, do)
    return dq.astype(q0.dtype), _bskh(dk, k0.dtype), _bskh(dv, v0.dtype), None  # mask: no gradient


attention_core.defvjp(_fwd, _bwd)


def _block_args(q, k, v, allowed, block):
    """One query block's ``q``, ``k``, ``v`` and mask (``block = (q0, q1, k0, k1)``)."""
    q0, q1, k0, k1 = block
    a = allowed[..., q0:q1, :] if allowed.shape[-2] != 1 else allowed
    a = a[..., k0:k1] if a.shape[-1] != 1 else a
    return q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], a


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blocked(q, k, v, allowed, scale, dtype, ranges):
    """:func:`attention_core` per block of ``ranges`` (which partition the queries, in order),
    outputs concatenated: ``[B, T, K, G, H]``. One backward for all blocks: each block's ``dk``,
    ``dv`` are summed in the accumulation dtype in the products' ``[B, K, H, S]`` layout, stored,
    and transposed once (autodiff of the per-block calls summed the blocks' transposed
    cotangents in the compute dtype inside one fusion, whose transposes took XLA:CPU's elemental
    path: benchmarks/NOTES.md, session 8)."""
    return _blocked_fwd(q, k, v, allowed, scale, dtype, ranges)[0]


def _blocked_fwd(q, k, v, allowed, scale, dtype, ranges):
    outs, res = zip(*(_fwd(*_block_args(q, k, v, allowed, blk), scale, dtype) for blk in ranges))
    return jnp.concatenate(outs, axis=1), (res, jnp.zeros((0, k.shape[1]), bool))


def _blocked_bwd(scale, dtype, ranges, res, do):
    res, s_len = res
    q0, k0, v0 = res[0][6:]
    b, _, kv, _, h = res[0][0].shape
    zeros = jnp.zeros((b, kv, h, s_len.shape[1]), dots.acc_dtype(dtype))
    dq, dk, dv = [], zeros, zeros
    for (t0, t1, s0, s1), r in zip(ranges, res):
        dq_i, dk_i, dv_i = _grads(scale, dtype, r, do[:, t0:t1])
        dq.append(dq_i)
        dk, dv = dk.at[..., s0:s1].add(dk_i), dv.at[..., s0:s1].add(dv_i)
    dk, dv = scan_lib.materialize_on_cpu(dk), scan_lib.materialize_on_cpu(dv)  # then one transpose each
    return jnp.concatenate(dq, axis=1).astype(q0.dtype), _bskh(dk, k0.dtype), _bskh(dv, v0.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


QUERY_BLOCK = 128  # smallest query block of blocked_attention; 0 = never split (benchmarks/NOTES.md, session 6)
QUERY_BLOCKS = 4  # blocks per sequence when T / 4 > QUERY_BLOCK


def query_block(t: int) -> int:
    """Query rows per block for ``t`` queries: ``max(QUERY_BLOCK, ceil(t / QUERY_BLOCKS))``
    (0 if ``QUERY_BLOCK`` is 0). Measured on a 2-core CPU, causal fwd+bwd, vs the unsplit square:
    T = 512 blocks of 128 2.0x, of 256 1.85x; T = 2048 blocks of 512 2.96x, of 256 2.64x, of
    1024 2.44x (more blocks save more products but each adds slicing and gradient sums)."""
    return 0 if QUERY_BLOCK <= 0 else max(QUERY_BLOCK, -(-t // QUERY_BLOCKS))


def key_ranges(t: int, s: int, *, is_causal: bool, local_window_size: tuple[int, int] | None = None,
               block: int | None = None) -> tuple[tuple[int, int, int, int], ...]:
    """Static ``(q0, q1, k0, k1)`` per block of ``block`` queries: the keys ``k0 .. k1 - 1`` that
    any query ``q0 .. q1 - 1`` may see under the causal / local-window mask (query ``i`` sees key
    ``j`` iff ``j <= i`` when causal and ``i - left <= j <= i + right`` with a window).

    ``block`` None takes :func:`query_block`. Without a causal or window bound (or ``block <=
    0``), one range: the whole ``T x S`` square. With ``T != S`` the masks are aligned top-left
    (query ``i`` and key ``i`` at the same position), as ``layers.dot_product_attention`` builds
    them. A block whose windows reach no key at all is given all ``S`` keys (its rows are empty
    and average all values).
    """
    block = query_block(t) if block is None else block
    if block <= 0 or (not is_causal and local_window_size is None):
        return ((0, t, 0, s),)
    left, right = local_window_size if local_window_size is not None else (s, s)
    if is_causal:
        right = min(right, 0)
    out = []
    for q0 in range(0, t, block):
        q1 = min(t, q0 + block)
        k0, k1 = max(0, q0 - left), min(s, q1 + right)
        out.append((q0, q1, k0, k1) if k1 > k0 else (q0, q1, 0, s))
    return tuple(out)


def executed_pairs(ranges) -> int:
    """(query, key) pairs :func:`blocked_attention` scores for ``ranges`` (:func:`key_ranges`):
    each score and value product runs ``2 H`` FLOPs per pair and (batch, query head)."""
    return sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in ranges)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, scale: float, dtype,
                      ranges) -> jax.Array:
    """:func:`attention_core` per query block over only the keys the block may see.

    Same arguments and result as :func:`attention_core` plus ``ranges`` (:func:`key_ranges`),
    which must cover every allowed key of each block (keys outside a block's range are treated
    as masked). Causal attention in blocks of ``T / n`` queries scores ``(n + 1) / (2 n)`` of the
    ``T x S`` square (62.5% for ``n = 4``); the products and softmax passes shrink alike. A query row
    with nothing allowed averages ``v`` over all ``S`` keys, as :func:`attention_core` does.
    The blocks' key / value gradients are summed in float32 and stored once before one transpose
    (:func:`efficient_arch.ops.scan.materialize_on_cpu`): a NaN in the first element of that sum
    makes the whole ``dk`` (or ``dv``) NaN, every batch row included. ``scale`` must be a Python
    float (a static argument of the custom VJPs).

    Raises:
      ValueError: ``ranges`` do not partition the queries ``[0, T)`` in order, or a key range is
        not within ``[0, S)`` and non-empty.
    """
    b, t = q.shape[:2]
    s = k.shape[1]
    ends = [r[1] for r in ranges]
    if (not ranges or ranges[0][0] != 0 or ends[-1] != t or any(r[0] != e for r, e in zip(ranges[1:], ends))
            or any(not (r[0] < r[1] and 0 <= r[2] < r[3] <= s) for r in ranges)):
        raise ValueError(f"blocked_attention: ranges must be (q0, q1, k0, k1) blocks partitioning the "
                         f"queries [0, {t}) in order with 0 <= k0 < k1 <= {s} (see key_ranges); got {ranges}")
    allowed = _as_5d(allowed)
    if len(ranges) == 1 and ranges[0] == (0, t, 0, s):
        return attention_core(q, k, v, allowed, scale, dtype)
    o = _blocked(q, k, v, allowed, scale, dtype, tuple(map(tuple, ranges)))
    # rows with nothing allowed: the mean of all S values (attention_core's uniform average)
    empty = jnp.moveaxis(~jnp.any(allowed, axis=-1), -1, 1)[..., None]  # [B|1, T, K|1, G|1, 1]
    mean_v = jnp.mean(v.astype(dots.acc_dtype(dtype)), axis=1)[:, None, :, None].astype(o.dtype)
    return jnp.where(empty, mean_v, o)
