"""Sliding-window (local) causal softmax attention with GQA and RoPE.

Each query attends to the last ``W = cfg.window_size`` tokens *including itself*: token ``t`` sees
keys ``max(0, t - W + 1) .. t`` (Beltagy et al. 2020, Longformer, Sec. 3.1 "sliding window";
Child et al. 2019 local attention; the SWA layers of Arora et al. 2024 "Based", Sec. 4, and of
Mistral 7B use the same mask). Within the window it is exactly the attention of
``attention.py`` (Vaswani et al. 2017 eq. 1, GQA, RoPE): this class subclasses
:class:`~efficient_arch.models.mixers.attention.Attention` and reuses its parameters and init.

Training forms (``cfg.mixer_form``):

* ``"quadratic"``: ``layers.dot_product_attention(..., local_window_size=(W - 1, 0))``, the
  masked full form. It computes the full masked ``T x T`` score matrix, so *executed* FLOPs grow with ``T^2``
  although only ``~W`` keys per query matter.
* ``"chunked"`` (default) and ``"recurrent"`` (softmax attention has no recurrent training form;
  it runs the blocked form too): a **blocked** form. The sequence is cut into blocks of ``W``
  tokens; block ``n``'s queries attend to the keys of blocks ``n - 1`` and ``n`` (``2W`` keys)
  under the window mask. Executed FLOPs scale with ``W``, not ``T``. When ``W >= T`` the window
  covers everything and the quadratic form is used (same numbers, fewer FLOPs).

Decoding keeps a ring buffer of the last ``min(W, max_len)`` keys/values (RoPE already applied):
position ``p`` writes slot ``p mod W``; constant memory in the sequence length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_arch import parallel
from efficient_arch.config import check_flop_attention
from efficient_arch.models.layers import dot_product_attention, matmul
from efficient_arch.models.mixers.attention import Attention, segment_mask
from efficient_arch.ops.attention import attention_core, executed_pairs, key_ranges


def _uses_blocked(form: str, window: int, seq_len: int) -> bool:
    return form in ("chunked", "recurrent") and window < seq_len


def blocked_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int, *,
                            segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal sliding-window softmax attention computed block by block.

    ``o_t = sum_{s = t-W+1}^{t} softmax_s(q_t . k_s / sqrt(D)) v_s`` (keys of other segments
    excluded). Blocks of ``W`` queries attend to ``2W`` keys (previous block + own block), so the
    work is ``O(T W)`` instead of the ``O(T^2)`` of a masked full-square form. Each block is one
    batch row of :func:`efficient_arch.ops.attention.attention_core` (its backward keeps only the
    probabilities; softmax in float32).

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, T, KV, D]`` with ``H % KV == 0`` (GQA).
      window: ``W >= 1``, number of visible keys including the query's own.
      segment_ids: optional int ``[B, T]``.
    Returns:
      ``[B, T, H, D]`` in ``q.dtype``; scores and softmax in float32.
    FLOPs:
      executed ``8 W H D`` per (padded) token: ``QK^T`` and ``PV`` over ``2W`` keys each
      (``T`` is padded up to a multiple of ``W``).
    Raises:
      ValueError: if ``H`` is not a multiple of ``KV`` or ``window < 1``.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    if window < 1 or h % kvh:
        raise ValueError(f"need window >= 1 and n_heads % n_kv_heads == 0; got window={window}, "
                         f"heads {h}/{kvh}")
    g = h // kvh
    c = window
    n = -(-t // c)
    pad = n * c - t
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    qb = q.reshape(b, n, c, kvh, g, d)

    def two_blocks(a):  # [B, T', ...] -> [B, N, 2c, ...]: previous block (zeros for n = 0) + own
        a = a.reshape((b, n, c) + a.shape[2:])
        prev = jnp.pad(a[:, :-1], ((0, 0), (1, 0)) + ((0, 0),) * (a.ndim - 2))
        return jnp.concatenate([prev, a], axis=2)

    kb, vb = (two_blocks(a).reshape(b * n, 2 * c, kvh, d) for a in (k, v))
    i = jnp.arange(c)[:, None]
    j = jnp.arange(2 * c)[None, :]
    diff = c + i - j  # query position minus key position
    mask = (diff >= 0) & (diff < window)  # [c, 2c]
    mask = mask[None] & ((jnp.arange(n)[:, None, None] > 0) | (j >= c)[None])  # [N, c, 2c]; no keys < 0
    mask = jnp.broadcast_to(mask[None], (b, n, c, 2 * c))
    if segment_ids is not None:
        seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
        seg_q = seg.reshape(b, n, c)
        seg_k = two_blocks(seg)
        mask = mask & (seg_q[..., :, None] == seg_k[..., None, :])
    # each block is a batch row of the softmax attention core (its backward keeps only p)
    o = attention_core(qb.reshape(b * n, c, kvh, g, d), kb, vb, mask.reshape(b * n, 1, 1, c, 2 * c),
                       1.0 / math.sqrt(d), q.dtype)
    return o.reshape(b, n * c, h, d)[:, :t]


class SlidingWindowAttention(Attention):
    """Local causal attention over the last ``cfg.window_size`` tokens (GQA + RoPE).

    Parameters are those of :class:`Attention` (``wq``, ``wkv``, ``wo``). Config fields:
    ``window_size``, ``mixer_form`` (see the module docstring), plus the attention fields.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.window = int(cfg.window_size)
        self.form = cfg.mixer_form

    def _out(self, o):
        o = parallel.constrain(o.astype(self.dtype), ("batch", "seq", "act_heads", None))
        return matmul("bthk,hkd->btd", o, self.wo[...], self.dtype)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Sliding-window causal attention.

        Args:
          x: ``[B, T, d_model]`` compute dtype; segment_ids: optional int ``[B, T]``;
          positions: optional int ``[B, T]`` RoPE positions (default ``arange(T)``; the window is
            always over sequence indices).
        Returns:
          ``[B, T, d_model]`` in the compute dtype.
        """
        t = x.shape[1]
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)
        q, k, v = self._qkv(x, positions)  # Attention's projections + RoPE
        q = parallel.constrain(q, ("batch", "seq", "act_heads", None))
        k = parallel.constrain(k, ("batch", "seq", "act_kv_heads", None))
        v = parallel.constrain(v, ("batch", "seq", "act_kv_heads", None))
        if _uses_blocked(self.form, self.window, t):
            o = blocked_local_attention(q, k, v, self.window, segment_ids=segment_ids)
        else:
            o = dot_product_attention(q, k, v, mask=segment_mask(segment_ids), is_causal=True,
                                             local_window_size=(self.window - 1, 0), dtype=self.dtype)
        return self._out(o)

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, jax.Array]:
        """Ring buffer ``{"k", "v"}: [batch_size, S, n_kv_heads, head_dim]`` (compute dtype),
        ``S = min(window_size, max_len)``; keys are stored with RoPE applied."""
        s = min(self.window, max_len)
        shape = (batch_size, s, self.n_kv_heads, self.head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def decode(self, x: jax.Array, cache: dict, *, position) -> tuple[jax.Array, dict]:
        """One token: ``x [B, 1, d_model]`` at int32 scalar ``position`` (0-based, tokens
        ``0 .. position - 1`` already decoded) -> ``(y [B, 1, d_model], cache)``.

        Writes slot ``position mod S`` and attends over the valid slots (all of them once
        ``position >= S - 1``). FLOPs: projections + ``4 H D S``.
        """
        position = jnp.asarray(position, jnp.int32)
        s = cache["k"].shape[1]
        q, k, v = self._qkv(x, jnp.full((x.shape[0], 1), position))
        slot = position % s
        zero = jnp.zeros((), jnp.int32)
        ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (zero, slot, zero, zero))
        cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (zero, slot, zero, zero))
        valid = (jnp.arange(s) <= position)[None, None, None, :]
        o = jax.nn.dot_product_attention(q, ck, cv, mask=valid, implementation="xla")
        return self._out(o), {"k": ck, "v": cv}

    def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """The prompt in the training form (blocked or quadratic, as ``__call__``), filling the
        ring buffer for decoding.

        Args:
          x: ``[B, T, d_model]`` (compute dtype), the tokens at positions ``0 .. T - 1``.
          cache: a fresh :meth:`init_cache` ring buffer ``[B, S, n_kv_heads, head_dim]``.
        Returns:
          ``(y [B, T, d_model], cache)``: ``y`` is ``__call__(x)``; the last ``min(S, T)``
          prompt positions ``p`` hold their key/value in slot ``p mod S``, as :meth:`decode`
          at positions ``0 .. T - 1`` would have left them.
        Raises:
          ValueError: the buffer is shorter than the window (``S = max_len < window_size``) and
            the prompt longer than it: the cache cannot hold the keys the next token sees.
        """
        t, s = x.shape[1], cache["k"].shape[1]
        if s < self.window and t > s:
            raise ValueError(f"sliding_window prefill: the prompt has {t} tokens but the cache holds "
                             f"{s} < window_size={self.window}; allocate init_cache(batch, max_len >= {t})")
        q, k, v = self._qkv(x, jnp.arange(t, dtype=jnp.int32))
        if _uses_blocked(self.form, self.window, t):
            o = blocked_local_attention(q, k, v, self.window)
        else:
            o = dot_product_attention(q, k, v, is_causal=True, local_window_size=(self.window - 1, 0),
                                      dtype=self.dtype)  # as __call__
        n = min(s, t)
        slots = jnp.arange(t - n, t) % s  # static: the last n positions, distinct slots
        cache = {"k": cache["k"].at[:, slots].set(k[:, t - n:].astype(cache["k"].dtype)),
                 "v": cache["v"].at[:, slots].set(v[:, t - n:].astype(cache["v"].dtype))}
        return self._out(o), cache

    @staticmethod
    def flops_per_token(cfg, seq_len: int, *, attention: str = "causal") -> float:
        """Forward FLOPs per token: projections + ``4 n_heads head_dim T_eff``.

        Projections as :meth:`Attention.flops_per_token`. ``T_eff`` (keys per query):

        * ``attention="causal"`` (model FLOPs, the MFU convention): the mean number of keys a
          query actually sees, ``(1/T) sum_{t=1}^{T} min(t, W)`` (= ``(T + 1) / 2`` if
          ``W >= T``, ``~W`` if ``W << T``). Independent of the executed form.
        * ``attention="full"``: blocked form ``2W * ceil(T/W) W / T`` (two blocks of keys per
          padded query), quadratic form (and ``W >= T``) ``T`` (the full square).
        * ``attention="executed"`` (hardware FLOPs of the form ``cfg.mixer_form`` runs): blocked
          form as ``"full"``; the quadratic form (also used when ``W >= T``) scores blocks of
          queries against the keys the block's windows reach (``ops.attention.key_ranges``).

        Softmax/RoPE elementwise work is not counted.

        Raises:
          ValueError: unknown ``attention`` convention.
        """
        check_flop_attention(attention)
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        w, t = int(cfg.window_size), int(seq_len)
        proj = 2.0 * d * (h + 2 * kv) * hd + 2.0 * h * hd * d
        if attention == "causal":
            m = min(w, t)
            t_eff = (m * (m + 1) / 2.0 + (t - m) * w) / t
        elif _uses_blocked(cfg.mixer_form, w, t):  # "full" / "executed": the blocked form's pairs
            t_eff = 2.0 * w * (-(-t // w) * w) / t
        elif attention == "full":
            t_eff = float(t)
        else:  # "executed"
            t_eff = executed_pairs(key_ranges(t, t, is_causal=True, local_window_size=(w - 1, 0))) / t
        return proj + 4.0 * h * hd * t_eff

    @staticmethod
    def decode_flops_per_token(cfg, context: int) -> float:
        """Forward FLOPs of one decode step (one new token, ``context`` tokens cached).

        Projections plus ``QK^T`` and ``AV`` over the ``min(window_size, context + 1)`` keys the
        new token sees (its own and the last ``window_size - 1`` cached):
        ``4 n_heads head_dim min(W, context + 1)``; :meth:`decode` scores every slot of the ring
        buffer (``min(W, max_len)``), the same once the buffer is full.
        """
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        keys = min(int(cfg.window_size), context + 1)
        return 2.0 * d * (h + 2 * kv) * hd + 2.0 * h * hd * d + 4.0 * h * hd * keys
