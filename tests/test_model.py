"""Tests for the LM and its layers: shapes, causality, RoPE, GQA, scan/remat equivalence,
parameter counting, mixed precision and packed-document (segment) masking."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient_arch.config import finalize
from efficient_arch.models.layers import apply_rope, rope_angles
from efficient_arch.models.lm import count_params, new_model
from efficient_arch.models.mixers.attention import Attention


# ----------------------------------------------------------------------------- helpers

def model_cfg(tiny_config, **overrides):
    return finalize(tiny_config(**overrides)).model


def tokens_for(cfg, batch=4, seed=0, seq_len=None):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq_len or cfg.seq_len)), jnp.int32)


def new_attention(cfg, seed=0):
    with nnx.use_eager_sharding(False):
        return Attention(cfg, rngs=nnx.Rngs(seed))


def loss_and_grad_fn(model):
    """jit(value_and_grad) of the mean next-token CE w.r.t. the model's Params; the logits are
    returned as aux: ``vg(params, tokens, targets) -> ((loss, logits), grads)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, tokens, targets):
        logits, _ = nnx.merge(graphdef, p, rest)(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), params, loss


def assert_trees_close(a, b, rtol, atol_frac=1e-6):
    """allclose leaf by leaf with atol = atol_frac * max|b| of that leaf (grads near 0 are noisy)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol_frac * float(np.abs(y).max()))


def ref_rope(x, positions, theta):
    """Float64 complex-number RoPE reference: pair (x_i, x_{i+d/2}) rotated by pos * theta^(-2i/d)."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    half = d // 2
    freqs = theta ** (-np.arange(half) * 2.0 / d)
    z = x[..., :half] + 1j * x[..., half:]
    ang = np.asarray(positions, np.float64)[..., None] * freqs  # [B, T, half]
    z = z * np.exp(1j * ang)[..., None, :]  # broadcast over heads
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_attention(x, wq, wkv, wo, positions, theta, segment_ids=None):
    """Float64 numpy causal GQA attention written with explicit per-head loops."""
    x, wq, wkv, wo = (np.asarray(a, np.float64) for a in (x, wq, wkv, wo))
    b, t, _ = x.shape
    h, kvh = wq.shape[1], wkv.shape[2]
    q = ref_rope(np.einsum("btd,dhk->bthk", x, wq), positions, theta)
    k = ref_rope(np.einsum("btd,dhk->bthk", x, wkv[:, 0]), positions, theta)
    v = np.einsum("btd,dhk->bthk", x, wkv[:, 1])
    hd = q.shape[-1]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // kvh)
            for i in range(t):
                allowed = [j for j in range(i + 1)
                           if segment_ids is None or segment_ids[bi, j] == segment_ids[bi, i]]
                s = np.array([q[bi, i, hi] @ k[bi, j, kv] for j in allowed]) / math.sqrt(hd)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, hi] = sum(pj * v[bi, j, kv] for pj, j in zip(p, allowed))
    return np.einsum("bthk,hkd->btd", out, wo)


# ----------------------------------------------------------------------------- shapes

