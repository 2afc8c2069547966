"""Tests for efficient_arch.ops.delta_rule: the chunked UT-transform form against the recurrent
oracle (outputs, final states and gradients, float64), the recurrent oracle against a literal
numpy transcription of the paper's recurrence, initial states, packed-document resets, harsh
decays in float32/bfloat16, single-token decoding, and the FLOP formula against XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_arch.ops.delta_rule import (delta_rule, delta_rule_step, flops_delta_rule,
                                           unit_lower_inverse, unit_lower_solve)


def make_inputs(rng, b, t, h, dk, dv, *, decay_scale=0.5):
    """float64 numpy inputs: unit-norm keys, beta in (0.05, 0.95), log decays in [-decay_scale, 0]."""
    q = rng.normal(size=(b, t, h, dk))
    k = rng.normal(size=(b, t, h, dk))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(b, t, h, dv))
    beta = rng.uniform(0.05, 0.95, size=(b, t, h))
    log_decay = -rng.uniform(0.0, decay_scale, size=(b, t, h))
    return q, k, v, beta, log_decay


def numpy_reference(q, k, v, beta, log_decay=None, segment_ids=None, initial_state=None):
    """The recurrence written literally, float64:
    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T;  o_t = S_t^T q_t;
    S_{t-1} := 0 where segment_ids[t] != segment_ids[t-1]."""
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    o = np.zeros((b, t, h, dv))
    final = np.zeros((b, h, dk, dv))
    for bi in range(b):
        for hi in range(h):
            s = np.zeros((dk, dv)) if initial_state is None else np.array(initial_state[bi, hi], np.float64)
            for ti in range(t):
                if segment_ids is not None and ti > 0 and segment_ids[bi, ti] != segment_ids[bi, ti - 1]:
                    s = np.zeros((dk, dv))
                alpha = 1.0 if log_decay is None else np.exp(float(log_decay[bi, ti, hi]))
                kt, bt = k[bi, ti, hi], beta[bi, ti, hi]
                s = alpha * (np.eye(dk) - bt * np.outer(kt, kt)) @ s + bt * np.outer(kt, v[bi, ti, hi])
                o[bi, ti, hi] = s.T @ q[bi, ti, hi]
            final[bi, hi] = s
    return o, final


def test_unit_lower_inverse():
    """(I + A)^{-1} by block doubling, sizes 1, 3 (padded to 4), 8 and 13 (padded to 16)."""
    rng = np.random.default_rng(0)
    mats = [np.tril(rng.normal(size=(2, c, c)), -1) for c in (1, 3, 8, 13)]
    with jax.enable_x64(True):
        invs = jax.jit(lambda ms: [unit_lower_inverse(m) for m in ms])([jnp.asarray(m) for m in mats])
    for a, inv in zip(mats, invs):
        c = a.shape[-1]
        np.testing.assert_allclose(np.asarray(inv) @ (np.eye(c) + a), np.broadcast_to(np.eye(c), a.shape),
                                   atol=1e-12)
        np.testing.assert_array_equal(np.triu(np.asarray(inv), 1), 0)


def test_unit_lower_solve_derivatives_equal_autodiff_of_the_inverse():
    """unit_lower_solve's custom JVP (and its transpose, reverse mode) equal autodiff through
    block doubling + product, float64, C = 13 (padded to 16); the upper triangle and diagonal of
    A are not read, so their gradient is 0 and a tangent there changes nothing."""
    rng = np.random.default_rng(3)
    c, d = 13, 5
    a = np.tril(rng.normal(size=(2, c, c)) * 0.3, -1)
    r = rng.normal(size=(2, c, d))
    with jax.enable_x64(True):
        a, r = jnp.asarray(a), jnp.asarray(r)
        plain = lambda a_, r_: jnp.einsum("...ij,...jd->...id", unit_lower_inverse(a_), r_)  # noqa: E731
        np.testing.assert_allclose(unit_lower_solve(a, r), plain(a, r), rtol=1e-13)
        w = jnp.asarray(rng.normal(size=(2, c, d)))
        loss = lambda f: lambda a_, r_: jnp.sum(f(a_, r_) * w)  # noqa: E731
        got = jax.grad(loss(unit_lower_solve), argnums=(0, 1))(a, r)
        want = jax.grad(loss(plain), argnums=(0, 1))(a, r)
        for g, h in zip(got, want):
            assert float(jnp.max(jnp.abs(h))) > 1e-2
            np.testing.assert_allclose(g, h, rtol=1e-11, atol=1e-13)
        np.testing.assert_array_equal(np.triu(np.asarray(got[0])), 0)
        da, dr = jnp.asarray(rng.normal(size=a.shape)), jnp.asarray(rng.normal(size=r.shape))
        _, t_got = jax.jvp(unit_lower_solve, (a, r), (da, dr))
        _, t_want = jax.jvp(plain, (a, r), (jnp.tril(da, -1), dr))
        np.testing.assert_allclose(t_got, t_want, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_chunked_equals_recurrent_with_gradients(gated):
    """T = 19 (not a multiple of 4 or 16), chunks 1, 4, 16, a random initial state: outputs, final
    states and gradients of a random projection of (o, final state) w.r.t. q, k, v, beta,
    log_decay and the initial state agree with the recurrent form to float64 round-off; the
    recurrent form equals the literal numpy recurrence."""
    rng = np.random.default_rng(1)
    b, t, h, dk, dv = 2, 19, 2, 4, 3
    q, k, v, beta, ld = make_inputs(rng, b, t, h, dk, dv)
    s0 = rng.normal(size=(b, h, dk, dv))
    p_o, p_s = rng.normal(size=(b, t, h, dv)), rng.normal(size=(b, h, dk, dv))
    ref_o, ref_s = numpy_reference(q, k, v, beta, ld if gated else None, initial_state=s0)
    chunks = (1, 4, 16)
    unrolls = (False, 2, True)  # the inter-chunk loop rolled, partly and fully unrolled
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(x) for x in (q, k, v, beta, ld, s0))

        def loss(args, form, c, unroll=True):
            q, k, v, beta, ld, s0 = args
            o, s = delta_rule(q, k, v, beta, ld if gated else None, initial_state=s0, form=form,
                              chunk_size=c, unroll=unroll)
            return jnp.sum(o * p_o) + jnp.sum(s * p_s), (o, s)

        @jax.jit
        def all_forms(args):
            vg = jax.value_and_grad(loss, has_aux=True)
            return (vg(args, "recurrent", 1),
                    [vg(args, "chunked", c, u) for c, u in zip(chunks, unrolls)])

        rec, chunked = all_forms(args)
        (_, (o_r, s_r)), g_r = rec
        np.testing.assert_allclose(o_r, ref_o, atol=1e-12)
        np.testing.assert_allclose(s_r, ref_s, atol=1e-12)
        assert float(jnp.max(jnp.abs(o_r))) > 0.1  # a real signal, not zeros
        for c, ((_, (o_c, s_c)), g_c) in zip(chunks, chunked):
            np.testing.assert_allclose(o_c, o_r, atol=1e-12, err_msg=f"chunk {c}")
            np.testing.assert_allclose(s_c, s_r, atol=1e-12, err_msg=f"chunk {c}")
            names = ("q", "k", "v", "beta", "log_decay", "initial_state")
            for name, gc, gr in zip(names, g_c, g_r):
                if name == "log_decay" and not gated:
                    continue
                assert float(jnp.max(jnp.abs(gr))) > 1e-3, name  # the gradient is not trivially 0
                np.testing.assert_allclose(gc, gr, atol=1e-11, err_msg=f"d/d{name}, chunk {c}")


def test_initial_state_chains_and_segments_reset():
    """Running [0, 11) then [11, T) from the first part's final state equals one run; with packed
    segments (boundaries inside and at the start of a chunk) each segment equals running it
    alone from a zero state; both forms; gated."""
    rng = np.random.default_rng(2)
    b, t, h, dk, dv = 2, 14, 2, 4, 4
    q, k, v, beta, ld = make_inputs(rng, b, t, h, dk, dv)
    lens = (5, 3, 6)  # boundaries at t = 5 (mid-chunk) and t = 8 (a chunk start for chunk 4)
    seg = np.repeat(np.arange(3), lens)[None].repeat(b, 0)
    seg[1] = np.repeat(np.arange(2), (9, 5))  # row 1: other boundaries
    ref_o, ref_s = numpy_reference(q, k, v, beta, ld, segment_ids=seg)
    with jax.enable_x64(True):
        a = tuple(jnp.asarray(x) for x in (q, k, v, beta, ld))

        @jax.jit
        def run(a, seg):
            out = {}
            for form in ("recurrent", "chunked"):
                first = delta_rule(*(x[:, :11] for x in a), form=form, chunk_size=4)
                second = delta_rule(*(x[:, 11:] for x in a), initial_state=first[1], form=form,
                                    chunk_size=4)
                whole = delta_rule(*a, form=form, chunk_size=4)
                packed = delta_rule(*a, segment_ids=seg, form=form, chunk_size=4)
                out[form] = (first, second, whole, packed)
            return out

        out = run(a, jnp.asarray(seg))
    for form, (first, second, whole, packed) in out.items():
        np.testing.assert_allclose(np.concatenate([first[0], second[0]], 1), whole[0], atol=1e-12,
                                   err_msg=form)
        np.testing.assert_allclose(second[1], whole[1], atol=1e-12, err_msg=form)
        np.testing.assert_allclose(packed[0], ref_o, atol=1e-12, err_msg=form)
        np.testing.assert_allclose(packed[1], ref_s, atol=1e-12, err_msg=form)
    # the reference itself: each segment alone from a zero state
    starts = np.cumsum((0,) + lens)
    for s0, s1 in zip(starts[:-1], starts[1:]):
        alone, fin = numpy_reference(*(x[:1, s0:s1] for x in (q, k, v, beta, ld)))
        np.testing.assert_allclose(ref_o[:1, s0:s1], alone, atol=1e-12)
    np.testing.assert_allclose(ref_s[:1], fin, atol=1e-12)
    unsegmented = numpy_reference(q[:1], k[:1], v[:1], beta[:1], ld[:1])[0]
    assert np.abs(ref_o[:1, 5:8] - unsegmented[:, 5:8]).max() > 1e-3  # the resets matter


def test_harsh_decays_float32_bfloat16():
    """Per-step log decay -5 with a -150 step every 8th token (T = 512, total -1.2e4), chunk 64:
    finite outputs, states and gradients in float32 and bfloat16, close to the float64 reference
    on the same (rounded) inputs. Measured: f32 max |o - ref| 6e-7, |S - ref| 2e-8; bf16 (output
    rounded to bf16, |o| up to ~3) 1.4e-2 and 2e-8 (the state stays float32)."""
    rng = np.random.default_rng(3)
    b, t, h, dk, dv = 1, 512, 2, 8, 8
    q, k, v, beta, _ = make_inputs(rng, b, t, h, dk, dv)
    ld = np.full((b, t, h), -5.0)
    ld[:, 3::8] = -150.0  # exp(-150) underflows float32: the state is wiped
    assert ld.sum(1).max() < -1e4
    proj = jnp.asarray(rng.normal(size=(b, t, h, dv)), jnp.float32)

    @jax.jit
    def run(q, k, v, beta, ld):
        def loss(args):
            o, s = delta_rule(*args, chunk_size=64, unroll=False)
            return jnp.sum(o.astype(jnp.float32) * proj) + jnp.sum(s), (o, s)
        return jax.value_and_grad(loss, has_aux=True)((q, k, v, beta, ld))

    for dtype, o_tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
        args = [jnp.asarray(x, dtype) for x in (q, k, v, beta)] + [jnp.asarray(ld, jnp.float32)]
        (_, (o, s)), grads = run(*args)
        assert o.dtype == dtype and s.dtype == jnp.float32
        for x in (o, s, *grads):
            assert bool(jnp.all(jnp.isfinite(x)))
        rounded = [np.asarray(x.astype(jnp.float32), np.float64) for x in args]
        ref_o, ref_s = numpy_reference(*rounded)
        assert np.abs(ref_o).max() > 1.0
        err_o = np.abs(np.asarray(o, np.float64) - ref_o).max()
        err_s = np.abs(np.asarray(s, np.float64) - ref_s).max()
        print(f"{jnp.dtype(dtype).name}: max |o - ref| {err_o:.2e}, max |S - ref| {err_s:.2e}")
        np.testing.assert_allclose(np.asarray(o, np.float64), ref_o, atol=o_tol, rtol=o_tol)
        np.testing.assert_allclose(np.asarray(s), ref_s, atol=1e-6)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_step_repeated_equals_recurrent(gated):
    rng = np.random.default_rng(4)
    b, t, h, dk, dv = 2, 7, 3, 4, 5
    q, k, v, beta, ld = make_inputs(rng, b, t, h, dk, dv)
    ref_o, ref_s = numpy_reference(q, k, v, beta, ld if gated else None)
    step = jax.jit(delta_rule_step)
    state = jnp.zeros((b, h, dk, dv), jnp.float32)
    outs = []
    for i in range(t):
        o, state = step(*(jnp.asarray(x[:, i], jnp.float32) for x in (q, k, v, beta)),
                        jnp.asarray(ld[:, i], jnp.float32) if gated else None, state)
        outs.append(o)
    assert state.dtype == jnp.float32
    np.testing.assert_allclose(np.stack(outs, 1), ref_o, atol=2e-5)
    np.testing.assert_allclose(state, ref_s, atol=2e-5)


def test_flops_formula_matches_xla():
    """Chunked form, K = V = 64, lowered with the inter-chunk loop unrolled (XLA counts a rolled
    loop's body once): XLA / analytic = 1.017 (chunk 64) / 1.031 (chunk 16); the excess is the
    elementwise decay masks and cumsums. Lowering only: nothing is compiled."""
    b, t, h, d = 2, 256, 4, 64
    spec = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    gate = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
    for c in (16, 64):
        for gated in (False, True):
            f = jax.jit(lambda q, k, v, be, ld: delta_rule(q, k, v, be, ld, chunk_size=c, unroll=True))
            xla = f.lower(spec, spec, spec, gate, gate if gated else None).cost_analysis()["flops"]
            ana = flops_delta_rule(t, h, d, d, form="chunked", chunk_size=c, gated=gated) * b * t
            assert 1.0 <= xla / ana <= 1.05, (c, gated, xla / ana)
    # terms: C (6K + 4V) + 2 (P^2 - 1) / 3 + 6 K V per head, padding factor for T % C != 0
    chunked = lambda t, c: flops_delta_rule(t, 1, 2, 3, form="chunked", chunk_size=c, gated=False)  # noqa: E731
    assert chunked(64, 64) == 64 * 24 + 2 * 4095 / 3 + 36
    assert chunked(10, 4) == 1.2 * (4 * 24 + 10 + 36)  # 3 chunks of 4 for 10 tokens
    assert flops_delta_rule(10, 2, 2, 3, form="recurrent", chunk_size=4, gated=True) == 2 * 7 * 6


def test_errors():
    x = jnp.zeros((1, 4, 2, 3))
    beta = jnp.zeros((1, 4, 2))
    with pytest.raises(ValueError, match="form"):
        delta_rule(x, x, x, beta, form="quadratic")
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule(x, x, x, beta, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        delta_rule(x, x, x, beta[:, :3])
    with pytest.raises(ValueError, match="initial_state"):
        delta_rule(x, x, x, beta, initial_state=jnp.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="segment_ids"):
        delta_rule(x, x, x, beta, segment_ids=jnp.zeros((1, 5), jnp.int32))
