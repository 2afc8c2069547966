"""Tests for efficient_arch.ops.linear_recurrence: the chunked and quadratic forms equal the recurrent
oracle (outputs, final states and gradients, float64), segment resets, initial states, harsh decays
in float32 / bfloat16 against a float64 reference, and the decode step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_arch.ops.linear_recurrence import (
    feature_dim, feature_map, flops_gated_linear_attention, gated_linear_attention, gla_step,
    taylor_feature_map)

B, T, H, K, V = 2, 13, 2, 4, 3  # T = 13: not a multiple of the chunk sizes 4 and 16


def inputs(seed, t=T, decay="vector", strength=1.0, k_dim=K, v_dim=V):
    """float64 numpy q, k, v and log_decay (None | [B,T,H] | [B,T,H,K]), values <= 0."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, t, H, k_dim))
    k = rng.standard_normal((B, t, H, k_dim))
    v = rng.standard_normal((B, t, H, v_dim))
    shape = {"none": None, "scalar": (B, t, H), "vector": (B, t, H, k_dim)}[decay]
    g = None if shape is None else -strength * rng.uniform(0.0, 1.0, shape)
    return q, k, v, g


_gla = jax.jit(gated_linear_attention, static_argnames=("form", "chunk_size", "normalize"))


def run(q, k, v, g, form, chunk_size=4, dtype=jnp.float64, **kw):
    """Jitted forward (one compiled program per case: much faster cold than op-by-op dispatch)."""
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)
    return _gla(cast(q), cast(k), cast(v), cast(g), form=form, chunk_size=chunk_size, **kw)


def assert_close(a, b, tol, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
    assert err < tol, f"{what}: relative max error {err:.3g} >= {tol}"


@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
def test_forms_agree_outputs_states_gradients_float64(decay):
    """chunked (C = 1, 4, 16) == quadratic == recurrent: outputs, final state and the gradients of a
    random projection of both wrt q, k, v, log_decay (float64, rel tol 1e-10)."""
    with jax.enable_x64(True):
        q, k, v, g = inputs(0, decay=decay)
        rng = np.random.default_rng(1)
        ro, rs = rng.standard_normal((B, T, H, V)), rng.standard_normal((B, H, K, V))
        args = [jnp.asarray(x) for x in (q, k, v)] + ([jnp.asarray(g)] if g is not None else [])

        def loss(form, c):
            def f(*a):
                o, s = gated_linear_attention(*a[:3], a[3] if len(a) > 3 else None, form=form, chunk_size=c)
                return jnp.sum(o * ro) + jnp.sum(s * rs)
            return jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(args)))))

        ref_o, ref_s = run(q, k, v, g, "recurrent")
        ref_val, ref_grads = loss("recurrent", 1)(*args)
        assert np.all(np.abs(np.asarray(ref_o)) > 0) and np.abs(ref_s).max() > 0.1
        for form, c in [("quadratic", 1), ("chunked", 1), ("chunked", 4), ("chunked", 16)]:
            o, s = run(q, k, v, g, form, chunk_size=c)
            assert o.shape == (B, T, H, V) and o.dtype == jnp.float64 and s.shape == (B, H, K, V)
            assert_close(o, ref_o, 1e-10, f"{form} C={c} output")
            assert_close(s, ref_s, 1e-10, f"{form} C={c} state")
            val, grads = loss(form, c)(*args)
            assert_close(val, ref_val, 1e-10, f"{form} C={c} loss")
            for name, gr, rg in zip("q k v log_decay".split(), grads, ref_grads):
                assert np.abs(np.asarray(rg)).max() > 1e-3
                assert_close(gr, rg, 1e-9, f"{form} C={c} grad {name}")


