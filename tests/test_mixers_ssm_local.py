"""Tests for the Mamba-2, Based and sliding-window mixers (and their experiment configs).

Per mixer: shapes/dtypes; the fast forms against slow float64 numpy references written from the
papers' equations; chunked == recurrent == quadratic; token-by-token decode == full forward;
causality; packed documents == separate documents; the sliding window's locality; analytic
FLOPs against XLA's cost analysis; a few LM train steps from the experiment configs.
"""

from __future__ import annotations

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_arch import parallel, train
from efficient_arch.config import finalize
from efficient_arch.models import registry
from efficient_arch.models.mixers.attention import Attention

from conftest import numpy_init_state, REPO_ROOT, make_tiny_config
from test_ops_conv import conv_reference

MIXERS = ("sliding_window", "mamba2", "based")
# d 32, 4 heads of 8 (GQA 4/2); Mamba-2: inner 64 = 8 heads of 8, state 8; Based: F = 4 (K = 21)
SMALL = dict(d_model=32, n_heads=4, n_kv_heads=2, seq_len=24, chunk_size=8, window_size=6,
             state_size=8, feature_dim=4, expand=2, conv_width=4)


def mixer_cfg(name, **model):
    return finalize(make_tiny_config(**{f"model__{k}": v for k, v in
                                        {"mixer": name, **SMALL, **model}.items()})).model


def make_mixer(name, seed=0, cls=None, **model):
    """A mixer with deterministic numpy-filled parameters (no PRNG-kernel compiles): weights
    ~ N(0, 0.25^2), norm scales / D ~ 1 + N(0, 0.1^2), conv taps ~ N(0, 0.5^2), and Mamba-2's
    A in [1, 4], softplus(dt_bias) in [0.05, 0.5] (decays that keep several tokens in memory)."""
    cfg = mixer_cfg(name, **model)
    cls = cls or registry.get_mixer(name)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        key = jax.tree_util.keystr(path)
        if "A_log" in key:
            x = np.log(rng.uniform(1.0, 4.0, s.shape))
        elif "dt_bias" in key:
            dt = rng.uniform(0.05, 0.5, s.shape)
            x = dt + np.log(-np.expm1(-dt))
        elif "scale" in key or "'D'" in key:
            x = 1.0 + 0.1 * rng.standard_normal(s.shape)
        elif "conv" in key:
            x = 0.5 * rng.standard_normal(s.shape)
        else:
            x = 0.25 * rng.standard_normal(s.shape)
        return jnp.asarray(x, s.dtype)

    return cfg, nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


# one jitted forward for every test: compiled once per (mixer config, shape), cached on disk
_FWD = nnx.jit(lambda m, x, seg: m(x, segment_ids=seg))


def fwd(m, x, seg=None):
    """Jitted ``m(x, segment_ids=seg)`` as a numpy array (float32)."""
    return np.asarray(_FWD(m, x, None if seg is None else jnp.asarray(seg)).astype(jnp.float32))


def inputs(b=2, t=21, d=32, seed=1, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, d)), dtype)


SEG = np.array([[0] * 9 + [1] * 7 + [2] * 5, [3] * 21], np.int32)  # row 0: three documents


def p64(v):
    return np.asarray(v[...], np.float64)


# ----------------------------------------------------------------------------- float64 references


def silu(x):
    return x / (1.0 + np.exp(-x))


def mamba2_reference(m, x, seg, eps):
    """Dao & Gu 2024 Sec. 7 Mamba-2 block, as an explicit loop over time in float64."""
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    h, p, n = m.n_heads, m.head_dim, m.state_size
    w_zx, w_bc = p64(m.w_zx), p64(m.w_bc)
    z = np.einsum("btd,dhp->bthp", x, w_zx[:, 0])
    xs = np.einsum("btd,dhp->bthp", x, w_zx[:, 1])
    bc = np.einsum("btd,dcn->btcn", x, w_bc)
    dt = x @ p64(m.w_dt)
    wx, bx = p64(m.conv_x.weight), p64(m.conv_x.bias)
    wb, bb = p64(m.conv_bc.weight), p64(m.conv_bc.bias)
    xs = silu(conv_reference(xs.reshape(b, t, -1), wx.reshape(len(wx), -1), bx.reshape(-1), seg)).reshape(b, t, h, p)
    bc = silu(conv_reference(bc.reshape(b, t, -1), wb.reshape(len(wb), -1), bb.reshape(-1), seg)).reshape(b, t, 2, n)
    dt = np.log1p(np.exp(dt + p64(m.dt_bias)))
    decay = np.exp(dt * -np.exp(p64(m.A_log)))  # [B, T, H]
    d_skip = p64(m.D)
    y = np.zeros((b, t, h, p))
    for bi in range(b):
        s = np.zeros((h, n, p))
        for ti in range(t):
            if seg is not None and ti > 0 and seg[bi, ti] != seg[bi, ti - 1]:
                s = np.zeros_like(s)
            s = decay[bi, ti][:, None, None] * s + np.einsum("n,hp->hnp", bc[bi, ti, 0], dt[bi, ti][:, None] * xs[bi, ti])
            y[bi, ti] = np.einsum("n,hnp->hp", bc[bi, ti, 1], s) + d_skip[:, None] * xs[bi, ti]
    g = y * silu(z)
    g = g / np.sqrt(np.mean(g * g, axis=(-2, -1), keepdims=True) + eps) * p64(m.norm.scale)
    return np.einsum("bthp,hpd->btd", g, p64(m.w_out))


