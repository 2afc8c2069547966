"""Shared building blocks: parameters with logical axes, RMSNorm, RoPE, SwiGLU MLP, embeddings.

Every parameter is created through :func:`param`, which attaches *logical* axis names
(``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``, ``expert``; the layer
stack adds ``layers``). Only ``efficient_arch/parallel.py`` maps those names to mesh axes.
Parameters are stored in ``param_dtype`` (float32); matmuls cast inputs to the compute dtype and
accumulate in float32 (``preferred_element_type``).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    """Map a config dtype name ("float32" | "bfloat16" | "float16") to a jnp dtype."""
    return DTYPES[name]


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], *, std: float | None,
          dtype=jnp.float32) -> nnx.Param:
    """Create an ``nnx.Param`` with logical axis names.

    Args:
      shape: parameter shape; ``len(names) == len(shape)``.
      names: one logical axis name (or None) per dimension.
      std: normal init standard deviation; None initialises to ones (norm scales), 0 to zeros.
    """
    assert len(shape) == len(names), (shape, names)
    if std is None:
        init = nnx.initializers.ones
    elif std == 0:
        init = nnx.initializers.zeros
    else:
        init = nnx.initializers.normal(std)
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), dtype))


def _grad_specs(spec: str) -> tuple[str, str] | None:
    """einsum specs of the two gradients of ``spec`` = ``"a,b->c"``: ``("c,b->a", "a,c->b")``.

    None when an index of one operand appears in neither the other operand nor the output (a
    sum over a single operand's axis, which the gradient would have to broadcast back).
    """
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    idx = lambda s: set(s.replace("...", "#"))  # noqa: E731  ("#" stands for the ellipsis dims)
    if not (idx(a) <= idx(b) | idx(out) and idx(b) <= idx(a) | idx(out)):
        return None
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _dot16(spec, dtype, out_dtype, x, w):
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _dot16_fwd(spec, dtype, out_dtype, x, w):
    xc, wc = x.astype(dtype), w.astype(dtype)
    y = jnp.einsum(spec, xc, wc, preferred_element_type=jnp.float32).astype(out_dtype)
    # zero-size arrays carry the primal dtypes to the backward pass (residuals must be arrays)
    return y, (xc, wc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _dot16_bwd(spec, dtype, out_dtype, res, g):
    xc, wc, x0, w0 = res
    gc = g.astype(dtype)
    sx, sw = _grad_specs(spec)
    dx = jnp.einsum(sx, gc, wc, preferred_element_type=jnp.float32).astype(x0.dtype)
    dw = jnp.einsum(sw, xc, gc, preferred_element_type=jnp.float32).astype(w0.dtype)
    return dx, dw


_dot16.defvjp(_dot16_fwd, _dot16_bwd)


def matmul(spec: str, x: jax.Array, w: jax.Array, dtype, out_dtype=None) -> jax.Array:
    """``einsum(spec, x, w)`` with inputs in the compute ``dtype``, float32 accumulation.

    Args:
      spec: two-operand einsum spec, e.g. ``"btd,dhk->bthk"``.
      x, w: arrays of any float dtype (cast to ``dtype``).
      dtype: compute dtype (float32 / bfloat16 / float16).
      out_dtype: result dtype (default ``dtype``; float32 for logits).
    Returns:
      ``einsum(spec, x, w)`` in ``out_dtype``.

    16-bit compute: the forward dot *and both backward dots* (d input, d weight) take 16-bit
    inputs with float32 accumulation (a custom VJP casts the incoming cotangent to ``dtype``);
    the gradients come back in the primal dtypes (float32 weight gradients, never rounded to 16
    bits). Plain autodiff would hand the backward dots a float32 cotangent, and XLA:CPU then runs
    them as float32 x float32 (measured in benchmarks/NOTES.md). float32 compute: a plain einsum.
    """
    out_dtype = dtype if out_dtype is None else out_dtype
    if jnp.dtype(dtype).itemsize >= 4 or _grad_specs(spec) is None:
        y = jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    return _dot16(spec, jnp.dtype(dtype), jnp.dtype(out_dtype), x, w)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          is_causal: bool = True, local_window_size: tuple[int, int] | None = None,
                          dtype=None) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads (Vaswani et al. 2017 eq. 1; GQA,
    Ainslie et al. 2023): ``softmax(q k^T / sqrt(head_dim) + masks) v``.

    Args:
      q: ``[B, T, n_heads, head_dim]``; k, v: ``[B, S, n_kv_heads, head_dim]``, ``n_heads %
        n_kv_heads == 0`` (query head ``i`` reads KV head ``i // (n_heads / n_kv_heads)``).
      mask: optional bool, broadcastable to ``[B, n_heads, T, S]``; True = may attend.
      is_causal: query ``i`` sees keys ``j <= i`` (T == S).
      local_window_size: ``(left, right)``: keys ``i - left <= j <= i + right`` only.
      dtype: compute dtype (default ``q.dtype``).
    Returns:
      ``[B, T, n_heads, head_dim]`` in ``dtype``. Softmax in float32; a fully masked row averages
      the values uniformly (as ``jax.nn.dot_product_attention``).

    Implementation: float32 uses ``jax.nn.dot_product_attention(implementation="xla")``. 16-bit
    compute uses the same math with both products through :func:`matmul` (16-bit inputs, float32
    accumulation, backward dots also 16-bit): XLA's form would hand the probabilities-times-values
    product and three of the four backward products to XLA:CPU as float32 dots.
    FLOPs: ``4 T S n_heads head_dim`` (masked entries included).
    """
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    if jnp.dtype(dtype).itemsize >= 4:
        return jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask,
                                            is_causal=is_causal, local_window_size=local_window_size,
                                            implementation="xla")
    b, t, n, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, hd)
    scores = matmul("btkgh,bskh->bkgts", qg, k, dtype, out_dtype=jnp.float32) * (1.0 / math.sqrt(hd))
    allowed = jnp.ones((t, s), bool)
    i, j = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
    if is_causal:
        allowed &= j <= i
    if local_window_size is not None:
        left, right = local_window_size
        allowed &= (j >= i - left) & (j <= i + right)
    allowed = allowed[None, None, None]
    if mask is not None:
        m = jnp.broadcast_to(mask, mask.shape[:1] + (n,) + mask.shape[2:]) if mask.shape[1] == 1 else mask
        allowed = allowed & m.reshape(m.shape[0], kv, n // kv, *m.shape[2:])
    scores = jnp.where(allowed, scores, -0.7 * float(jnp.finfo(jnp.float32).max))
    p = jax.nn.softmax(scores, axis=-1)
    o = matmul("bkgts,bskh->btkgh", p, v, dtype)
    return o.reshape(b, t, n, hd)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): ``x / rms(x) * scale``.

    Statistics are computed in float32; input ``[..., d]`` of any dtype, output in that dtype.
    """

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, names: Sequence[str | None] = ("embed",)):
        self.eps = eps
        self.scale = param(rngs, (dim,), names, std=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotary position embedding tables (Su et al. 2021, RoFormer eq. 34).

    Args:
      positions: int ``[B, T]`` or ``[T]`` token positions.
    Returns:
      ``(sin, cos)`` float32 arrays of shape ``positions.shape + (head_dim // 2,)``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; set config.model.head_dim even")
    freqs = theta ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    ang = positions.astype(jnp.float32)[..., None] * freqs
    return jnp.sin(ang), jnp.cos(ang)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate feature pairs ``(x[..., i], x[..., i + d/2])`` by position-dependent angles.

    Args:
      x: ``[B, T, H, head_dim]`` in any float dtype.
      sin, cos: ``[B, T, head_dim/2]`` or ``[T, head_dim/2]`` float32 from :func:`rope_angles`.
    Returns:
      Same shape and dtype as ``x``; the dot product of two rotated vectors depends only on
      their position difference.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    sin, cos = sin[..., None, :], cos[..., None, :]  # broadcast over heads
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding ``[vocab_size, d_model]``; ``attend`` reuses it as a tied LM head."""

    def __init__(self, vocab_size: int, d_model: int, *, std: float, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab_size, d_model), ("vocab", "embed"), std=std)

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        """int32 ``[B, T]`` -> ``[B, T, d_model]`` in ``dtype`` (a gather: 0 FLOPs)."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

    def attend(self, x: jax.Array, dtype) -> jax.Array:
        """``[B, T, d_model]`` -> logits ``[B, T, vocab_size]`` float32 (2*V*d FLOPs per token)."""
        return matmul("btd,vd->btv", x, self.embedding[...], dtype, out_dtype=jnp.float32)


class MLP(nnx.Module):
    """SwiGLU feed-forward (Shazeer 2020, eq. 6): ``W_down (silu(x W_gate) * (x W_up))``.

    Gate and up projections are one fused ``[d_model, 2, d_ff]`` kernel. Returns ``(y, aux)``
    with ``aux == {}`` (the FFN contract: an FFN may report auxiliary losses/metrics).
    ``d_ff`` overrides ``cfg.d_ff`` (MoE shared experts).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs, d_ff: int | None = None):
        d, f = cfg.d_model, d_ff or cfg.d_ff
        self.dtype = dtype_of(cfg.dtype)
        self.w_gate_up = param(rngs, (d, 2, f), ("embed", None, "mlp"), std=cfg.init_std)
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def __call__(self, x: jax.Array, *, segment_ids=None) -> tuple[jax.Array, dict]:
        """``x`` ``[B, T, d_model]`` -> ``([B, T, d_model], {})`` in the compute dtype."""
        from efficient_arch import parallel

        gu = matmul("btd,dkf->btkf", x, self.w_gate_up[...], self.dtype)
        h = jax.nn.silu(gu[:, :, 0].astype(jnp.float32)) * gu[:, :, 1].astype(jnp.float32)
        h = parallel.constrain(h.astype(self.dtype), ("batch", "seq", "act_mlp"))
        return matmul("btf,fd->btd", h, self.w_down[...], self.dtype), {}

    @staticmethod
    def flops_per_token(cfg, seq_len: int, *, attention: str = "causal", executed: bool = False,
                        platform: str | None = None) -> float:
        """Forward matmul FLOPs per token: 2 * 3 * d_model * d_ff (gate, up, down); executed ==
        model FLOPs on every platform."""
        del seq_len, attention, executed, platform
        return 6.0 * cfg.d_model * cfg.d_ff

    @staticmethod
    def remat_tail_flops_per_token(cfg) -> float:
        """FLOPs of the output matmul (``w_down``, ``2 d d_ff``): under full remat the backward
        never needs its output, so a group ending in this MLP does not recompute it."""
        return 2.0 * cfg.d_model * cfg.d_ff