def test_vector_decay_secondary_chunking_float64():
    """C = 32 and 64: 5 and 6 halving levels (score blocks as matmuls); C = 24 and 48 are padded to
    32 / 64 inside the chunk; T = 70 pads the sequence. Outputs, final states and the gradients wrt
    q, k, v, log_decay and the initial state equal the recurrent oracle, with segment resets inside
    and across chunks (float64, rel tol 1e-10)."""
    with jax.enable_x64(True):
        q, k, v, g = inputs(2, t=70, decay="vector", strength=2.0)
        rng = np.random.default_rng(3)
        s0 = rng.standard_normal((B, H, K, V))
        seg = np.zeros((B, 70), np.int32)
        seg[0, 9:40] = 1  # resets at 9 (inside the first chunk) and 40
        seg[0, 40:] = 2
        seg[1, 64:] = 1  # a reset on a chunk boundary for C = 32 and 64
        seg = jnp.asarray(seg)
        ro, rs = rng.standard_normal((B, 70, H, V)), rng.standard_normal((B, H, K, V))
        args = [jnp.asarray(x) for x in (q, k, v, g, s0)]

        def loss(form, c):
            def f(q_, k_, v_, g_, s0_):
                o, s = gated_linear_attention(q_, k_, v_, g_, segment_ids=seg, initial_state=s0_, form=form,
                                              chunk_size=c)
                return jnp.sum(o * ro) + jnp.sum(s * rs)
            return jax.jit(jax.value_and_grad(f, argnums=tuple(range(5))))

        ref_o, ref_s = run(q, k, v, g, "recurrent", initial_state=args[4], segment_ids=seg)
        ref_val, ref_grads = loss("recurrent", 1)(*args)
        for c in (24, 32, 48, 64):
            o, s = run(q, k, v, g, "chunked", chunk_size=c, initial_state=args[4], segment_ids=seg)
            assert_close(o, ref_o, 1e-10, f"C={c} output")
            assert_close(s, ref_s, 1e-10, f"C={c} state")
            val, grads = loss("chunked", c)(*args)
            assert_close(val, ref_val, 1e-10, f"C={c} loss")
            for name, gr, rg in zip(("q", "k", "v", "log_decay", "initial_state"), grads, ref_grads):
                assert np.abs(np.asarray(rg)).max() > 1e-3
                assert_close(gr, rg, 1e-9, f"C={c} grad {name}")


@pytest.mark.parametrize("decay", ["none", "vector"])
def test_initial_state_equals_running_the_prefix(decay):
    """Running [0, 7) then [7, T) from the returned state == running [0, T) (recurrent, chunked)."""
    with jax.enable_x64(True):
        q, k, v, g = inputs(4, decay=decay)
        sl = lambda x, a, b: None if x is None else x[:, a:b]
        full_o, full_s = run(q, k, v, g, "recurrent")
        for form in ("recurrent", "chunked"):
            o1, s1 = run(sl(q, 0, 7), sl(k, 0, 7), sl(v, 0, 7), sl(g, 0, 7), form)
            o2, s2 = run(sl(q, 7, T), sl(k, 7, T), sl(v, 7, T), sl(g, 7, T), form, initial_state=s1)
            assert_close(jnp.concatenate([o1, o2], 1), full_o, 1e-10, f"{form} output")
            assert_close(s2, full_s, 1e-10, f"{form} state")
        with pytest.raises(ValueError, match="quadratic"):
            run(q, k, v, g, "quadratic", initial_state=s1)


@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
def test_segment_resets_equal_separate_runs(decay):
    """Packed segments [5, 6, 2] (ids 0 1 0: an id that returns still starts a new segment) equal
    running each segment alone from a zero state, in every form; the final state is the last
    segment's; an initial state only reaches the first segment."""
    with jax.enable_x64(True):
        q, k, v, g = inputs(5, decay=decay)
        bounds = [(0, 5), (5, 11), (11, 13)]
        seg = np.zeros((B, T), np.int32)
        seg[:, 5:11] = 1
        s0 = jnp.asarray(np.random.default_rng(6).standard_normal((B, H, K, V)))
        sl = lambda x, a, b: None if x is None else x[:, a:b]
        parts = [run(sl(q, a, b), sl(k, a, b), sl(v, a, b), sl(g, a, b), "recurrent",
                     initial_state=s0 if a == 0 else None) for a, b in bounds]
        want_o = jnp.concatenate([p[0] for p in parts], axis=1)
        want_s = parts[-1][1]
        for form, c in [("recurrent", 1), ("chunked", 1), ("chunked", 4), ("chunked", 16), ("quadratic", 1)]:
            kw = {} if form == "quadratic" else {"initial_state": s0}
            o, s = run(q, k, v, g, form, chunk_size=c, segment_ids=jnp.asarray(seg), **kw)
            if form == "quadratic":  # no initial state: compare the segments it cannot see
                assert_close(o[:, 5:], want_o[:, 5:], 1e-10, f"{form} output")
            else:
                assert_close(o, want_o, 1e-10, f"{form} C={c} output")
            assert_close(s, want_s, 1e-10, f"{form} C={c} state")