def based_reference(m, x, seg):
    """Arora et al. 2024 normalised Taylor linear attention, kernel 1 + s + s^2/2, s = q.k / sqrt(F), written
    directly on pairs (no feature map): float64."""
    x = np.asarray(x, np.float64)
    t = x.shape[1]
    qk = np.einsum("btd,dchf->btchf", x, p64(m.wqk))
    v = np.einsum("btd,dhk->bthk", x, p64(m.wv))
    s = np.einsum("bihf,bjhf->bhij", qk[:, :, 0], qk[:, :, 1]) / math.sqrt(m.feature_dim)
    kern = 1.0 + s + s * s / 2.0
    mask = np.tril(np.ones((t, t), bool))[None, None]
    if seg is not None:
        mask = mask & (seg[:, :, None] == seg[:, None, :])[:, None]
    kern = kern * mask
    y = np.einsum("bhij,bjhk->bihk", kern, v) / np.moveaxis(kern.sum(-1), 1, 2)[..., None]
    return np.einsum("bthk,hkd->btd", y, p64(m.wo))


def window_reference(m, x, window, seg):
    """Softmax attention restricted to keys t-W+1..t (same document), float64, on the mixer's
    own q/k/v projections (Attention._qkv: projections + RoPE)."""
    q, k, v = (np.asarray(a, np.float64) for a in m._qkv(x, jnp.arange(x.shape[1])))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    t = x.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = ((i >= j) & (i - j < window))[None, None]
    if seg is not None:
        mask = mask & (seg[:, :, None] == seg[:, None, :])[:, None]
    s = np.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr = pr / pr.sum(-1, keepdims=True)
    o = np.einsum("bhij,bjhd->bihd", pr, v)
    return np.einsum("bthk,hkd->btd", o, p64(m.wo))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", MIXERS)
def test_shapes_and_dtypes(name):
    for dtype in ("float32", "bfloat16"):
        _, m = make_mixer(name, dtype=dtype)
        y = _FWD(m, inputs(dtype=m.dtype), None)
        assert y.shape == (2, 21, 32) and y.dtype == m.dtype
        assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
        assert float(jnp.std(y.astype(jnp.float32))) > 1e-2  # not a degenerate zero map


