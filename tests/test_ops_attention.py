"""ops/attention.py: the query-blocked causal form against the unblocked core (float64), its key
ranges, and the executed FLOP count against XLA's."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_arch.config import finalize
from efficient_arch.models import registry
from efficient_arch.ops import attention as A

from conftest import make_tiny_config


def test_key_ranges_causal_window_and_unsplit():
    # causal, 10 queries in blocks of 4: each block sees the keys up to its own end
    assert A.key_ranges(10, 10, is_causal=True, block=4) == ((0, 4, 0, 4), (4, 8, 0, 8), (8, 10, 0, 10))
    assert A.executed_pairs(A.key_ranges(10, 10, is_causal=True, block=4)) == 16 + 32 + 20
    # causal window of 3 keys (left 2): keys from 2 before the block's first query
    assert A.key_ranges(10, 10, is_causal=True, local_window_size=(2, 0), block=4) == (
        (0, 4, 0, 4), (4, 8, 2, 8), (8, 10, 6, 10))
    # two-sided window without causality
    assert A.key_ranges(8, 8, is_causal=False, local_window_size=(1, 2), block=4) == ((0, 4, 0, 6), (4, 8, 3, 8))
    # no causal / window bound, or block 0: the whole square
    assert A.key_ranges(6, 9, is_causal=False, block=4) == ((0, 6, 0, 9),)
    assert A.key_ranges(6, 6, is_causal=True, block=0) == ((0, 6, 0, 6),)
    # default block: 4 blocks once T / 4 exceeds the smallest block; a short sequence is one block
    assert A.query_block(512) == A.QUERY_BLOCK == 128 and A.query_block(2048) == 512
    assert A.key_ranges(100, 100, is_causal=True) == ((0, 100, 0, 100),)
    assert A.executed_pairs(A.key_ranges(512, 512, is_causal=True)) == 128 * 128 * (1 + 2 + 3 + 4)
    # T != S: causal masks aligned top-left (keys beyond the last query are never visible)
    assert A.key_ranges(4, 6, is_causal=True, block=2) == ((0, 2, 0, 2), (2, 4, 0, 4))
    assert A.key_ranges(6, 4, is_causal=True, block=4) == ((0, 4, 0, 4), (4, 6, 0, 4))


@pytest.mark.parametrize("case", ["causal", "segments", "window", "empty_row", "more_keys"])
def test_blocked_attention_matches_the_unblocked_core_float64(case):
    """Blocks of 8 queries (T = 29: a short last block; GQA 6 query heads on 2 KV heads) against
    the single-block core, float64: outputs and gradients of q, k, v agree to 1e-12 for the
    causal mask, causal + packed segments, a causal window, and a row with nothing allowed
    (which averages all S values in both)."""
    rng = np.random.default_rng(0)
    b, t, kv, g, hd = 2, 29, 2, 3, 8
    s = 35 if case == "more_keys" else t  # T != S: the causal mask aligned top-left
    with jax.enable_x64(True):
        q = jnp.asarray(rng.standard_normal((b, t, kv, g, hd)))
        k, v = (jnp.asarray(rng.standard_normal((b, s, kv, hd))) for _ in range(2))
        ct = jnp.asarray(rng.standard_normal((b, t, kv, g, hd)))
        i, j = np.arange(t)[:, None], np.arange(s)[None, :]
        allowed = j <= i
        window = None
        if case == "window":
            window = (4, 0)
            allowed = allowed & (j >= i - 4)
        allowed = np.broadcast_to(allowed, (b, 1, 1, t, s))
        if case == "segments":
            seg = np.stack([np.repeat([0, 1, 2], [5, 13, 11]), np.repeat([0, 1], [20, 9])])
            allowed = allowed & (seg[:, None, None, :, None] == seg[:, None, None, None, :])
        if case == "empty_row":
            allowed = allowed.copy()
            allowed[1, :, :, 17] = False  # query 17 of batch 1 sees nothing
        allowed = jnp.asarray(allowed)
        ranges = A.key_ranges(t, s, is_causal=True, local_window_size=window, block=8)
        assert len(ranges) == 4
        scale = 1 / math.sqrt(hd)

        def loss(ranges_, q, k, v):
            return jnp.sum(A.blocked_attention(q, k, v, allowed, scale, jnp.float64, ranges_) * ct)

        full = ((0, t, 0, s),)
        want, want_g = jax.value_and_grad(lambda *a: loss(full, *a), argnums=(0, 1, 2))(q, k, v)
        got, got_g = jax.value_and_grad(lambda *a: loss(ranges, *a), argnums=(0, 1, 2))(q, k, v)
        o_full = A.blocked_attention(q, k, v, allowed, scale, jnp.float64, full)
        o_blk = A.blocked_attention(q, k, v, allowed, scale, jnp.float64, ranges)
        mean_v = np.broadcast_to(np.asarray(v[1]).mean(0)[:, None], (kv, g, hd))
    np.testing.assert_allclose(o_blk, o_full, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for a, r in zip(got_g, want_g):
        np.testing.assert_allclose(a, r, rtol=0, atol=1e-12 * float(jnp.abs(r).max()))
    if case == "empty_row":  # the uniform average over all 29 values, not over the block's keys
        np.testing.assert_allclose(o_blk[1, 17], mean_v, atol=1e-12)


def test_attention_executed_flops_match_xla_at_four_blocks():
    """Forward of the attention mixer at T = 512 (four blocks of 128 queries): XLA's count over
    the analytic executed count lies in [1, 1.05] (the excess is the softmax and RoPE); the
    executed count scores 320 keys per query where the full square has 512."""
    cfg = finalize(make_tiny_config(model__mixer="attention", model__d_model=256, model__n_heads=4,
                                    model__n_kv_heads=2, model__seq_len=512)).model
    cls = registry.get_mixer("attention")
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    b, t = 2, 512
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    xla = fwd.lower(state, jax.ShapeDtypeStruct((b, t, cfg.d_model), jnp.float32)).cost_analysis()["flops"]
    executed = cls.flops_per_token(cfg, t, attention="executed")
    proj = cls.flops_per_token(cfg, t, attention="full") - 4 * 4 * 64 * 512
    assert executed == proj + 4 * 4 * 64 * 320
    assert 1.0 <= xla / (executed * b * t) <= 1.05, xla / (executed * b * t)


def test_key_padding_mask_with_query_groups_and_range_checks():
    """A mask with one row for every query ([B, 1, 1, 1, S], key padding) with G = 3 query heads per
    KV head gives what its explicit [B, 1, 1, T, S] broadcast gives (it raised a broadcasting error
    in the folded layout), blocked and unblocked; malformed ranges raise ValueError."""
    rng = np.random.default_rng(1)
    b, t, s, kv, g, hd = 2, 20, 24, 2, 3, 8
    q = jnp.asarray(rng.standard_normal((b, t, kv, g, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, kv, hd)), jnp.float32) for _ in range(2))
    pad = jnp.asarray(np.arange(s)[None, :] < np.array([[s], [15]]))[:, None, None, None, :]
    full = jnp.broadcast_to(pad, (b, 1, 1, t, s))
    blocks = ((0, 8, 0, s), (8, 16, 0, s), (16, t, 0, s))
    for ranges in (((0, t, 0, s),), blocks):
        got = A.blocked_attention(q, k, v, pad, 0.3, jnp.float32, ranges)
        want = A.blocked_attention(q, k, v, full, 0.3, jnp.float32, ranges)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got[1], A.blocked_attention(q, k, v, jnp.ones_like(full), 0.3, jnp.float32, blocks)[1])
    for bad in (blocks[::-1], blocks[:2], ((0, 8, 0, s), (9, t, 0, s)), ((0, 8, 0, s + 1), (8, t, 0, s)),
                ((0, 8, 4, 4), (8, t, 0, s)), ((0, 0, 0, s), (0, t, 0, s))):
        with pytest.raises(ValueError, match="partitioning the queries"):
            A.blocked_attention(q, k, v, full, 0.3, jnp.float32, bad)