@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_harsh_decays_finite_and_accurate_in_float32_and_bfloat16(decay):
    """Per-step log decay -5 (total -1000) and a total of about -1e4 (steps in [-100, 0]) over T=128.

    Tolerances (relative to the max |output|, vs the float64 recurrent reference): float32 2e-4
    (chunk-local cumsums of magnitude up to C * 100 lose ~1e-5 absolute in the exponent),
    bfloat16 3e-2 (operands rounded to 8 bits); states: float32 1e-5, bfloat16 1e-2.
    """
    t = 128
    q, k, v, _ = inputs(7, t=t, decay=decay)
    shape = (B, t, H) if decay == "scalar" else (B, t, H, K)
    rng = np.random.default_rng(8)
    cases = {"step -5": np.full(shape, -5.0), "total ~-1e4": -rng.uniform(0, 160, shape)}
    for name, g in cases.items():
        with jax.enable_x64(True):
            ref_o, ref_s = (np.asarray(x) for x in run(q, k, v, g, "recurrent"))
        assert g.sum(1).min() < -600
        for form, c in [("recurrent", 1), ("chunked", 16), ("chunked", 64), ("quadratic", 1)]:
            for dtype, tol_o, tol_s in [(jnp.float32, 2e-4, 1e-5), (jnp.bfloat16, 3e-2, 1e-2)]:
                o, s = _gla(jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
                            jnp.asarray(g, jnp.float32), form=form, chunk_size=c)
                what = f"{name} {form} C={c} {dtype.__name__}"
                assert o.dtype == dtype and s.dtype == jnp.float32, what
                assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(s))), what
                assert_close(o, ref_o, tol_o, what + " output")
                assert_close(s, ref_s, tol_s, what + " state")


def test_sequence_padding_keeps_the_chunk_decay_exact_float32():
    """T = 70 with C = 24 / 48 pads the last chunk; its padded steps (log decay 0) must leave the
    chunk's total decay at the last real token's value. Harsh vector decays (steps in [-160, 0]):
    final state within 1e-5 of the float64 oracle (measured 3e-7; 4.4e-5 when the padded steps'
    prefix sums set ``b_last``, which rounds differently from the last real position)."""
    t = 70
    q, k, v, _ = inputs(7, t=t, decay="vector")
    g = -np.random.default_rng(8).uniform(0, 160, (B, t, H, K))
    with jax.enable_x64(True):
        ref_o, ref_s = run(q, k, v, g, "recurrent")
    for c in (24, 48):
        o, s = run(q, k, v, g, "chunked", chunk_size=c, dtype=jnp.float32)
        assert_close(s, ref_s, 1e-5, f"C={c} state")
        assert_close(o, ref_o, 2e-4, f"C={c} output")


def test_harsh_decay_gradients_with_segments_float32():
    """Gradients (wrt q, k, v, log_decay) through harsh vector decays (steps in [-160, 0], total
    about -1e4 over T = 64) and three packed segments stay finite in float32 and match the float64
    recurrent gradients (rel tol 5e-4; measured <= 1.4e-4, log_decay the largest): the masked
    exponent never reaches exp(+x) and no -inf enters a gradient."""
    t = 64
    q, k, v, _ = inputs(11, t=t)
    g = -np.random.default_rng(12).uniform(0, 160, (B, t, H, K))
    seg = np.zeros((B, t), np.int32)
    seg[:, 20:50], seg[:, 50:] = 1, 2
    ro = np.random.default_rng(13).standard_normal((B, t, H, V))

    def grad_fn(form, c):
        def f(q, k, v, g):
            o, s = gated_linear_attention(q, k, v, g, segment_ids=jnp.asarray(seg), form=form, chunk_size=c)
            return jnp.sum(o * ro) + jnp.sum(s)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

    with jax.enable_x64(True):
        ref = [np.asarray(x) for x in grad_fn("recurrent", 1)(*map(jnp.asarray, (q, k, v, g)))]
    for form, c in [("chunked", 16), ("quadratic", 1)]:
        grads = grad_fn(form, c)(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, g)))
        for name, gr, rg in zip("q k v log_decay".split(), grads, ref):
            assert bool(jnp.all(jnp.isfinite(gr))), (form, name)
            assert_close(gr, rg, 5e-4, f"{form} grad {name}")


@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
def test_gla_step_repeated_equals_recurrent(decay):
    with jax.enable_x64(True):
        q, k, v, g = inputs(9, decay=decay)
        ref_o, ref_s = run(q, k, v, g, "recurrent")
        s = jnp.zeros((B, H, K, V), jnp.float64)
        step = jax.jit(gla_step)
        outs = []
        for t in range(T):
            o, s = step(q[:, t], k[:, t], v[:, t], None if g is None else g[:, t], s)
            outs.append(o)
        assert_close(jnp.stack(outs, 1), ref_o, 1e-12, "decode outputs")
        assert_close(s, ref_s, 1e-12, "decode state")