@pytest.mark.parametrize("seg", [None, SEG], ids=["plain", "segments"])
def test_mamba2_matches_float64_reference_in_every_form(seg):
    x = inputs()
    outs = {}
    for form in ("chunked", "recurrent", "quadratic"):
        cfg, m = make_mixer("mamba2", mixer_form=form)
        outs[form] = fwd(m, x, seg)
    ref = mamba2_reference(m, x, seg, cfg.norm_eps)
    for form, y in outs.items():
        np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-5, err_msg=form)
    np.testing.assert_allclose(outs["chunked"], outs["recurrent"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seg", [None, SEG], ids=["plain", "segments"])
def test_based_matches_float64_reference_in_every_form(seg):
    x = inputs()
    outs = {}
    for form in ("chunked", "recurrent", "quadratic"):
        _, m = make_mixer("based", mixer_form=form)
        outs[form] = fwd(m, x, seg)
    ref = based_reference(m, x, seg)
    for form, y in outs.items():
        np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-5, err_msg=form)
    np.testing.assert_allclose(outs["chunked"], outs["recurrent"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window,seg", [(1, SEG), (6, None), (6, SEG), (8, SEG), (40, None)],
                         ids=["W1-seg", "W6", "W6-seg", "W8-seg", "W40"])
def test_sliding_window_blocked_and_xla_forms_match_reference(window, seg):
    """T = 21 is not a multiple of any window; GQA (4 query / 2 kv heads); packed documents."""
    x = inputs()
    ref = None
    for form in ("chunked", "quadratic"):
        _, m = make_mixer("sliding_window", window_size=window, mixer_form=form)
        if ref is None:
            ref = window_reference(m, x, window, seg)
        np.testing.assert_allclose(fwd(m, x, seg), ref, rtol=1e-4, atol=1e-5, err_msg=f"{form} W={window}")


def test_sliding_window_blocked_form_gradients_match_the_xla_form():
    """Gradients wrt the input and every parameter: the blocked form (each block a batch row of
    the attention core, custom backward) against the masked XLA form, W = 6, packed documents."""
    x, seg = inputs(), jnp.asarray(SEG)
    ct = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)
    grads = {}
    for form in ("chunked", "quadratic"):
        _, m = make_mixer("sliding_window", window_size=6, mixer_form=form)
        gd, st = nnx.split(m)
        grads[form] = jax.grad(lambda st, x: jnp.sum(nnx.merge(gd, st)(x, segment_ids=seg) * ct),
                               argnums=(0, 1))(st, x)
    flat = [jax.tree_util.tree_leaves(grads[f]) for f in ("chunked", "quadratic")]
    assert len(flat[0]) == 4  # wq, wkv, wo, and the input
    for a, b in zip(*flat):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_sliding_window_locality_and_full_attention_limit():
    x = inputs()
    # window >= T: exactly causal attention with the same parameters
    _, swa = make_mixer("sliding_window", window_size=21)
    _, att = make_mixer("attention", cls=Attention)
    np.testing.assert_allclose(fwd(swa, x), fwd(att, x), rtol=1e-5, atol=1e-6)
    # window 6 < T: perturbing token s changes outputs s .. s+5 and nothing else
    s, w = 7, 6
    x2 = x.at[:, s].add(1.0)
    for form in ("chunked", "quadratic"):
        _, m = make_mixer("sliding_window", window_size=w, mixer_form=form)
        diff = np.abs(fwd(m, x2) - fwd(m, x)).max(axis=(0, 2))
        assert np.all(diff[:s] == 0) and np.all(diff[s + w:] == 0), (form, diff)
        assert np.all(diff[s:s + w] > 1e-4), (form, diff)
    # ... whereas full attention is influenced by the token at every later position
    diff_full = np.abs(fwd(att, x2) - fwd(att, x)).max(axis=(0, 2))
    assert np.all(diff_full[s:] > 1e-5)


@pytest.mark.parametrize("name,model", [
    ("sliding_window", {}),                       # ring buffer of 6 wraps 3 times
    ("sliding_window", {"window_size": 30}),      # cache clipped to max_len 24 < window
    ("mamba2", {}), ("mamba2", {"dtype": "bfloat16"}), ("based", {})])
def test_decode_matches_forward(name, model):
    _, m = make_mixer(name, **model)
    x = inputs(dtype=m.dtype)
    full = fwd(m, x)
    cache = m.init_cache(2, 24)
    step = nnx.jit(lambda mod, xt, c, pos: mod.decode(xt, c, position=pos))
    outs = []
    for t in range(x.shape[1]):
        y, cache = step(m, x[:, t:t + 1], cache, jnp.int32(t))
        assert y.shape == (2, 1, 32)
        outs.append(np.asarray(y.astype(jnp.float32)))
    tol = 3e-2 if m.dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=tol, atol=tol)
    if name == "mamba2":
        assert cache["ssm"].dtype == jnp.float32 and cache["ssm"].shape == (2, 8, 8, 8)
    if name == "sliding_window":
        assert cache["k"].shape[1] == min(model.get("window_size", 6), 24)


@pytest.mark.parametrize("name", MIXERS)
def test_causal(name):
    _, m = make_mixer(name)
    x = inputs()
    t0 = 13
    d = np.abs(fwd(m, x.at[:, t0].add(1.0)) - fwd(m, x)).max(axis=(0, 2))
    assert np.all(d[:t0] < 1e-6), d
    assert d[t0] > 1e-4


@pytest.mark.parametrize("name", MIXERS)
def test_packed_documents_equal_separate_documents(name):
    """Row 0 packs three documents; each, run alone (RoPE positions restart at 0 for the
    sliding window; only relative positions matter), gives the packed outputs."""
    _, m = make_mixer(name)
    x = inputs()
    packed = fwd(m, x, SEG)
    spans = [(0, 9), (9, 16), (16, 21)]
    # the documents alone, as one batch right-padded to 9 tokens (padding after a token cannot
    # affect it: causality is tested separately)
    docs = jnp.stack([jnp.pad(x[0, lo:hi], ((0, 9 - (hi - lo)), (0, 0))) for lo, hi in spans])
    alone = fwd(m, docs)
    for i, (lo, hi) in enumerate(spans):
        np.testing.assert_allclose(packed[0, lo:hi], alone[i, :hi - lo], rtol=1e-4, atol=2e-5,
                                   err_msg=f"{lo}:{hi}")
    unpacked = fwd(m, x)
    np.testing.assert_allclose(packed[1], unpacked[1], rtol=1e-5, atol=1e-6)  # one segment
    # without segment ids the second document does see the first (so the above is not vacuous)
    assert np.abs(unpacked[0, 9:16] - packed[0, 9:16]).max() > 1e-4


