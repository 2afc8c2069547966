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


def random_module(factory, seed=0, std=0.02):
    """Build ``factory()`` abstractly (shapes + logical names only) and fill its Params with numpy
    normals: weights ~ N(0, std^2), norm scales ~ 1 + N(0, 0.1^2). Much faster than the eager
    library init (which compiles one PRNG kernel per parameter shape) and just as good for
    equivalence tests; the library init itself is tested in test_library_init_statistics."""
    abstract = nnx.eval_shape(factory)
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if "scale" in jax.tree_util.keystr(path):
            x = 1.0 + 0.1 * rng.standard_normal(s.shape)
        else:
            x = std * rng.standard_normal(s.shape)
        return jnp.asarray(x, s.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def random_model(cfg, seed=0, std=0.02):
    return random_module(lambda: new_model(cfg, 0), seed, std)


def new_attention(cfg, seed=0, std=0.3):
    def make():
        with nnx.use_eager_sharding(False):
            return Attention(cfg, rngs=nnx.Rngs(0))
    return random_module(make, seed, std)


def loss_and_grad_fn(model):
    """jit(value_and_grad) of the mean next-token CE w.r.t. the model's Params; the logits are
    returned as aux: ``vg(params, tokens, targets) -> ((loss, logits), grads)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, tokens, targets):
        logits, _ = nnx.merge(graphdef, p, rest)(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), params, loss


def dot_operand_dtypes(closed_jaxpr):
    """Operand dtypes of every dot_general in a jaxpr, including scan/remat/pjit bodies."""
    out = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(closed_jaxpr.jaxpr)
    return out


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

def test_library_init_shapes_names_and_statistics(tiny_config):
    cfg = model_cfg(tiny_config, model__n_kv_heads=2, model__n_layers=2)
    model = nnx.jit(lambda: new_model(cfg, 0))()
    L, d, h, kv, hd, f, V = 2, 64, 4, 2, 16, 128, 264
    std, std_out = cfg.init_std, cfg.init_std / math.sqrt(2 * L)  # output projections are scaled
    expected = {
        ("embed", "embedding"): ((V, d), ("vocab", "embed"), std),
        ("final_norm", "scale"): ((d,), ("embed",), None),
        ("mixer", "wq"): ((L, d, h, hd), ("layers", "embed", "heads", "head_dim"), std),
        ("mixer", "wkv"): ((L, d, 2, kv, hd), ("layers", "embed", None, "kv_heads", "head_dim"), std),
        ("mixer", "wo"): ((L, h, hd, d), ("layers", "heads", "head_dim", "embed"), std_out),
        ("ffn", "w_gate_up"): ((L, d, 2, f), ("layers", "embed", None, "mlp"), std),
        ("ffn", "w_down"): ((L, f, d), ("layers", "mlp", "embed"), std_out),
        ("mixer_norm", "scale"): ((L, d), ("layers", "embed"), None),
        ("ffn_norm", "scale"): ((L, d), ("layers", "embed"), None),
    }
    seen = set()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = tuple(str(p) for p in path[-2:])
        assert key in expected, path
        shape, names, want_std = expected[key]
        x = np.asarray(var[...])
        assert x.shape == shape, (path, x.shape)
        assert tuple(var.get_metadata()["out_sharding"]) == names, path
        assert x.dtype == np.float32
        if want_std is None:
            np.testing.assert_array_equal(x, np.ones_like(x))
        else:
            assert abs(x.mean()) < 4 * want_std / math.sqrt(x.size)
            assert abs(x.std() / want_std - 1) < 0.1, (path, x.std(), want_std)
            if x.ndim and x.shape[0] == L and path[0] == "groups":  # layers get different draws
                assert not np.array_equal(x[0], x[1]), path
        seen.add(key)
    assert seen == set(expected)
    assert not np.array_equal(np.asarray(model.groups.blocks[0].mixer.wkv[...][:, :, 0]),
                              np.asarray(model.groups.blocks[0].mixer.wkv[...][:, :, 1]))

    # forward: float32 logits [B, T, V], hidden [B, T, d]
    tok = tokens_for(cfg, batch=3)
    fwd = jax.jit(lambda t: (model(t), model.hidden(t)[0]))
    (logits, aux), h = fwd(tok)
    assert logits.shape == (3, cfg.seq_len, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert isinstance(aux, dict)
    assert np.all(np.isfinite(np.asarray(logits)))
    assert h.shape == (3, cfg.seq_len, cfg.d_model) and h.dtype == jnp.float32
    # a shorter sequence works too (RoPE positions default to arange(T)), and by causality its
    # logits equal the prefix of the full-length ones
    (logits_short, _), _ = fwd(tok[:, :5])
    assert logits_short.shape == (3, 5, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(logits_short), np.asarray(logits[:, :5]), rtol=1e-5, atol=1e-6)
    # same seed -> same params (a separately traced init; eager vs jit may differ by 1 ulp)
    m_again = nnx.jit(lambda: new_model(cfg, 0))()
    assert_trees_close(nnx.state(m_again, nnx.Param), nnx.state(model, nnx.Param), rtol=1e-6, atol_frac=0)


# ----------------------------------------------------------------------------- causality

@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_causal_masking_exact(tiny_config, n_kv_heads):
    cfg = model_cfg(tiny_config, model__n_kv_heads=n_kv_heads, model__init_std=0.2)
    model = random_model(cfg, seed=1, std=0.2)
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
    both = nnx.jit(lambda g, m, x, seg: (g(x), m(x), g(x, segment_ids=seg), m(x, segment_ids=seg)))
    y_gqa, y_mha, ys_gqa, ys_mha = map(np.asarray, both(gqa, mha, x, seg))
    # float32 rounding of the two head layouts' contractions: absolute, relative to the output scale
    tol = 2e-6 * np.abs(y_mha).max()
    np.testing.assert_allclose(y_gqa, y_mha, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(ys_gqa, ys_mha, rtol=1e-5, atol=tol)
    assert not np.allclose(y_gqa, ys_gqa, rtol=1e-3, atol=1e-4)  # the segments matter
    # the other order (tile: query head h -> kv head h % n_kv_heads) is *not* equivalent,
    # so the check above really pins the grouping
    mha.wkv[...] = jnp.tile(gqa.wkv[...], (1, 1, group, 1))
    y_gqa, y_tile, _, _ = map(np.asarray, both(gqa, mha, x, seg))
    assert not np.allclose(y_gqa, y_tile, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- scan / remat

def test_scan_vs_unrolled_same_logits_and_grads(tiny_config):
    cfgs = {s: model_cfg(tiny_config, model__n_layers=3, model__n_kv_heads=2, model__scan_layers=s)
            for s in (True, False)}
    models = {s: random_model(c, seed=0) for s, c in cfgs.items()}
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
        m = random_model(cfg, seed=0)  # same seed -> same params regardless of remat
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
        m = nnx.eval_shape(lambda: new_model(cfg, 0))  # shapes are all that is needed here
        actual[tie] = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
        assert counts[tie]["n_params"] == actual[tie] == analytic_param_count(cfg)
        assert counts[tie]["n_active_params"] == counts[tie]["n_params"]
        assert hasattr(m, "head") != tie
    V, d = cfg.vocab_size, cfg.d_model
    assert counts[False]["n_params"] - counts[True]["n_params"] == V * d
    assert counts[False]["n_params_non_embedding"] == counts[True]["n_params_non_embedding"]
    assert counts[True]["n_params"] - counts[True]["n_params_non_embedding"] == V * d


@pytest.mark.parametrize("tie", [True, False])
def test_lm_head_uses_the_right_matrix(tiny_config, tie):
    cfg = model_cfg(tiny_config, model__tie_embeddings=tie)
    m = random_model(cfg, seed=3)
    tok = tokens_for(cfg, batch=2)
    h, logits = jax.jit(lambda t: (m.hidden(t)[0], m(t)[0]))(tok)
    w = np.asarray(m.embed.embedding[...]).T if tie else np.asarray(m.head[...])
    np.testing.assert_allclose(np.asarray(logits), np.einsum("btd,dv->btv", np.asarray(h), w),
                               rtol=1e-4, atol=1e-5)
    # the final RMSNorm is applied: h has unit RMS up to the norm scale
    scale = np.asarray(m.final_norm.scale[...])
    rms = np.sqrt(np.mean((np.asarray(h) / scale) ** 2, axis=-1))
    np.testing.assert_allclose(rms, 1.0, rtol=1e-3)


# ----------------------------------------------------------------------------- precision

def test_bfloat16_compute_close_to_float32(tiny_config):
    c32 = model_cfg(tiny_config, model__n_kv_heads=2, model__dtype="float32")
    c16 = model_cfg(tiny_config, model__n_kv_heads=2, model__dtype="bfloat16")
    m32, m16 = random_model(c32, seed=0), random_model(c16, seed=0)
    for v in jax.tree.leaves(nnx.state(m16, nnx.Param)):
        assert v.dtype == jnp.float32  # parameters stay float32
    assert_trees_close(nnx.state(m16, nnx.Param), nnx.state(m32, nnx.Param), rtol=0, atol_frac=0)
    tok = tokens_for(c32, seed=6)
    tgt = jnp.roll(tok, -1, axis=1)
    h16 = jax.eval_shape(lambda t: m16.hidden(t)[0], tok)
    assert h16.dtype == jnp.bfloat16  # activations really are in the compute dtype
    # every matmul of the forward pass takes bf16 operands (f32 ones in the f32 model)
    for m, dt in ((m16, "bfloat16"), (m32, "float32")):
        dots = dot_operand_dtypes(jax.make_jaxpr(lambda t: m(t)[0])(tok))
        assert len(dots) >= 6 and all(d == (dt, dt) for d in dots), dots
    (loss32, l32), g32 = loss_and_grad_fn(m32)[0](nnx.state(m32, nnx.Param), tok, tgt)
    (loss16, l16), g16 = loss_and_grad_fn(m16)[0](nnx.state(m16, nnx.Param), tok, tgt)
    assert l16.dtype == jnp.float32 and l16.shape == l32.shape  # logits come back in float32
    a, b = np.asarray(l16), np.asarray(l32)
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert 0 < rel < 3e-2, rel  # > 0: bf16 compute is really used
    assert abs(float(loss16) - float(loss32)) < 1e-2 * abs(float(loss32))
    # gradients w.r.t. the float32 params are float32 and close to the float32 ones
    for x, y in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert x.dtype == jnp.float32
        x, y = np.asarray(x), np.asarray(y)
        assert np.linalg.norm(x - y) <= 0.1 * np.linalg.norm(y) + 1e-8


# ----------------------------------------------------------------------------- packing

def test_segment_ids_isolate_packed_documents(tiny_config):
    cfg = model_cfg(tiny_config, model__n_kv_heads=2, model__init_std=0.2)
    m = random_model(cfg, seed=2, std=0.2)
    T = cfg.seq_len
    la = lb = T // 2  # equal lengths: both documents run alone in one [4, T/2] call
    rng = np.random.default_rng(7)
    doc_a = rng.integers(0, cfg.vocab_size, (2, la))
    doc_b = rng.integers(0, cfg.vocab_size, (2, lb))
    packed = jnp.asarray(np.concatenate([doc_a, doc_b], axis=1), jnp.int32)
    seg = jnp.asarray(np.broadcast_to(np.r_[np.ones(la), 2 * np.ones(lb)], (2, T)), jnp.int32)
    # the same RoPE positions in both runs: only the attention mask differs
    pos = jnp.asarray(np.broadcast_to(np.r_[np.arange(la), np.arange(lb)], (2, T)), jnp.int32)
    fwd = jax.jit(lambda t, s, p: m(t, segment_ids=s, positions=p)[0])
    out = np.asarray(fwd(packed, seg, pos))
    alone = np.asarray(fwd(jnp.asarray(np.concatenate([doc_a, doc_b]), jnp.int32),
                           jnp.ones((4, la), jnp.int32),
                           jnp.broadcast_to(jnp.arange(la, dtype=jnp.int32), (4, la))))
    np.testing.assert_allclose(out[:, la:], alone[2:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, :la], alone[:2], rtol=1e-5, atol=1e-5)
    # with a single segment, document B attends to document A: the check above is not vacuous
    leaky = np.asarray(fwd(packed, jnp.ones_like(seg), pos))
    assert not np.allclose(leaky[:, la:], alone[2:], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(leaky[:, :la], alone[:2], rtol=1e-5, atol=1e-5)  # causal anyway


@pytest.mark.parametrize("spec,xs,ws", [
    ("btd,dchk->btchk", (2, 5, 8), (8, 3, 2, 4)),
    ("...d,dchp->...chp", (2, 5, 8), (8, 2, 3, 4)),
    ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 8)),
    ("btd,dh->bth", (2, 5, 8), (8, 3)),
])
def test_float32_projection_as_2d_matmul_matches_einsum(spec, xs, ws):
    """float32 projections run as one 2-D matmul between reshapes (layers.matmul): same values
    and gradients as the N-D einsum (float64 reference); non-projection specs are left alone."""
    from efficient_arch.models import layers

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    r = rng.standard_normal(np.einsum(spec, x, w).shape)
    assert layers.PROJECT_2D and layers._projection_2d(spec, xs, ws) is not None
    f = lambda x, w: jnp.sum(layers.matmul(spec, x, w, jnp.float32) * r)  # noqa: E731
    val, (gx, gw) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    with jax.enable_x64(True):  # reference: the plain N-D einsum in float64
        ref = lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * r)  # noqa: E731
        rval, (rgx, rgw) = jax.value_and_grad(ref, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(val, rval, rtol=1e-5)
    np.testing.assert_allclose(gx, rgx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, rgw, rtol=1e-5, atol=1e-5)
    # repeated labels, mismatched or broadcast contracted sizes: left to einsum (found by review:
    # "bdd,dk->bdk" gave wrong values through the 2-D path)
    assert layers._projection_2d("bdd,dk->bdk", (2, 4, 4), (4, 3)) is None
    assert layers._projection_2d("bd,ddk->bdk", (2, 4), (4, 4, 3)) is None
    assert layers._projection_2d("bcd,cdk->bk", (2, 4, 6), (6, 4, 3)) is None
    assert layers._projection_2d("btd,dk->btk", (2, 5, 8), (1, 3)) is None
    for bad in ("btd,dk", "btd,dk,kn->btn", "btd->bt", "btd,dk->btk->b"):  # implicit or not two operands
        with pytest.raises(ValueError, match="explicit two-operand einsum"):
            layers.matmul(bad, jnp.ones(xs, jnp.float32), jnp.ones(ws, jnp.float32), jnp.float32)
    for other in ("bnihk,bnjhk->bnhij", "bnhij,bnjhv->bnihv", "md,df->mf"):
        assert layers._projection_2d(other, (2, 3, 4, 5, 6) if other[0] == "b" else (4, 8),
                                     (2, 3, 4, 5, 6) if other[0] == "b" else (8, 3)) is None
