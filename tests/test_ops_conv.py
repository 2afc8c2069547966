"""Tests for efficient_arch.ops.conv: the causal depthwise convolution against a numpy loop, the
document-boundary reset, and token-by-token decoding (conv_step) against the full form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_arch.ops.conv import causal_conv1d, conv_step, flops_causal_conv1d


def conv_reference(x, w, b=None, seg=None):
    """Direct float64 loop over (batch, time, tap): y[t] = b + sum_s w[W-1-s] x[t-s] (same doc)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    bsz, t_len, c = x.shape
    width = w.shape[0]
    y = np.zeros((bsz, t_len, c))
    for bi in range(bsz):
        for t in range(t_len):
            acc = np.zeros(c) if b is None else np.asarray(b, np.float64).copy()
            for s in range(width):
                if t - s < 0 or (seg is not None and seg[bi, t - s] != seg[bi, t]):
                    continue
                acc += w[width - 1 - s] * x[bi, t - s]
            y[bi, t] = acc
    return y


@pytest.mark.parametrize("width", [1, 2, 4])
def test_matches_loop_reference(width):
    rng = np.random.default_rng(width)
    x = rng.standard_normal((2, 9, 5)).astype(np.float32)
    w = rng.standard_normal((width, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    y = causal_conv1d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    assert y.shape == (2, 9, 5) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), conv_reference(x, w, b), rtol=1e-5, atol=1e-5)
    # first output only sees the current token: y[0] = b + w[-1] x[0]
    np.testing.assert_allclose(np.asarray(y[:, 0]), b + w[-1] * x[:, 0], rtol=1e-6, atol=1e-6)


def test_width_longer_than_sequence_and_bf16_output():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 4)).astype(np.float32)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(causal_conv1d(jnp.asarray(x), jnp.asarray(w))),
                               conv_reference(x, w), rtol=1e-5, atol=1e-5)
    yb = causal_conv1d(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), conv_reference(x, w), rtol=3e-2, atol=3e-2)


def test_segment_reset_equals_separate_documents():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 10, 3)).astype(np.float32)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    seg = np.array([[0] * 4 + [1] * 3 + [2] * 3, [5] * 10], np.int32)
    y = np.asarray(causal_conv1d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), segment_ids=jnp.asarray(seg)))
    np.testing.assert_allclose(y, conv_reference(x, w, b, seg), rtol=1e-5, atol=1e-5)
    # each document of row 0 alone gives the same outputs as inside the packed row
    for lo, hi in [(0, 4), (4, 7), (7, 10)]:
        alone = np.asarray(causal_conv1d(jnp.asarray(x[:1, lo:hi]), jnp.asarray(w), jnp.asarray(b)))
        np.testing.assert_allclose(y[:1, lo:hi], alone, rtol=1e-6, atol=1e-6)
    # the unsegmented conv does mix across the boundary (so the test above is not vacuous)
    y_mixed = np.asarray(causal_conv1d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)))
    assert np.abs(y_mixed[0, 4] - y[0, 4]).max() > 1e-3
    np.testing.assert_allclose(y_mixed[1], y[1], rtol=1e-6, atol=1e-6)  # one segment: no change


def test_conv_step_repeated_equals_full():
    rng = np.random.default_rng(2)
    width, c = 4, 6
    x = jnp.asarray(rng.standard_normal((3, 7, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((width, c)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(c), jnp.float32)
    full = causal_conv1d(x, w, b)
    state = jnp.zeros((3, width - 1, c), jnp.float32)
    step = jax.jit(conv_step)
    outs = []
    for t in range(x.shape[1]):
        y, state = step(x[:, t], state, w, b)
        outs.append(y)
    np.testing.assert_allclose(np.stack(outs, 1), np.asarray(full), rtol=1e-5, atol=1e-5)
    # the state holds the last W-1 inputs, oldest first
    np.testing.assert_array_equal(np.asarray(state), np.asarray(x[:, -(width - 1):]))


def test_errors_and_flops():
    x = jnp.zeros((1, 4, 3))
    with pytest.raises(ValueError, match=r"\[W, C\]"):
        causal_conv1d(x, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d(x, jnp.zeros((4, 3)), jnp.zeros(2))
    with pytest.raises(ValueError, match="conv_state"):
        conv_step(x[:, 0], jnp.zeros((1, 2, 3)), jnp.zeros((4, 3)))
    assert flops_causal_conv1d(96, 4) == 2 * 4 * 96
    # XLA's count of the executed form: W multiplies + (W - 1) adds per channel per token
    lowered = jax.jit(causal_conv1d).lower(jax.ShapeDtypeStruct((2, 64, 32), jnp.float32),
                                           jax.ShapeDtypeStruct((4, 32), jnp.float32))
    xla = lowered.cost_analysis()["flops"]
    assert abs(xla / (flops_causal_conv1d(32, 4) * 2 * 64) - 7 / 8) < 0.01  # measured 0.8751


def test_store_cotangent_keeps_values_and_gradients_and_nan():
    """``store_cotangent`` is an identity in value and gradient (with a heavy producer of the
    cotangent, segments and bias), puts a conditional in the compiled CPU backward, and turns a
    NaN cotangent into an all-NaN one (never a finite gradient from a NaN)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 37, 6)), jnp.float32)
    w, bias = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32), jnp.asarray(rng.standard_normal(6), jnp.float32)
    seg = jnp.asarray(np.repeat([[0, 1, 2], [0, 0, 1]], [10, 20, 7], axis=1))
    g = jnp.asarray(rng.standard_normal((2, 37, 6)), jnp.float32)

    def loss(store, x, w, bias):
        y = causal_conv1d(x, w, bias, segment_ids=seg, store_cotangent=store)
        return jnp.sum(jax.nn.silu(y) * jnp.tanh(y) * g)

    grads = {s: jax.jit(jax.grad(lambda *a, s=s: loss(s, *a), argnums=(0, 1, 2)))(x, w, bias) for s in (False, True)}
    for a, b in zip(grads[False], grads[True]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    hlo = jax.jit(jax.grad(lambda x: loss(True, x, w, bias))).lower(x).compile().as_text()
    assert " conditional(" in hlo
    np.testing.assert_array_equal(causal_conv1d(x, w, bias, store_cotangent=True), causal_conv1d(x, w, bias))
    nan_g = g.at[0, 0, 0].set(jnp.nan)
    dx = jax.grad(lambda x: jnp.sum(causal_conv1d(x, w, store_cotangent=True) * nan_g))(x)
    assert np.all(np.isnan(np.asarray(dx)))
    empty = jnp.zeros((0, 5, 6), jnp.float32)  # zero-size: no element to test, passed through
    assert jax.grad(lambda x: jnp.sum(causal_conv1d(x, w, store_cotangent=True)))(empty).shape == (0, 5, 6)