FLOP_SHAPE = dict(d_model=512, n_heads=8, n_kv_heads=8, seq_len=512, chunk_size=64, window_size=64,
                  state_size=64, feature_dim=16, expand=2)


@pytest.mark.parametrize("name,form", [("sliding_window", "chunked"), ("sliding_window", "quadratic"),
                                       ("mamba2", "chunked"), ("based", "chunked"), ("based", "quadratic")])
def test_flops_per_token_matches_xla(name, form):
    """Forward of one mixer, B=2, T=512, d=512 (matmuls dominate): XLA's HLO count over the
    analytic executed count (``attention="executed"``) lies in [1, 1.05]; the excess is elementwise
    work (softmax, gates, norms, decays) that the analytic count leaves out."""
    cfg = finalize(make_tiny_config(**{f"model__{k}": v for k, v in
                                       {"mixer": name, **FLOP_SHAPE, "mixer_form": form}.items()})).model
    cls = registry.get_mixer(name)
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    b, t = 2, cfg.seq_len
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    xla = fwd.lower(state, jax.ShapeDtypeStruct((b, t, cfg.d_model), jnp.float32)).cost_analysis()["flops"]
    ana = cls.flops_per_token(cfg, t, attention="executed") * b * t
    assert 1.0 <= xla / ana <= 1.05, (name, form, xla / ana)
    model = cls.flops_per_token(cfg, t, attention="causal")
    if name == "sliding_window":
        # model count: mean visible keys ~ W (63.9 of 64 at T=512); blocked form executes 2W keys
        # per query; the XLA form 4 blocks of 128 queries: the first sees keys 0..127, the others
        # the 191 keys from 63 before the block to its end; both above the model count
        proj = 2 * 512 * 3 * 512 + 2 * 512 * 512
        t_eff = (model - proj) / (4 * 512)
        assert abs(t_eff - (64 * 65 / 2 + (512 - 64) * 64) / 512) < 1e-9
        executed = cls.flops_per_token(cfg, t, attention="executed")
        assert executed == proj + 4 * 512 * (128 if form == "chunked" else 128 * (128 + 3 * 191) / 512)
        assert cls.flops_per_token(cfg, t, attention="full") == proj + 4 * 512 * (128 if form == "chunked" else 512)
    else:
        for conv in ("full", "executed"):  # no attention convention
            assert model == cls.flops_per_token(cfg, t, attention=conv)
    with pytest.raises(ValueError, match="convention"):
        cls.flops_per_token(cfg, t, attention="sparse")


def test_sliding_window_flops_reduce_to_attention_when_window_covers_sequence():
    cfg = mixer_cfg("sliding_window", window_size=64, seq_len=48, mixer_form="chunked")
    cls = registry.get_mixer("sliding_window")
    for conv in ("causal", "full", "executed"):
        assert cls.flops_per_token(cfg, 48, attention=conv) == Attention.flops_per_token(cfg, 48, attention=conv)


def load_config(name, size="tiny"):
    path = REPO_ROOT / "experiments" / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(size)


@pytest.mark.parametrize("config", ["hybrid"])
def test_lm_trains(config):
    """LMs built by ``train.build`` train on one fixed 2 x 16 batch: finite, falling loss.
    ``mamba2``: the tiny Mamba-2 config with the group (mamba2, based, sliding_window), so each
    of this file's mixers is in one LM (one compile); ``hybrid``: the tiny hybrid config as is
    (Gated DeltaNet x 2 + attention)."""
    c = load_config(config)
    if config == "mamba2":
        c.model.layer_pattern, c.model.n_layers = ("mamba2", "based", "sliding_window"), 3
        c.model.window_size, c.model.feature_dim = 8, 8
    c.model.seq_len, c.train.batch_size, c.train.lr, c.train.warmup_steps = 16, 2, 1e-2, 0
    cfg = finalize(c, 1)
    mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
    w = np.random.default_rng(0).integers(0, 256, (2, 17)).astype(np.int32)
    with jax.set_mesh(mesh):
        run = train.build(cfg, mesh)
        state = numpy_init_state(run)
        batch = parallel.global_batch({"inputs": w[:, :-1], "targets": w[:, 1:]}, mesh, 2)
        losses = []
        for _ in range(6):
            state, m = run.train_step(state, batch)
            losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses)), losses
    assert abs(losses[0] - math.log(cfg.model.vocab_size)) < 0.5, losses  # near-uniform at init
    assert losses[-1] < losses[0] - 1.0, losses
