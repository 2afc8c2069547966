"""The one ``lax.scan`` every time/chunk loop in ops/ goes through, so the FLOP audit can unroll it.

XLA's cost analysis counts a ``while`` body once whatever its trip count. Training lowers these
loops rolled (fast compiles); :func:`efficient_arch.flops.xla_flops_per_step` lowers small
variants of the step inside :func:`unrolled` so every chunk / time step is counted.

Also the loops' backward-pass storage on XLA:CPU: :func:`int_residuals` keeps a differentiated
scan body's bfloat16 residuals as ``uint16`` (stacked in place) and :func:`materialize_on_cpu`
stores an array once where XLA would fuse its producer into every consumer (benchmarks/NOTES.md,
session 8).
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


def scan(f, init, xs, length=None, *, unroll: int | bool = 1, store_residuals: bool = False):
    """``jax.lax.scan(f, init, xs, length, unroll=unroll)``; fully unrolled inside :func:`unrolled`.

    ``store_residuals``: the body goes through ``int_residuals(f, store_float32=True)``: in the
    backward pass each step's residuals are stored once instead of being read through the stack
    slice by every consumer (a measured gain for some bodies, a loss for others: opt in). The
    body then has :func:`int_residuals`' limits: reverse mode only, no closing over
    differentiated values, no second derivatives through bfloat16 residuals.
    """
    body = int_residuals(f, store_float32=True) if store_residuals else f
    return jax.lax.scan(body, init, xs, length=length, unroll=True if is_unrolled() else unroll)


def materialize_on_cpu(a: jax.Array) -> jax.Array:
    """``a`` itself; in a program compiled for CPU, stored once in its own buffer.

    XLA:CPU fuses a cheap producer (an elementwise op, a slice of a loop's stacked array) into
    every consumer; when a consumer is a transposing copy or is fused several times, the
    producer's work or its strided reads repeat. Passing ``a`` through a conditional on a runtime
    predicate (its first element equal to itself) stops fusion there: the producer runs once and
    the consumers read the stored result. (``optimization_barrier`` would say this directly, but
    XLA:CPU removes barriers before fusion.) If ``a``'s first element is NaN the result is all
    NaN. ``jax.lax.platform_dependent`` decides where the program is compiled: on other platforms
    ``a`` passes unchanged (a GPU conditional would read its predicate on the host). Skipped for
    zero-size arrays and under a mesh with explicit axes (where ``cond`` on a sharded operand is a
    type error); under ``vmap`` the conditional becomes a select and the gain is lost.

    Args:
      a: an array; only floating-point ones are stored (an integer predicate ``x == x`` would
        fold to a constant), others are returned unchanged.

    Returns:
      ``a`` (same shape, dtype and values).
    """
    if not jnp.issubdtype(a.dtype, jnp.floating) or a.size == 0 or jax.sharding.get_abstract_mesh().explicit_axes:
        return a

    def stored(a):
        first = a[(0,) * a.ndim]  # one element: no gather of a sharded array
        return jax.lax.cond(first == first, lambda a: a, lambda a: jnp.full_like(a, jnp.nan), a)

    return jax.lax.platform_dependent(a, cpu=stored, default=lambda a: a)


def int_residuals(f, *, store_float32: bool = False):
    """``f`` with the same values and gradients, its bfloat16 VJP residuals kept as ``uint16``.

    For the body of a ``lax.scan`` that is differentiated: the scan stacks each step's residuals
    with a ``dynamic-update-slice`` into a ``[steps, ...]`` buffer. XLA:CPU's float normalization
    rewrites a bfloat16 ``dynamic-update-slice`` as ``convert(dus(convert(stack)))`` in float32,
    which is no longer done in place: every step rewrites the whole stack (cost quadratic in the
    number of steps; measured on a bf16 ``[steps, 4, 512, 2048]`` stack: 8 / 16 / 32 steps 45 /
    122 / 422 ms vs float32's 29 / 54 / 130 ms), and its ``dynamic-slice`` reads in the backward
    loop become a whole-stack convert that loop-invariant code motion hoists out of the loop
    (benchmarks/NOTES.md, session 8). Integers are left alone, so bfloat16 residuals are bit-cast
    to ``uint16`` in the forward and back in the backward: no rounding, bit-identical (first-order,
    unbatched) gradients.
    Other dtypes (float16 included: updated in place) pass through unchanged. In the backward each
    bfloat16 residual also goes through :func:`materialize_on_cpu`: otherwise XLA:CPU fuses the
    step's ``dynamic-slice`` of the stack into its consumers, and the transposing copies the
    weight-gradient dots need then take its slow elemental path (a bf16 ``[4096, 2048]``
    transpose of a slice 60 ms vs 8 ms of a whole buffer on one core; bench bf16 scanned step
    1.13-1.19x). If a residual's first element is NaN, that whole residual reads NaN.
    ``store_float32=True`` stores float32 residuals once too (neutral for the bench layer stack,
    1.006x; GLA's chunk loop 1.04-1.08x: its opt-in through :func:`scan`).

    Args:
      f: a function of arrays (any pytree in and out) differentiable by ``jax.vjp``.
      store_float32: also pass float32 residuals through :func:`materialize_on_cpu`.

    Returns:
      ``g`` with ``g(*args) == f(*args)`` (positional arguments). A custom VJP: reverse mode only
      (``jax.jvp`` of ``g`` raises a TypeError), and ``f`` must take every array it is
      differentiated with respect to as an argument (closing over one raises JAX's
      ``CustomVJPException``, e.g. an inner wrapped scan whose body uses the outer step's weights).

    Raises:
      TypeError: when traced for differentiation and ``f`` has a ``uint16`` residual of its own
        (it would be mistaken for a packed bfloat16).

    Warning: second derivatives (grad of grad, Hessian-vector products) through ``g`` are wrong
    when ``f`` has bfloat16 residuals, and this is not detected: a ``uint16`` residual carries no
    derivative (a new-user trial measured a gradient-norm gradient 21% off). Float32 / float16 /
    float64 residuals are not packed, and their second derivatives are exact. The LM wraps its
    scanned layers only for bf16 compute: take higher-order derivatives of a float32 model.
    """

    @jax.custom_vjp
    def g(*args):
        return f(*args)

    def pack(r):
        if r.dtype == jnp.uint16:
            raise TypeError(f"int_residuals: {f} keeps a {r.dtype} residual of shape {r.shape}; "
                            "uint16 residuals cannot be told apart from packed bfloat16 ones; "
                            "do not wrap this function")
        # float16 is left alone: XLA:CPU updates it in place
        return jax.lax.bitcast_convert_type(r, jnp.uint16) if r.dtype == jnp.bfloat16 else r

    def unpack(r):
        if r.dtype == jnp.uint16:
            return materialize_on_cpu(jax.lax.bitcast_convert_type(r, jnp.bfloat16))
        return materialize_on_cpu(r) if store_float32 and r.dtype == jnp.float32 else r

    def fwd(*args):
        out, vjp = jax.vjp(f, *args)
        return out, jax.tree.map(pack, vjp)

    def bwd(res, ct):
        return jax.tree.map(unpack, res)(ct)

    g.defvjp(fwd, bwd)
    return g
