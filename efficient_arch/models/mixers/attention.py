"""Causal softmax self-attention with grouped-query heads (GQA/MQA) and RoPE.

Vaswani et al. 2017 (scaled dot-product attention, eq. 1); Ainslie et al. 2023 (GQA: ``n_heads``
query heads share ``n_kv_heads`` key/value heads); Su et al. 2021 (RoPE). The score/softmax/value
part is ``layers.dot_product_attention``: ``ops.attention.attention_core`` (softmax in float32, a
backward that keeps only the probabilities), or cuDNN's fused kernel on a GPU where it qualifies.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_arch import parallel
from efficient_arch.config import check_flop_attention
from efficient_arch.models.layers import apply_rope, dot_product_attention, dtype_of, matmul, param, rope_angles
from efficient_arch.ops.attention import executed_pairs, key_ranges


def segment_mask(segment_ids: jax.Array | None) -> jax.Array | None:
    """Boolean ``[B, 1, T, T]`` mask, True where query and key lie in the same packed document."""
    if segment_ids is None:
        return None
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


class Attention(nnx.Module):
    """Multi-head causal attention; ``n_kv_heads < n_heads`` gives GQA, ``n_kv_heads == 1`` MQA.

    Parameters: ``wq [d_model, n_heads, head_dim]``, ``wkv [d_model, 2, n_kv_heads, head_dim]``,
    ``wo [n_heads, head_dim, d_model]``.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = h, kv, hd
        self.rope_theta = cfg.rope_theta
        self.dtype = dtype_of(cfg.dtype)
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std=cfg.init_std)
        self.wkv = param(rngs, (d, 2, kv, hd), ("embed", None, "kv_heads", "head_dim"), std=cfg.init_std)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                        std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Causal attention over the sequence.

        Args:
          x: ``[B, T, d_model]`` in the compute dtype.
          segment_ids: optional int ``[B, T]``; tokens attend only within their own segment.
          positions: optional int ``[B, T]`` RoPE positions (default ``arange(T)``).
        Returns:
          ``[B, T, d_model]`` in the compute dtype.
        """
        if positions is None:
            positions = jnp.arange(x.shape[1], dtype=jnp.int32)
        q, k, v = self._qkv(x, positions)
        q = parallel.constrain(q, ("batch", "seq", "act_heads", None))
        k = parallel.constrain(k, ("batch", "seq", "act_kv_heads", None))
        v = parallel.constrain(v, ("batch", "seq", "act_kv_heads", None))
        o = dot_product_attention(q, k, v, mask=segment_mask(segment_ids), is_causal=True,
                                  dtype=self.dtype)
        o = parallel.constrain(o.astype(self.dtype), ("batch", "seq", "act_heads", None))
        return matmul("bthk,hkd->btd", o, self.wo[...], self.dtype)

    def _qkv(self, x, positions):
        sin, cos = rope_angles(positions, self.head_dim, self.rope_theta)
        q = matmul("btd,dhk->bthk", x, self.wq[...], self.dtype)
        kv = matmul("btd,dchk->btchk", x, self.wkv[...], self.dtype)
        return apply_rope(q, sin, cos), apply_rope(kv[:, :, 0], sin, cos), kv[:, :, 1]

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, jax.Array]:
        """KV cache: ``k``, ``v`` of shape ``[B, max_len, n_kv_heads, head_dim]`` (compute dtype)."""
        shape = (batch_size, max_len, self.n_kv_heads, self.head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def decode(self, x: jax.Array, cache: dict, *, position) -> tuple[jax.Array, dict]:
        """One token: ``x [B, 1, d_model]`` at index ``position`` (int32 scalar) -> ``(y, cache)``.

        Writes this token's key/value at ``position`` and attends to cache entries ``<= position``
        (2 n_heads head_dim max_len FLOPs per score/value product: the whole cache is read).
        ``position >= max_len`` (beyond the cache) yields NaN outputs rather than wrong ones.
        """
        b = x.shape[0]
        pos = jnp.asarray(position, jnp.int32)
        q, k, v = self._qkv(x, jnp.full((b, 1), pos))
        cache = {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(self.dtype), pos, axis=1),
                 "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(self.dtype), pos, axis=1)}
        visible = (jnp.arange(cache["k"].shape[1]) <= pos)[None, None, None, :]
        o = jax.nn.dot_product_attention(q, cache["k"], cache["v"], mask=visible, implementation="xla")
        # past the cache the write above would be clamped to the last slot: make that loud (NaN),
        # never a silently wrong token (a traced position cannot raise inside jit)
        o = jnp.where(pos < cache["k"].shape[1], o, jnp.nan)
        return matmul("bthk,hkd->btd", o.astype(self.dtype), self.wo[...], self.dtype), cache

    def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """The prompt in the parallel form, filling the KV cache for decoding.

        Args:
          x: ``[B, T, d_model]`` (compute dtype), the tokens at positions ``0 .. T - 1``.
          cache: a fresh :meth:`init_cache` ``(B, max_len)`` (its contents are overwritten).
        Returns:
          ``(y [B, T, d_model], cache)``: ``y`` is ``__call__(x)`` (causal attention over the
          prompt); cache slots ``0 .. T - 1`` hold the prompt's keys (RoPE applied) and values,
          as :meth:`decode` at positions ``0 .. T - 1`` would have written them.
        Raises:
          ValueError: ``T > max_len`` (the prompt does not fit the cache).
        """
        t, max_len = x.shape[1], cache["k"].shape[1]
        if t > max_len:
            raise ValueError(f"attention prefill: the prompt has {t} tokens but the KV cache holds "
                             f"{max_len}; allocate init_cache(batch, max_len >= {t})")
        q, k, v = self._qkv(x, jnp.arange(t, dtype=jnp.int32))
        o = dot_product_attention(q, k, v, is_causal=True, dtype=self.dtype)  # as __call__
        cache = {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), 0, axis=1),
                 "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), 0, axis=1)}
        return matmul("bthk,hkd->btd", o.astype(self.dtype), self.wo[...], self.dtype), cache

    @staticmethod
    def flops_per_token(cfg, seq_len: int, *, attention: str = "causal") -> float:
        """Forward FLOPs per token of one attention layer.

        Projections: ``2 d (n_heads + 2 n_kv_heads) head_dim + 2 n_heads head_dim d``.
        Scores ``QK^T`` and ``AV``: ``2 * 2 n_heads head_dim * T_eff`` with ``T_eff = T`` for the
        full-square convention (PaLM App. B, Kaplan Table 1 style), ``(T + 1) / 2`` — the mean
        number of visible keys — for the causal convention (MaxText / Megatron style), and for
        ``"executed"`` (hardware FLOPs) the keys the XLA form scores per query: whole blocks of
        queries against the keys up to the block's end (``ops.attention.key_ranges``: exactly
        ``5 T / 8`` for four equal blocks, ``T >= 512`` divisible by 4; ``T`` when the sequence is
        one block, ``T <= 128``). cuDNN's kernel, where it
        runs, skips the upper triangle at its own tile size; the count stays the XLA form's.
        Softmax and RoPE elementwise work is not counted (model FLOPs are matmul FLOPs).

        Raises:
          ValueError: unknown ``attention`` convention.
        """
        check_flop_attention(attention)
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        proj = 2.0 * d * (h + 2 * kv) * hd + 2.0 * h * hd * d
        if attention == "causal":
            t_eff = (seq_len + 1) / 2.0
        elif attention == "full":
            t_eff = float(seq_len)
        else:  # "executed"
            t_eff = executed_pairs(key_ranges(seq_len, seq_len, is_causal=True)) / seq_len
        return proj + 4.0 * h * hd * t_eff

    @staticmethod
    def decode_flops_per_token(cfg, context: int) -> float:
        """Forward FLOPs of one decode step (one new token, ``context`` tokens cached).

        Projections as :meth:`flops_per_token` plus ``QK^T`` and ``AV`` over the ``context + 1``
        visible keys (the cached ones and the new one): ``4 n_heads head_dim (context + 1)``.
        This is what a length-aware kernel computes; :meth:`decode` here scores all ``max_len``
        slots of the allocated cache (masked), i.e. ``max_len`` in place of ``context + 1``.
        """
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        return 2.0 * d * (h + 2 * kv) * hd + 2.0 * h * hd * d + 4.0 * h * hd * (context + 1)
