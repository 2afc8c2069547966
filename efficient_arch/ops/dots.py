"""The matrix products the ops are built from: operands cast to the compute dtype, accumulation in
float32 (float64 for float64 inputs, as the tests' references use).

One place for what the attention core, the fused cross-entropy, the linear recurrences and the
delta rule all need; the model's parameter matmuls (with their custom VJPs for 16-bit compute and
FP8) are ``models.layers.matmul``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation / state dtype for inputs of ``dtype``: float32, or float64 for float64."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def dot(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """``einsum(spec, a, b)`` with both operands cast to ``dtype``; the result in
    :func:`acc_dtype` (``preferred_element_type``)."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=acc_dtype(dtype))


def dot_canonical(spec: str, a: jax.Array, b: jax.Array, dtype, acc) -> jax.Array:
    """``einsum(spec, a, b)`` with operands cast to ``dtype`` and accumulation in ``acc``, emitted
    with the canonical output order (batch dims, then ``a``'s free dims, then ``b``'s) and
    transposed afterwards: XLA:CPU (jax 0.10) rejects a bf16 x bf16 -> f32 dot whose output layout
    puts a free dim before a batch dim ("Unsupported element type for DotThunk::Execute")."""
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    batch = [c for c in out if c in sa and c in sb]
    canon = "".join(batch + [c for c in out if c in sa and c not in sb] +
                    [c for c in out if c in sb and c not in sa])
    y = jnp.einsum(f"{sa},{sb}->{canon}", a.astype(dtype), b.astype(dtype), preferred_element_type=acc)
    return y if canon == out else jnp.transpose(y, [canon.index(c) for c in out])


def join_block_pairs(blocks: jax.Array, low: jax.Array) -> jax.Array:
    """Lower-block-triangular doubling step: adjacent diagonal blocks ``b0, b1`` of ``blocks``
    ``[..., 2G, n, n]`` and the lower-left blocks ``low`` ``[..., G, n, n]`` become
    ``[[b0, 0], [low, b1]]`` ``[..., G, 2n, 2n]``. Shared by the block-doubling inverse of the delta
    rule and the recursive halving of GLA's vector-decay scores."""
    pairs = blocks.reshape(blocks.shape[:-3] + (blocks.shape[-3] // 2, 2) + blocks.shape[-2:])
    top = jnp.concatenate([pairs[..., 0, :, :], jnp.zeros_like(low)], axis=-1)
    bottom = jnp.concatenate([low, pairs[..., 1, :, :]], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2)