def test_output_shapes_and_dtype(tiny_config):
    cfg = model_cfg(tiny_config, model__n_kv_heads=2)
    model = new_model(cfg, 0)
    tok = tokens_for(cfg, batch=3)
    logits, aux = model(tok)
    assert logits.shape == (3, cfg.seq_len, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert isinstance(aux, dict)
    assert np.all(np.isfinite(np.asarray(logits)))
    h, _ = model.hidden(tok)
    assert h.shape == (3, cfg.seq_len, cfg.d_model)
    # a sequence shorter than seq_len also works (RoPE positions default to arange(T))
    logits_short, _ = model(tok[:, :5])
    assert logits_short.shape == (3, 5, cfg.vocab_size)
    # a causal model's prefix logits do not depend on the suffix
    np.testing.assert_allclose(np.asarray(logits_short), np.asarray(logits[:, :5]), rtol=1e-5, atol=1e-6)


def test_param_shapes_and_logical_names(tiny_config):
    cfg = model_cfg(tiny_config, model__n_kv_heads=2, model__n_layers=2)
    model = new_model(cfg, 0)
    L, d, h, kv, hd, f, V = 2, 64, 4, 2, 16, 128, 264
    expected = {
        ("embed", "embedding"): ((V, d), ("vocab", "embed")),
        ("final_norm", "scale"): ((d,), ("embed",)),
        ("mixer", "wq"): ((L, d, h, hd), ("layers", "embed", "heads", "head_dim")),
        ("mixer", "wkv"): ((L, d, 2, kv, hd), ("layers", "embed", None, "kv_heads", "head_dim")),
        ("mixer", "wo"): ((L, h, hd, d), ("layers", "heads", "head_dim", "embed")),
        ("ffn", "w_gate_up"): ((L, d, 2, f), ("layers", "embed", None, "mlp")),
        ("ffn", "w_down"): ((L, f, d), ("layers", "mlp", "embed")),
        ("mixer_norm", "scale"): ((L, d), ("layers", "embed")),
        ("ffn_norm", "scale"): ((L, d), ("layers", "embed")),
    }
    seen = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = tuple(str(p) for p in path[-2:])
        assert key in expected, path
        shape, names = expected[key]
        assert var.shape == shape, (path, var.shape)
        assert tuple(var.get_metadata()["out_sharding"]) == names, path
        assert var[...].dtype == jnp.float32
        seen.add(key)
    assert seen == set(expected)


# ----------------------------------------------------------------------------- causality

@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_causal_masking_exact(tiny_config, n_kv_heads):
    cfg = model_cfg(tiny_config, model__n_kv_heads=n_kv_heads, model__init_std=0.2)
    model = new_model(cfg, 1)
    fwd = jax.jit(lambda t: model(t)[0])
    tok = tokens_for(cfg, batch=2, seed=3)
    base = np.asarray(fwd(tok))
    for j in (0, 1, 7, cfg.seq_len - 1):
        changed = tok.at[:, j].set((tok[:, j] + 1 + j) % cfg.vocab_size)
        out = np.asarray(fwd(changed))
        np.testing.assert_array_equal(out[:, :j], base[:, :j])  # exactly: masked keys weigh 0
        assert not np.allclose(out[:, j], base[:, j])  # the changed position itself does change
        if j + 1 < cfg.seq_len:
            assert not np.allclose(out[:, j + 1:], base[:, j + 1:])  # later positions see it


# ----------------------------------------------------------------------------- RoPE

def test_rope_matches_complex_reference():
    rng = np.random.default_rng(0)
    hd, theta = 16, 10000.0
    x = rng.normal(size=(2, 9, 3, hd)).astype(np.float32)
    pos = rng.integers(0, 200, size=(2, 9))
    sin, cos = rope_angles(jnp.asarray(pos), hd, theta)
    assert sin.shape == (2, 9, hd // 2) and sin.dtype == jnp.float32
    got = np.asarray(apply_rope(jnp.asarray(x), sin, cos))
    np.testing.assert_allclose(got, ref_rope(x, pos, theta), rtol=1e-4, atol=1e-4)
    # [T]-shaped positions broadcast over the batch
    sin1, cos1 = rope_angles(jnp.arange(9), hd, theta)
    got1 = np.asarray(apply_rope(jnp.asarray(x), sin1, cos1))
    np.testing.assert_allclose(got1, ref_rope(x, np.broadcast_to(np.arange(9), (2, 9)), theta),
                               rtol=1e-5, atol=1e-5)
    # a rotation: norms are preserved
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # bf16 input keeps its dtype
    assert apply_rope(jnp.asarray(x, jnp.bfloat16), sin, cos).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="head_dim"):
        rope_angles(jnp.arange(4), 7, theta)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    hd, theta = 32, 10000.0
    q = jnp.asarray(rng.normal(size=(1, 1, 1, hd)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, hd)), jnp.float32)

    def rot(x, p):
        sin, cos = rope_angles(jnp.asarray([[p]]), hd, theta)
        return apply_rope(x, sin, cos)[0, 0, 0]

    def score(m, n):
        return float(jnp.dot(rot(q, m), rot(k, n)))

    scale = float(jnp.linalg.norm(q) * jnp.linalg.norm(k))
    for m, n in [(0, 0), (5, 2), (2, 5), (17, 3), (40, 41)]:
        for s in (1, 7, 30, 90):
            assert abs(score(m, n) - score(m + s, n + s)) < 2e-5 * scale, (m, n, s)
    # ... but it does depend on the offset (otherwise the property is vacuous)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3 * scale
    assert abs(score(5, 2) - score(2, 5)) > 1e-3 * scale


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_matches_numpy_reference(tiny_config, n_kv_heads):
    cfg = model_cfg(tiny_config, model__n_kv_heads=n_kv_heads, model__init_std=0.3,
                    model__seq_len=8)
    attn = new_attention(cfg, seed=2)
    x = jax.random.normal(jax.random.key(0), (2, 8, cfg.d_model), jnp.float32)
    pos = np.stack([np.arange(8), np.arange(8) + 5])
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [3, 3, 3, 3, 3, 3, 3, 3]])
    got = np.asarray(attn(x, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg)))
    want = ref_attention(x, attn.wq[...], attn.wkv[...], attn.wo[...], pos, cfg.rope_theta, seg)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_gqa_equals_mha_with_repeated_kv_heads(tiny_config):
    c_gqa = model_cfg(tiny_config, model__n_heads=4, model__n_kv_heads=2, model__init_std=0.3)
    c_mha = model_cfg(tiny_config, model__n_heads=4, model__n_kv_heads=4, model__init_std=0.3)
    gqa, mha = new_attention(c_gqa, 0), new_attention(c_mha, 1)
    group = c_gqa.n_heads // c_gqa.n_kv_heads
    # query head h uses kv head h // group -> repeat each kv head `group` times, consecutively
    mha.wq[...] = gqa.wq[...]
    mha.wo[...] = gqa.wo[...]
    mha.wkv[...] = jnp.repeat(gqa.wkv[...], group, axis=2)
    x = jax.random.normal(jax.random.key(3), (2, c_gqa.seq_len, c_gqa.d_model), jnp.float32)
    seg = jnp.asarray(np.repeat([[0, 1]], c_gqa.seq_len // 2, axis=1).repeat(2, axis=0))
    for kwargs in ({}, {"segment_ids": seg}):
        y_gqa, y_mha = np.asarray(gqa(x, **kwargs)), np.asarray(mha(x, **kwargs))
        np.testing.assert_allclose(y_gqa, y_mha, rtol=1e-5, atol=1e-6)
    # the other order (tile: query head h -> kv head h % n_kv_heads) is *not* equivalent,
    # so the check above really pins the grouping
    mha.wkv[...] = jnp.tile(gqa.wkv[...], (1, 1, group, 1))
    assert not np.allclose(np.asarray(gqa(x)), np.asarray(mha(x)), rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- scan / remat

def test_scan_vs_unrolled_same_logits_and_grads(tiny_config):
    cfgs = {s: model_cfg(tiny_config, model__n_layers=3, model__n_kv_heads=2, model__scan_layers=s)
            for s in (True, False)}
    models = {s: new_model(c, 0) for s, c in cfgs.items()}
    # share the exact same parameters
    params = nnx.state(models[True], nnx.Param)
    nnx.update(models[False], params)
    tok = tokens_for(cfgs[True], seed=4)
    tgt = jnp.roll(tok, -1, axis=1)
    res = {}
    for s, m in models.items():
        vg, p, _ = loss_and_grad_fn(m)
        (loss, logits), grads = vg(p, tok, tgt)
        res[s] = (np.asarray(logits), float(loss), grads)
    np.testing.assert_allclose(res[False][0], res[True][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res[False][1], res[True][1], rtol=1e-6)
    assert_trees_close(res[False][2], res[True][2], rtol=1e-5)
    # the gradient reaches every layer of the stack (no silently dropped group)
    n_wq = 0
    for path, v in nnx.to_flat_state(res[True][2]):
        if str(path[-1]) == "wq":
            g = np.abs(np.asarray(v[...])).reshape(3, -1).max(axis=1)
            assert np.all(g > 0), g
            n_wq += 1
    assert n_wq == 1


def test_remat_policies_same_loss_and_grads(tiny_config):
    tok = None
    results = {}
    marker = {"none": None, "full": "nothing_saveable", "dots": "DotsSaveable(only_if_no_batch_dims=True)"}
    # (remat, scan_layers): the unrolled loop takes the prevent_cse=True branch
    for remat, scan in [("none", True), ("full", True), ("dots", True), ("full", False)]:
        cfg = model_cfg(tiny_config, model__n_layers=2, model__n_kv_heads=2, model__remat=remat,
                        model__scan_layers=scan)
        m = new_model(cfg, 0)  # same seed -> same params regardless of remat
        if tok is None:
            tok = tokens_for(cfg, seed=5)
        tgt = jnp.roll(tok, -1, axis=1)
        vg, params, loss = loss_and_grad_fn(m)
        (value, _), grads = vg(params, tok, tgt)
        results[remat, scan] = (value, grads)
        # the policy really reaches the traced program
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: loss(*a)[0]))(params, tok, tgt))
        if remat == "none":
            assert "remat" not in jaxpr and "checkpoint" not in jaxpr
        else:
            assert "remat" in jaxpr or "checkpoint" in jaxpr
            assert marker[remat] in jaxpr
    base_loss, base_grads = results["none", True]
    for key in [("full", True), ("dots", True), ("full", False)]:
        loss_value, grads = results[key]
        np.testing.assert_allclose(float(loss_value), float(base_loss), rtol=1e-5)
        assert_trees_close(grads, base_grads, rtol=1e-5)


# ----------------------------------------------------------------------------- params

def analytic_param_count(cfg):
    d, h, kv, hd, f, V, L = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                             cfg.vocab_size, cfg.n_layers)
    per_layer = 2 * d + d * h * hd + d * 2 * kv * hd + h * hd * d + d * 2 * f + f * d
    return V * d + d + L * per_layer + (0 if cfg.tie_embeddings else d * V)


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_tied_vs_untied_param_count(tiny_config, n_kv_heads):
    counts, actual = {}, {}
    for tie in (True, False):
        cfg = model_cfg(tiny_config, model__tie_embeddings=tie, model__n_kv_heads=n_kv_heads,
                        model__n_layers=3)
        counts[tie] = count_params(cfg)
        m = new_model(cfg, 0)
        actual[tie] = sum(int(np.size(v)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
        assert counts[tie]["n_params"] == actual[tie] == analytic_param_count(cfg)
        assert counts[tie]["n_active_params"] == counts[tie]["n_params"]
        assert hasattr(m, "head") != tie
    V, d = cfg.vocab_size, cfg.d_model
    assert counts[False]["n_params"] - counts[True]["n_params"] == V * d
    assert counts[False]["n_params_non_embedding"] == counts[True]["n_params_non_embedding"]
    assert counts[True]["n_params"] - counts[True]["n_params_non_embedding"] == V * d


def test_untied_head_is_used(tiny_config):
    cfg = model_cfg(tiny_config, model__tie_embeddings=False)
    m = new_model(cfg, 0)
    tok = tokens_for(cfg, batch=2)
    h, _ = m.hidden(tok)
    logits, _ = m(tok)
    np.testing.assert_allclose(np.asarray(logits), np.einsum("btd,dv->btv", np.asarray(h), np.asarray(m.head[...])),
                               rtol=1e-4, atol=1e-5)
    cfg_t = model_cfg(tiny_config, model__tie_embeddings=True)
    mt = new_model(cfg_t, 0)
    ht, _ = mt.hidden(tok)
    np.testing.assert_allclose(np.asarray(mt(tok)[0]),
                               np.einsum("btd,vd->btv", np.asarray(ht), np.asarray(mt.embed.embedding[...])),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- precision

def test_bfloat16_compute_close_to_float32(tiny_config):
    c32 = model_cfg(tiny_config, model__n_kv_heads=2, model__dtype="float32")
    c16 = model_cfg(tiny_config, model__n_kv_heads=2, model__dtype="bfloat16")
    m32, m16 = new_model(c32, 0), new_model(c16, 0)
    p32 = nnx.state(m32, nnx.Param)
    for v in jax.tree.leaves(nnx.state(m16, nnx.Param)):
        assert v.dtype == jnp.float32  # parameters stay float32
    assert_trees_close(nnx.state(m16, nnx.Param), p32, rtol=0, atol_frac=0)  # same init
    tok = tokens_for(c32, seed=6)
    l32, _ = m32(tok)
    l16, _ = m16(tok)
    assert l16.dtype == jnp.float32 and l16.shape == l32.shape
    h16, _ = m16.hidden(tok)
    assert h16.dtype == jnp.bfloat16
    a, b = np.asarray(l16), np.asarray(l32)
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert 0 < rel < 3e-2, rel  # > 0: bf16 compute is really used
    # gradients in bf16 compute are float32 (params dtype) and close too
    tgt = jnp.roll(tok, -1, axis=1)
    ((loss32, _), g32), ((loss16, _), g16) = (vg(p, tok, tgt) for vg, p, _ in map(loss_and_grad_fn, (m32, m16)))
    assert abs(float(loss16) - float(loss32)) < 1e-2 * abs(float(loss32))
    for x, y in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert x.dtype == jnp.float32
        assert np.linalg.norm(np.asarray(x) - np.asarray(y)) <= 0.1 * np.linalg.norm(np.asarray(y)) + 1e-8


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_segment_ids_isolate_packed_documents(tiny_config, n_kv_heads):
    cfg = model_cfg(tiny_config, model__n_kv_heads=n_kv_heads, model__init_std=0.2)
    m = new_model(cfg, 2)
    T, la = cfg.seq_len, 6
    lb = T - la
    rng = np.random.default_rng(7)
    doc_a = rng.integers(0, cfg.vocab_size, (2, la))
    doc_b = rng.integers(0, cfg.vocab_size, (2, lb))
    packed = jnp.asarray(np.concatenate([doc_a, doc_b], axis=1), jnp.int32)
    seg = jnp.asarray(np.broadcast_to(np.r_[np.ones(la), 2 * np.ones(lb)], (2, T)), jnp.int32)
    pos = jnp.asarray(np.broadcast_to(np.r_[np.arange(la), np.arange(lb)], (2, T)), jnp.int32)
    fwd = jax.jit(lambda t, s, p: m(t, segment_ids=s, positions=p)[0])
    out = np.asarray(fwd(packed, seg, pos))
    alone_b = np.asarray(fwd(jnp.asarray(doc_b, jnp.int32), jnp.ones((2, lb), jnp.int32),
                             jnp.broadcast_to(jnp.arange(lb, dtype=jnp.int32), (2, lb))))
    alone_a = np.asarray(fwd(jnp.asarray(doc_a, jnp.int32), jnp.ones((2, la), jnp.int32),
                             jnp.broadcast_to(jnp.arange(la, dtype=jnp.int32), (2, la))))
    np.testing.assert_allclose(out[:, la:], alone_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, :la], alone_a, rtol=1e-5, atol=1e-5)
    # without segment_ids, document B attends to document A: the check above is not vacuous
    leaky = np.asarray(jax.jit(lambda t, p: m(t, positions=p)[0])(packed, pos))
    assert not np.allclose(leaky[:, la:], alone_b, rtol=1e-3, atol=1e-3)
