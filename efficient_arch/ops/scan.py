"""The one ``lax.scan`` every time/chunk loop in ops/ goes through, so the FLOP audit can unroll it.

XLA's cost analysis counts a ``while`` body once whatever its trip count. Training lowers these
loops rolled (fast compiles); :func:`efficient_arch.flops.xla_flops_per_step` lowers small
variants of the step inside :func:`unrolled` so every chunk / time step is counted.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp

_state = threading.local()


@contextlib.contextmanager
def unrolled():
    """Within this context, :func:`scan` fully unrolls its loop when traced."""
    prev = getattr(_state, "unroll", False)
    _state.unroll = True
    try:
        yield
    finally:
        _state.unroll = prev


def is_unrolled() -> bool:
    """True inside :func:`unrolled`."""
    return getattr(_state, "unroll", False)


def scan(f, init, xs, length=None, *, unroll: int | bool = 1):
    """``jax.lax.scan(f, init, xs, length, unroll=unroll)``; fully unrolled inside :func:`unrolled`."""
    return jax.lax.scan(f, init, xs, length=length, unroll=True if is_unrolled() else unroll)


# residual dtype -> the same-width integer dtype it is stored as (float16 is left alone: XLA:CPU
# updates it in place)
_RESIDUAL_INT = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16)}
_RESIDUAL_FLOAT = {v: k for k, v in _RESIDUAL_INT.items()}


def int_residuals(f):
    """``f`` with the same values and gradients, its bfloat16 VJP residuals kept as ``uint16``.

    For the body of a ``lax.scan`` that is differentiated: the scan stacks each step's residuals
    with a ``dynamic-update-slice`` into a ``[steps, ...]`` buffer. XLA:CPU's float normalization
    rewrites a bfloat16 ``dynamic-update-slice`` as ``convert(dus(convert(stack)))`` in float32,
    which is no longer done in place: every step rewrites the whole stack (cost quadratic in the
    number of steps; measured on a bf16 ``[steps, 4, 512, 2048]`` stack: 8 / 16 / 32 steps 45 /
    122 / 422 ms vs float32's 29 / 54 / 130 ms), and its ``dynamic-slice`` reads in the backward
    loop become a whole-stack convert that loop-invariant code motion hoists out of the loop
    (benchmarks/NOTES.md, session 8). Integers are left alone, so bfloat16 residuals are bit-cast
    to ``uint16`` in the forward and back in the backward: no rounding, bit-identical gradients.
    Other dtypes (float16 included: updated in place) pass through unchanged.

    Args:
      f: a function of arrays (any pytree in and out) differentiable by ``jax.vjp``.

    Returns:
      ``g`` with ``g(*args) == f(*args)``; reverse mode only (a custom VJP: ``jax.jvp`` of ``g``
      raises a TypeError).

    Raises:
      TypeError: when traced for differentiation and ``f`` has a ``uint16`` residual of its own
        (it would be mistaken for a packed bfloat16).
    """

    @jax.custom_vjp
    def g(*args):
        return f(*args)

    def pack(r):
        if r.dtype in _RESIDUAL_FLOAT:
            raise TypeError(f"int_residuals: {f} keeps a {r.dtype} residual of shape {r.shape}; "
                            "uint16 residuals cannot be told apart from packed bfloat16 ones; "
                            "do not wrap this function")
        return jax.lax.bitcast_convert_type(r, _RESIDUAL_INT[r.dtype]) if r.dtype in _RESIDUAL_INT else r

    def unpack(r):
        return jax.lax.bitcast_convert_type(r, _RESIDUAL_FLOAT[r.dtype]) if r.dtype in _RESIDUAL_FLOAT else r

    def fwd(*args):
        out, vjp = jax.vjp(f, *args)
        return out, jax.tree.map(pack, vjp)

    def bwd(res, ct):
        return jax.tree.map(unpack, res)(ct)

    g.defvjp(fwd, bwd)
    return g
