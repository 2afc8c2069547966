"""ops/cross_entropy.py: the fused, chunked LM head + cross-entropy against optax on the full
logits (float64), its gradients, and the train step with and without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficient_arch import parallel, train
from efficient_arch.config import ConfigError, finalize
from efficient_arch.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_eval


def reference(h, w, y, m, tied):
    z = jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", h, w)
    return jnp.sum(m * optax.softmax_cross_entropy_with_integer_labels(z, y))


def _problem(seed, tied, b=2, t=13, d=8, v=11):
    """float64 ``(h [B, T, d], w [d, V] or [V, d] when tied, int32 targets, 0/1 mask)``; T = 13 is
    not a multiple of the chunk sizes tested."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((b, t, d))
    w = rng.standard_normal((v, d) if tied else (d, v))
    y = rng.integers(0, v, (b, t)).astype(np.int32)
    m = (rng.random((b, t)) > 0.3).astype(np.float64)
    return h, w, y, m


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 5, 64])  # 5: T=13 not a multiple; 64 > T: one chunk
def test_matches_full_logits_float64(tied, chunk):
    h, w, y, m = _problem(0, tied)
    with jax.enable_x64(True):
        f = lambda h, w: linear_cross_entropy(h, w, y, m, chunk, tied, jnp.float64)  # noqa: E731
        got, got_g = jax.value_and_grad(f, argnums=(0, 1))(h, w)
        want, want_g = jax.value_and_grad(lambda h, w: reference(h, w, y, m, tied), argnums=(0, 1))(h, w)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        for a, r in zip(got_g, want_g):
            np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)
        # the cotangent scales the stored gradients (e.g. loss / token count)
        g2 = jax.grad(lambda h, w: 0.25 * f(h, w), argnums=1)(h, w)
        np.testing.assert_allclose(g2, 0.25 * want_g[1], rtol=1e-10)
    # masked positions contribute nothing: their hidden-state gradient is exactly 0
    assert np.all(np.asarray(got_g[0])[m == 0] == 0)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_eval_form_matches_full_logits_float64(tied, chunk):
    """The evaluation form (loss and argmax hits, no gradients, chunked) against the full logits."""
    h, w, y, m = _problem(2, tied)
    y[0, :4] = np.argmax(np.einsum("td,vd->tv" if tied else "td,dv->tv", h[0, :4], w), -1)  # some hits
    with jax.enable_x64(True):
        loss, hits = linear_cross_entropy_eval(h, w, y, m, chunk, tied, jnp.float64)
        z = np.einsum("btd,vd->btv" if tied else "btd,dv->btv", h, w)
        np.testing.assert_allclose(loss, reference(h, w, y, m, tied), rtol=1e-12)
        want_hits = np.sum(m * (np.argmax(z, -1) == y))
        assert float(hits) == want_hits and want_hits >= 1


def test_bf16_inputs_float32_gradients():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.bfloat16)
    w = jnp.asarray(0.3 * rng.standard_normal((16, 32)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 32, (2, 9)), jnp.int32)
    m = jnp.ones((2, 9), jnp.float32)
    loss, (dh, dw) = jax.value_and_grad(
        lambda h, w: linear_cross_entropy(h, w, y, m, 4, False, jnp.bfloat16), argnums=(0, 1))(h, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    want = reference(h.astype(jnp.float32), w, y, m, False)
    np.testing.assert_allclose(loss, want, rtol=2e-2)


def _has_shape(jaxpr, shape) -> bool:
    """Whether any value of ``jaxpr`` (nested jaxprs included) has ``shape``."""
    for eqn in jaxpr.eqns:
        if any(tuple(getattr(v.aval, "shape", ())) == shape for v in eqn.outvars):
            return True
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None and _has_shape(getattr(inner, "jaxpr", inner), shape):
                    return True
    return False


def test_train_step_fused_equals_unfused(tiny_config):
    """Same init, same batch: loss, grad norm and updated params of the fused-loss step match the
    full-logits step (float32 rounding), with a loss mask and grad accumulation; so do the eval
    step's loss sum, token count and argmax hits."""
    outs = []
    for chunk in (0, 8):
        cfg = finalize(tiny_config(train__ce_chunk_size=chunk, train__grad_accum=2, flops__peak_flops=1e12), 1)
        mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
        rng = np.random.default_rng(0)
        x = rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1)).astype(np.int32)
        mask = (rng.random((cfg.train.batch_size, cfg.model.seq_len)) > 0.25).astype(np.float32)
        with jax.set_mesh(mesh):
            run = train.build(cfg, mesh)
            batch = parallel.global_batch({"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": mask}, mesh,
                                          cfg.train.batch_size)
            state, m = run.train_step(run.init_state(), batch)
            ev = [float(e) for e in run.eval_step(state["params"], batch)]  # loss sum, count, hits
            full = (cfg.train.batch_size, cfg.model.seq_len, cfg.model.vocab_size)
            assert (_has_shape(jax.make_jaxpr(run.eval_step)(state["params"], batch).jaxpr, full)
                    == (chunk == 0)), "eval builds [B, T, V] logits exactly when the loss is not chunked"
            outs.append((float(m["loss"]), float(m["grad_norm"]), jax.device_get(state["params"]), ev))
    (l0, g0, p0, e0), (l1, g1, p1, e1) = outs
    assert abs(l0 - l1) < 1e-5 * abs(l0) and abs(g0 - g1) < 1e-4 * g0, (l0, l1, g0, g1)
    # the eval step takes the chunked form too: same loss sum, token count and hits
    assert e1[0] == pytest.approx(e0[0], rel=1e-4) and e1[1] == e0[1] and e1[2] == e0[2], (e0, e1)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_negative_chunk_size_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="train.ce_chunk_size"):
        finalize(tiny_config(train__ce_chunk_size=-1), 1)
