"""Tests for efficient_arch.ops.scan.int_residuals: same values and bit-identical gradients, bfloat16
residual stacks written in place (no float ``dynamic-update-slice`` wrapped in converts in the
compiled HLO), a clear error for integer 16-bit residuals; and the LM's scanned layer stack using it."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_arch.config import finalize
from efficient_arch.ops import scan as scan_lib
from test_model import random_model

# a float dynamic-update-slice done out of place: XLA:CPU's float normalization wraps a bfloat16
# one in converts (ops/scan.py)
CONVERTED_DUS = re.compile(r"convert\(%?dynamic[-_.]update[-_.]slice|dynamic-update-slice\(%?convert")


def _layer(x, w):
    """A scan body with bf16 residuals: x [T, D] bf16, w [D, D] float32."""
    h = jnp.tanh(x @ w.astype(x.dtype))
    return x + h @ w.T.astype(x.dtype), jnp.sum(h.astype(jnp.float32))


def _loss(body, ws, x):
    x, a = jax.lax.scan(body, x, ws)
    return jnp.sum(x.astype(jnp.float32) ** 2) + jnp.sum(a)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_int_residuals_same_values_and_gradients(dtype):
    ws = jax.random.normal(jax.random.key(0), (5, 16, 16)) * 0.3
    x = jax.random.normal(jax.random.key(1), (8, 16)).astype(dtype)
    plain = jax.jit(jax.value_and_grad(lambda ws, x: _loss(_layer, ws, x), argnums=(0, 1)))
    packed = jax.jit(jax.value_and_grad(lambda ws, x: _loss(scan_lib.int_residuals(_layer), ws, x),
                                        argnums=(0, 1)))
    (l0, (gw0, gx0)), (l1, (gw1, gx1)) = plain(ws, x), packed(ws, x)
    assert gx1.dtype == dtype and gw1.dtype == jnp.float32
    assert float(l0) == float(l1)
    np.testing.assert_array_equal(np.asarray(gw1), np.asarray(gw0))  # bit-identical
    np.testing.assert_array_equal(np.asarray(gx1, np.float32), np.asarray(gx0, np.float32))
    assert np.abs(np.asarray(gw1)).max() > 0


def test_int_residuals_stack_in_place():
    ws = jax.ShapeDtypeStruct((4, 16, 16), jnp.float32)
    x = jax.ShapeDtypeStruct((8, 16), jnp.bfloat16)

    def hlo(body):
        return jax.jit(jax.grad(lambda ws, x: _loss(body, ws, x))).lower(ws, x).compile().as_text()

    packed = hlo(scan_lib.int_residuals(_layer))
    assert not CONVERTED_DUS.search(packed)
    # each bf16 residual slice is stored once in the backward (materialize_on_cpu's conditional)
    assert packed.count(" conditional(") >= 1
    # the plain body's residual stack is rewritten out of place: if this fails, XLA no longer
    # converts bfloat16 dynamic-update-slices and int_residuals can be retired
    assert CONVERTED_DUS.search(hlo(_layer))


def test_int_residuals_rejects_integer_16_bit_residuals():
    def f(x, k):
        return jnp.take(x, k)  # keeps the uint16 indices k as a residual

    g = scan_lib.int_residuals(f)
    x, k = jnp.ones(3), jnp.arange(3, dtype=jnp.uint16)
    np.testing.assert_array_equal(g(x, k), f(x, k))  # the primal alone is fine
    with pytest.raises(TypeError, match="uint16 residual"):
        jax.grad(lambda x: g(x, k).sum())(x)


def test_scanned_lm_bf16_gradients_unchanged_and_stacks_in_place(tiny_config, monkeypatch):
    cfg = finalize(tiny_config(model__n_layers=3, model__n_kv_heads=2, model__dtype="bfloat16",
                               model__scan_layers=True)).model
    graphdef, params = nnx.split(random_model(cfg, seed=0))
    tok = jax.random.randint(jax.random.key(3), (2, cfg.seq_len), 0, cfg.vocab_size)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tok)[0]
        return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])

    def run():
        step = jax.jit(jax.value_and_grad(loss))
        return step(params), step.lower(params).compile().as_text()

    (l1, g1), hlo1 = run()
    monkeypatch.setattr(scan_lib, "int_residuals", lambda f, **_: f)
    (l0, g0), hlo0 = run()
    assert float(l1) == float(l0)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not CONVERTED_DUS.search(hlo1)
    assert CONVERTED_DUS.search(hlo0)  # the plain scan stacks the bf16 residuals out of place


def test_scan_store_residuals_float32_same_gradients_and_stored():
    ws = jax.random.normal(jax.random.key(0), (5, 16, 16)) * 0.3
    x = jax.random.normal(jax.random.key(1), (8, 16))

    def loss(ws, x, store):
        y, a = scan_lib.scan(_layer, x, ws, store_residuals=store)
        return jnp.sum(y ** 2) + jnp.sum(a)

    grads = {s: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2) for s in (True, False)}
    for a, b in zip(grads[True](ws, x, True), grads[False](ws, x, False)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hlo = {s: grads[s].lower(ws, x, s).compile().as_text() for s in (True, False)}
    assert hlo[True].count(" conditional(") >= 1 and hlo[False].count(" conditional(") == 0


def test_int_residuals_second_derivatives_exact_for_float32():
    # float32 residuals are not packed: grad of grad equals the plain body's (bf16 ones are
    # packed and their second derivatives are wrong: documented in int_residuals)
    ws = jax.random.normal(jax.random.key(0), (3, 8, 8)) * 0.3
    x = jax.random.normal(jax.random.key(1), (4, 8))

    def gnorm(ws, body):
        return jnp.sum(jax.grad(lambda ws: _loss(body, ws, x))(ws) ** 2)

    a = jax.grad(gnorm)(ws, scan_lib.int_residuals(_layer, store_float32=True))
    np.testing.assert_allclose(a, jax.grad(gnorm)(ws, _layer), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(a)).max() > 0