@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
def test_normalize_equals_the_ones_column_definition_float64(decay):
    """``normalize=True`` == running ``[v, 1]`` and dividing by the last output column (+ eps):
    outputs, the final state (z last) and gradients wrt q, k, v, log_decay and the initial state,
    for every form (chunked C = 4 and 16 pad T = 13), with segment resets, float64; the decode
    step likewise. Positive features keep the denominator away from 0."""
    with jax.enable_x64(True):
        q, k, v, g = inputs(11, decay=decay)
        q, k = np.abs(q) + 0.1, np.abs(k) + 0.1
        rng = np.random.default_rng(12)
        s0 = np.abs(rng.standard_normal((B, H, K, V + 1)))
        seg = jnp.asarray(np.repeat([[0] * 5 + [1] * 8], B, 0))
        ro, rs = rng.standard_normal((B, T, H, V)), rng.standard_normal((B, H, K, V + 1))
        eps = 0.05
        ones = lambda x: jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)

        def loss(form, c, normalize, with_s0):
            def f(q_, k_, v_, g_, s0_):
                kw = dict(segment_ids=seg, form=form, chunk_size=c, initial_state=s0_ if with_s0 else None)
                if normalize:
                    o, s = gated_linear_attention(q_, k_, v_, g_, normalize=True, eps=eps, **kw)
                else:
                    o1, s = gated_linear_attention(q_, k_, ones(v_), g_, **kw)
                    o = o1[..., :-1] / (o1[..., -1:] + eps)
                return jnp.sum(o * ro) + jnp.sum(s * rs), (o, s)
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))

        args = [jnp.asarray(x) for x in (q, k, v, g if g is not None else np.zeros((B, T, H)), s0)]
        if g is None:
            args[3] = None
        for form, c, with_s0 in [("recurrent", 1, True), ("chunked", 4, True), ("chunked", 16, False),
                                 ("quadratic", 1, False)]:
            (ref_val, (ref_o, ref_s)), ref_grads = loss("recurrent", 1, False, with_s0)(*args)
            (val, (o, s)), grads = loss(form, c, True, with_s0)(*args)
            assert o.shape == (B, T, H, V) and s.shape == (B, H, K, V + 1)
            assert_close(o, ref_o, 1e-10, f"{form} C={c} output")
            assert_close(s, ref_s, 1e-10, f"{form} C={c} state")
            for name, gr, rg in zip(("q", "k", "v", "log_decay", "initial_state"), grads, ref_grads):
                if rg is None or (name == "initial_state" and not with_s0):
                    continue
                assert np.abs(np.asarray(rg)).max() > 1e-3
                assert_close(gr, rg, 1e-9, f"{form} C={c} grad {name}")
        # the decode step: normalised, with the [K, V + 1] state
        st, st1 = jnp.asarray(s0), jnp.asarray(s0)
        for t in range(3):
            gt = None if g is None else g[:, t]
            o, st = gla_step(q[:, t], k[:, t], v[:, t], gt, st, normalize=True, eps=eps)
            o1, st1 = gla_step(q[:, t], k[:, t], ones(jnp.asarray(v[:, t])), gt, st1)
            assert_close(o, o1[..., :-1] / (o1[..., -1:] + eps), 1e-12, f"decode output {t}")
            assert_close(st, st1, 1e-12, f"decode state {t}")
        with pytest.raises(ValueError, match=r"V \+ 1"):
            run(q, k, v, g, "chunked", initial_state=jnp.asarray(s0[..., :V]), normalize=True)
        # the decode step checks its state too (a V-wide state with normalize would broadcast)
        with pytest.raises(ValueError, match=r"V \+ 1"):
            gla_step(q[:, 0], k[:, 0], v[:, 0], None, jnp.asarray(s0[..., :V]), normalize=True)
        with pytest.raises(ValueError, match=r"\[B, H, K, V\]"):
            gla_step(q[:, 0], k[:, 0], v[:, 0], None, jnp.asarray(s0))
        with pytest.raises(ValueError, match="log_decay"):
            gla_step(q[:, 0], k[:, 0], v[:, 0], jnp.zeros((B, H, K + 1)), jnp.asarray(s0), normalize=True)
        with pytest.raises(ValueError, match="eps"):
            gated_linear_attention(q, k, v, None, normalize=True, eps=-1e-3)
        with pytest.raises(ValueError, match="eps"):
            gla_step(q[:, 0], k[:, 0], v[:, 0], None, jnp.asarray(s0), normalize=True, eps=float("nan"))


