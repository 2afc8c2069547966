"""Short causal depthwise 1-D convolution (the "short conv" of H3, Mamba, Mamba-2 and DeltaNet).

For channel ``c`` and kernel width ``W`` (``weight[W - 1]`` is the tap on the current token,
``weight[0]`` the tap on the token ``W - 1`` steps back)::

    y[b, t, c] = bias[c] + sum_{s=0}^{W-1} weight[W - 1 - s, c] * x[b, t - s, c]     (x[b, <0] = 0)

This is the causal depthwise convolution of Mamba-2 (Dao & Gu 2024, Sec. 7.1, "conv1d" applied to
``x, B, C`` before the SSM) and of Gu & Dao 2023 (Mamba, Sec. 3.4). With ``segment_ids`` the
terms with ``segment_ids[b, t - s] != segment_ids[b, t]`` are dropped, so no information crosses a
packed-document boundary (each document sees zero padding before its first token, exactly as if
it were alone in the row).

Decoding keeps the last ``W - 1`` inputs as a ``conv_state [B, W - 1, C]`` (oldest first), so
``conv_step`` applied token by token from a zero state reproduces ``causal_conv1d``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient_arch.ops import scan as scan_lib


def _check(x: jax.Array, weight: jax.Array, bias: jax.Array | None) -> None:
    if weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [W, C] with C={x.shape[-1]} (the channel dim of x); "
                         f"got weight {weight.shape} for x {x.shape}")
    if weight.shape[0] < 1:
        raise ValueError(f"conv width must be >= 1, got weight {weight.shape}")
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must be [C]={x.shape[-1]}, got {bias.shape}")


@jax.custom_vjp
def _store_cotangent(y: jax.Array) -> jax.Array:
    return y


_store_cotangent.defvjp(lambda y: (y, None), lambda _, g: (scan_lib.materialize_on_cpu(g),))


def causal_conv1d(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, *,
                  segment_ids: jax.Array | None = None, store_cotangent: bool = False) -> jax.Array:
    """Causal depthwise convolution over time (formula in the module docstring).

    Computed as ``W`` shifted multiply-adds (no ``conv_general_dilated``): for the small widths
    used here (W = 2..4) this is as fast as a convolution kernel on every backend and makes the
    document-boundary masking a plain elementwise select.

    Args:
      x: ``[B, T, C]`` any float dtype.
      weight: ``[W, C]`` (``weight[-1]`` multiplies the current token).
      bias: optional ``[C]``.
      segment_ids: optional int ``[B, T]``; taps that reach into another segment contribute 0.
      store_cotangent: in a program compiled for CPU, materialise the output's cotangent once in the backward
        (identity forward). The backward reads it at ``W`` shifts; XLA:CPU otherwise fuses its
        producer into that read and recomputes it ``W`` times. Worth it when the producer is heavy:
        Mamba-2's (gated norm, skip, chunked-output backward) layer fwd+bwd 1.19x / 1.24x at
        T = 2048; Gated DeltaNet's 0.96x (not used there). A NaN in the cotangent's first element
        makes the whole cotangent NaN. Reverse mode only (a custom VJP: ``jax.jvp`` through it
        raises); under ``vmap`` the conditional becomes a select and the gain is lost.
    Returns:
      ``[B, T, C]`` in ``x.dtype`` (accumulated in float32).
    FLOPs:
      ``2 W C`` per token (one multiply-add per tap), see :func:`flops_causal_conv1d`; the bias
      adds ``C`` (not counted).
    Raises:
      ValueError: if ``weight`` is not ``[W, C]`` or ``bias`` is not ``[C]``.
    """
    _check(x, weight, bias)
    w_len = weight.shape[0]
    t = x.shape[1]
    xf = x.astype(jnp.float32)
    wf = weight.astype(jnp.float32)
    # One zero pad in front and W - 1 shifted slices of it: XLA fuses the slices into the
    # multiply-add (a pad per tap was materialised per tap; Mamba-2 layer fwd+bwd 1.07x).
    xp = jnp.pad(xf, ((0, 0), (w_len - 1, 0), (0, 0)))
    back = lambda a, s: jax.lax.slice_in_dim(a, w_len - 1 - s, w_len - 1 - s + t, axis=1)  # a[t - s]
    if segment_ids is not None:
        seg_p = jnp.pad(segment_ids, ((0, 0), (w_len - 1, 0)))
    y = xf * wf[w_len - 1]
    for s in range(1, w_len):  # taps reaching before t = 0 read the zero padding
        shifted = back(xp, s)
        if segment_ids is not None:
            shifted = jnp.where((back(seg_p, s) == segment_ids)[..., None], shifted, 0.0)
        y = y + shifted * wf[w_len - 1 - s]
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    y = y.astype(x.dtype)
    if store_cotangent:
        y = _store_cotangent(y)
    return y


def conv_step(x_t: jax.Array, conv_state: jax.Array, weight: jax.Array,
              bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One decoding step of :func:`causal_conv1d`.

    Args:
      x_t: ``[B, C]`` the current token's input.
      conv_state: ``[B, W - 1, C]`` the previous ``W - 1`` inputs, oldest first (zeros at start).
      weight: ``[W, C]``; bias: optional ``[C]``.
    Returns:
      ``(y_t [B, C] in x_t.dtype, new conv_state [B, W - 1, C] in conv_state.dtype)``.
    FLOPs:
      ``2 W C`` per token.
    Raises:
      ValueError: on shape mismatches.
    """
    _check(x_t, weight, bias)
    w_len = weight.shape[0]
    if conv_state.shape != (x_t.shape[0], w_len - 1, x_t.shape[-1]):
        raise ValueError(f"conv_state must be [B, W-1, C]={(x_t.shape[0], w_len - 1, x_t.shape[-1])}, "
                         f"got {conv_state.shape}")
    window = jnp.concatenate([conv_state.astype(jnp.float32), x_t[:, None].astype(jnp.float32)], axis=1)
    y = jnp.einsum("bwc,wc->bc", window, weight.astype(jnp.float32))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x_t.dtype), window[:, 1:].astype(conv_state.dtype)


def flops_causal_conv1d(channels: int, width: int) -> float:
    """Forward FLOPs per token of :func:`causal_conv1d`: ``2 * width * channels``."""
    return 2.0 * width * channels
