"""The one ``lax.scan`` every time/chunk loop in ops/ goes through, so the FLOP audit can unroll it.

XLA's cost analysis counts a ``while`` body once whatever its trip count. Training lowers these
loops rolled (fast compiles); :func:`efficient_arch.flops.xla_flops_per_step` lowers small
variants of the step inside :func:`unrolled` so every chunk / time step is counted.
"""

from __future__ import annotations

import contextlib
import threading

import jax

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