@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
def test_feature_map_inside_the_op_equals_mapping_outside_float64(decay):
    """``feature_map=name`` on raw ``q, k`` == the recurrent form on ``feature_map(name, q / k)``:
    outputs, final state and gradients wrt the raw q, k, v, log_decay and the initial state
    (chunked C = 4 / 16 padding T = 13, with segment resets, normalised and not; float64). With
    ``taylor`` and no / scalar decay the chunked scores come from the F-wide ``q . k`` through
    ``1 + s + s^2 / 2`` (a wrong kernel or scale fails here); the state carries 1 + F + F^2 rows."""
    f_dim = 3
    with jax.enable_x64(True):
        rng = np.random.default_rng(21)
        q, k = rng.standard_normal((2, B, T, H, f_dim)) * 0.7
        v = rng.standard_normal((B, T, H, V))
        seg = jnp.asarray(np.repeat([[0] * 6 + [1] * 7], B, 0))
        for name in ("taylor", "elu", "identity"):
            kf = feature_dim(name, f_dim)
            shape = {"none": None, "scalar": (B, T, H), "vector": (B, T, H, kf)}[decay]
            g = None if shape is None else -rng.uniform(0.0, 1.0, shape)
            for normalize in (False, True):
                vs = V + normalize
                s0 = np.abs(rng.standard_normal((B, H, kf, vs)))
                ro, rs = rng.standard_normal((B, T, H, V)), rng.standard_normal((B, H, kf, vs))
                norm = dict(normalize=True, eps=0.5) if normalize else {}

                def loss(form, c, inside):
                    def f(q_, k_, v_, g_, s0_):
                        kw = dict(segment_ids=seg, form=form, chunk_size=c, initial_state=s0_, **norm)
                        if inside:
                            o, s = gated_linear_attention(q_, k_, v_, g_, feature_map=name, **kw)
                        else:
                            o, s = gated_linear_attention(feature_map(name, q_), feature_map(name, k_), v_, g_, **kw)
                        return jnp.sum(o * ro) + jnp.sum(s * rs), (o, s)
                    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))

                args = [jnp.asarray(x) for x in (q, k, v)] + [None if g is None else jnp.asarray(g), jnp.asarray(s0)]
                (_, (ref_o, ref_s)), ref_grads = loss("recurrent", 1, False)(*args)
                for form, c in [("chunked", 4), ("chunked", 16), ("recurrent", 1)]:
                    (_, (o, s)), grads = loss(form, c, True)(*args)
                    what = f"{name} {decay} normalize={normalize} {form} C={c}"
                    assert o.shape == (B, T, H, V) and s.shape == (B, H, kf, vs), what
                    assert_close(o, ref_o, 1e-10, what + " output")
                    assert_close(s, ref_s, 1e-10, what + " state")
                    for gname, gr, rg in zip(("q", "k", "v", "log_decay", "initial_state"), grads, ref_grads):
                        if rg is not None:
                            assert np.abs(np.asarray(rg)).max() > 1e-3, what + " " + gname
                            assert_close(gr, rg, 1e-9, f"{what} grad {gname}")
        with pytest.raises(ValueError, match="feature map"):
            gated_linear_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), feature_map="relu")
        with pytest.raises(ValueError, match="raw q, k"):
            gated_linear_attention(jnp.asarray(q), jnp.asarray(k[..., :2]), jnp.asarray(v), feature_map="taylor")
        # a state of the raw width: the error says where K comes from
        with pytest.raises(ValueError, match=r"K = feature_dim\('taylor', 3\) = 13"):
            gated_linear_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), feature_map="taylor",
                                   initial_state=jnp.zeros((B, H, f_dim, V)))
        # integer inputs: the map would round back to ints (silently wrong); rejected
        for name in ("taylor", None):
            with pytest.raises(ValueError, match="float"):
                gated_linear_attention(jnp.asarray(q).astype(jnp.int32), jnp.asarray(k).astype(jnp.int32),
                                       jnp.asarray(v), feature_map=name)


def test_taylor_scores_contract_the_raw_width():
    """The chunked Taylor form's score product contracts F (the raw width), not 1 + F + F^2: the
    compiled forward's XLA FLOPs equal the analytic count with ``score_dim=F`` within the
    elementwise excess, and the feature-wide count would be far above them."""
    b, t, h, f, v_dim, c = 1, 256, 2, 8, 16, 64
    kf = feature_dim("taylor", f)
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    fwd = jax.jit(lambda q, k, v: gated_linear_attention(q, k, v, chunk_size=c, normalize=True,
                                                          feature_map="taylor")[0])
    xla = fwd.lower(spec(b, t, h, f), spec(b, t, h, f), spec(b, t, h, v_dim)).cost_analysis()["flops"]
    count = lambda sd: b * t * flops_gated_linear_attention(t, h, kf, v_dim, form="chunked", chunk_size=c,
                                                            has_decay=False, normalize=True, score_dim=sd)
    assert count(f) < count(None)
    assert 1.0 <= xla / count(f) <= 1.25, xla / count(f)
    assert xla < count(None)


def test_errors_name_the_problem():
    q, k, v, g = inputs(0, decay="scalar")
    with pytest.raises(ValueError, match="form"):
        run(q, k, v, g, "parallel", dtype=jnp.float32)
    with pytest.raises(ValueError, match="log_decay"):
        run(q, k, v, g[:, :, :1, None].repeat(3, -1), "chunked", dtype=jnp.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        run(q, k, v, g, "chunked", chunk_size=0, dtype=jnp.float32)


def test_flops_formula_values():
    f = lambda form, **kw: flops_gated_linear_attention(128, 2, 16, 8, form=form, **kw)
    assert f("recurrent") == 2 * 6 * 16 * 8 and f("recurrent", has_decay=False) == 2 * 5 * 16 * 8
    assert f("quadratic") == 2 * 2 * 128 * 24
    assert f("chunked", chunk_size=64) == 2 * (2 * 64 * 24 + 4 * 16 * 8)
    # vector decay: A V (2 C V), the recursive halving's score blocks + diagonal (C (C + 1) K / C), states
    assert f("chunked", chunk_size=64, vector_decay=True) == 2 * (2 * 64 * 8 + 65 * 16 + 4 * 16 * 8)
    # a chunk of 48 is padded to 64 inside: 64 * 65 * K / 48 per token
    assert f("chunked", chunk_size=48, vector_decay=True) == pytest.approx(
        2 * (2 * 48 * 8 + 64 * 65 * 16 / 48 + 4 * 16 * 8) * (math.ceil(128 / 48) * 48 / 128))
    assert f("chunked", chunk_size=256) == f("chunked", chunk_size=128)  # C is capped at T
    # T = 100, C = 64: two chunks (128 padded tokens) executed for 100 tokens
    g = flops_gated_linear_attention(100, 1, 16, 8, form="chunked", chunk_size=64)
    assert g == pytest.approx(128 / 100 * (2 * 64 * 24 + 4 * 16 * 8))
    # normalize: the chunked form adds 2 K (q . z_prev); the others run V + 1 columns
    assert f("chunked", chunk_size=64, normalize=True) == f("chunked", chunk_size=64) + 2 * 2 * 16
    # score_dim: the chunked score block contracts it instead of K (the Taylor kernel shortcut)
    assert f("chunked", chunk_size=64, score_dim=4) == 2 * (2 * 64 * (4 + 8) + 4 * 16 * 8)
    assert f("recurrent", score_dim=4) == f("recurrent")
    n = lambda form: flops_gated_linear_attention(128, 2, 16, 9, form=form)
    assert f("recurrent", normalize=True) == n("recurrent") and f("quadratic", normalize=True) == n("quadratic")
    with pytest.raises(ValueError, match="form"):
        f("parallel")


def test_feature_maps():
    with jax.enable_x64(True):
        rng = np.random.default_rng(10)
        x, y = jnp.asarray(rng.standard_normal((3, 5))), jnp.asarray(rng.standard_normal((3, 5)))
        px, py = taylor_feature_map(x), taylor_feature_map(y)
        assert px.shape == (3, feature_dim("taylor", 5)) == (3, 31)
        s = jnp.sum(x * y, -1) / np.sqrt(5)
        np.testing.assert_allclose(jnp.sum(px * py, -1), 1 + s + s * s / 2, rtol=1e-12)
        e = feature_map("elu", x)
        assert float(e.min()) > 0 and np.allclose(e, np.where(x > 0, x + 1, np.exp(x)))
        assert feature_map("identity", x) is x
        with pytest.raises(ValueError, match="feature map"):
            feature_map("relu", x)
