"""Precision: 16-bit compute with float32 accumulation (layers.matmul's custom VJP, the 16-bit
attention core) against float64 references, and the compiled bf16 train step really running
every matmul with 16-bit inputs (forward and backward)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_arch import parallel, train
from efficient_arch.config import finalize
from efficient_arch.models.layers import _grad_specs, dot_product_attention, matmul


@pytest.mark.parametrize("spec,xs,ws", [
    ("btd,dhk->bthk", (2, 5, 8), (8, 3, 4)),
    ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 8)),
    ("...d,dh->...h", (2, 5, 8), (8, 6)),
    ("becd,edkf->beckf", (2, 3, 4, 8), (3, 8, 2, 5)),
])
def test_matmul_bf16_gradients_match_float64(spec, xs, ws):
    """bf16 forward and both gradients within bf16 rounding of the float64 einsum; the weight
    gradient comes back float32 (the parameter's dtype), the input gradient in x's dtype."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    gout = rng.standard_normal(np.einsum(spec, x, w).shape)

    def f(x, w, dtype):
        return jnp.sum(matmul(spec, x, w, dtype).astype(jnp.float32) * gout)

    with jax.enable_x64(True):
        want = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * gout), argnums=(0, 1))(x, w)
        y64 = np.einsum(spec, x, w)
    xf, wf = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    y = matmul(spec, xf, wf, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float64), y64, rtol=0, atol=0.05 * np.abs(y64).max())
    dx, dw = jax.grad(f, argnums=(0, 1))(xf, wf, jnp.bfloat16)
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    for got, ref in ((dx, want[0]), (dw, want[1])):
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(ref), rtol=0,
                                   atol=0.03 * np.abs(np.asarray(ref)).max())
    # the same function in float32 is the plain einsum (no custom VJP), exact to float32 rounding
    dx32, dw32 = jax.grad(f, argnums=(0, 1))(xf, wf, jnp.float32)
    np.testing.assert_allclose(dw32, want[1], rtol=1e-4, atol=1e-4)
    # bf16 x input keeps its dtype for the input gradient
    dxb = jax.grad(f)(xf.astype(jnp.bfloat16), wf, jnp.bfloat16)
    assert dxb.dtype == jnp.bfloat16


def test_grad_specs():
    assert _grad_specs("btd,dhk->bthk") == ("bthk,dhk->btd", "btd,bthk->dhk")
    assert _grad_specs("...d,dh->...h") == ("...h,dh->...d", "...d,...h->dh")
    assert _grad_specs("btd,dh->h") is None  # b, t summed out of one operand only


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["causal", "window", "segments", "cross"])
def test_attention_core_matches_xla_form(case, dtype):
    """The attention core (ops/attention.py: hand-written backward keeping only the
    probabilities; GQA: 4 query heads on 2 KV heads) against ``jax.nn.dot_product_attention``
    autodiffed in float64: forward and gradients of q, k, v (float32 to 1e-5, bf16 to its
    rounding)."""
    rng = np.random.default_rng(1)
    b, t, n, kv, hd = 2, 12, 4, 2, 8
    s = 7 if case == "cross" else t
    q = rng.standard_normal((b, t, n, hd))
    k, v = rng.standard_normal((b, s, kv, hd)), rng.standard_normal((b, s, kv, hd))
    g = rng.standard_normal((b, t, n, hd))
    kw = dict(is_causal=case != "cross")
    if case == "window":
        kw["local_window_size"] = (3, 0)
    if case == "segments":
        seg = np.repeat(np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [0] * 6 + [1] * 6]), 1, axis=0)
        kw["mask"] = jnp.asarray(seg[:, None, :, None] == seg[:, None, None, :])
    if case == "cross":
        kw["mask"] = jnp.asarray(np.arange(s)[None, None, None, :] < np.array([5, 7])[:, None, None, None])

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * g)

    with jax.enable_x64(True):
        ref_fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)  # noqa: E731
        want = ref_fn(q, k, v)
        want_g = jax.grad(lambda *a: loss(ref_fn, *a), argnums=(0, 1, 2))(q, k, v)
    f32 = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    dt = jnp.dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 0.03
    ours = lambda q, k, v: dot_product_attention(q, k, v, dtype=dt, **kw)  # noqa: E731
    got = ours(*f32)
    assert got.dtype == dt and got.shape == (b, t, n, hd)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol * 1.3)
    got_g = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(*f32)
    for a, r in zip(got_g, want_g):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a, np.float64), r, atol=tol * np.abs(r).max())


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in optimized HLO (operands looked up as fusion
    parameters or instructions of the same computation)."""
    out = []
    for block in re.split(r"\n(?=%|ENTRY)", hlo):
        head = block.split("\n", 1)[0]
        for line in block.splitlines():
            m = re.search(r"\} dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
            if not m:
                continue
            types = []
            for name in m.groups():
                t = (re.search(rf"\b{re.escape(name)}: (\w+)\[", head)
                     or re.search(rf"%{re.escape(name)} = (\w+)\[", block))
                types.append(t.group(1) if t else "?")
            out.append(tuple(types))
    return out


def test_bf16_train_step_runs_every_dot_in_bf16(tiny_config):
    """Compiled tiny bf16 train step: every dot (forward, backward, attention, LM head) takes
    bf16 operands. Plain autodiff of an f32-accumulating einsum gave the backward dots a float32
    cotangent and XLA:CPU ran them as float32 x float32 (19 of 22 dots at the bench config)."""
    cfg = finalize(tiny_config(model__dtype="bfloat16", flops__peak_flops=1e12), 1)
    mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        run = train.build(cfg, mesh)
        x = np.zeros((cfg.train.batch_size, cfg.model.seq_len + 1), np.int32)
        batch = parallel.global_batch({"inputs": x[:, :-1], "targets": x[:, 1:]}, mesh, cfg.train.batch_size)
        hlo = run.train_step.lower(jax.eval_shape(run.init_state), batch).compile().as_text()
    types = _dot_operand_types(hlo)
    assert len(types) >= 20, types  # 2 layers x (4 projections + 2 attention products) x 3 + head x 3
    assert all(t == ("bf16", "bf16") for t in types), types


def test_swiglu_float64_and_residuals():
    """The custom VJP in float64 equals autodiff of ``silu(g) * u`` to rounding, and its backward
    keeps ``gu`` alone (autodiff kept five float32 ``[..., d_ff]`` arrays)."""
    from efficient_arch.models.layers import swiglu

    rng = np.random.default_rng(3)
    gu, dh = 4 * rng.standard_normal((2, 6, 2, 9)), rng.standard_normal((2, 6, 9))
    with jax.enable_x64(True):
        ref = lambda gu: jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]  # noqa: E731
        x = jnp.asarray(gu)
        want, want_g = ref(x), jax.grad(lambda gu: jnp.sum(ref(gu) * dh))(x)
        got, got_g = swiglu(x), jax.grad(lambda gu: jnp.sum(swiglu(gu) * dh))(x)
        assert got.dtype == got_g.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(got_g, want_g, rtol=1e-12, atol=1e-12)
    _, vjp = jax.vjp(swiglu, jnp.asarray(gu, jnp.bfloat16))  # the residuals are the vjp's leaves
    res = [(r.shape, r.dtype) for r in jax.tree_util.tree_leaves(vjp)]
    assert res == [(gu.shape, jnp.bfloat16)], res


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_matches_float64_autodiff(dtype):
    """layers.swiglu (float32 math on a [..., 2, d_ff] gate/up array) and its gradient ==
    ``silu(g) * u`` in float64."""
    from efficient_arch.models.layers import swiglu

    rng = np.random.default_rng(2)
    gu, dh = 3 * rng.standard_normal((3, 5, 2, 7)), rng.standard_normal((3, 5, 7))
    with jax.enable_x64(True):
        ref = lambda gu: jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]  # noqa: E731
        want, want_g = ref(gu), jax.grad(lambda gu: jnp.sum(ref(gu) * dh))(gu)
    x = jnp.asarray(gu, dtype)
    got = swiglu(x)
    got_g = jax.grad(lambda x: jnp.sum(swiglu(x).astype(jnp.float32) * dh))(x)
    assert got.dtype == got_g.dtype == jnp.dtype(dtype) and got_g.shape == gu.shape
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(got_g, np.float64), want_g, rtol=tol, atol=tol * np.abs(want_g).max())


# ----------------------------------------------------------------------------- FP8 (model.quant)

from efficient_arch import hardware  # noqa: E402
from efficient_arch.config import ConfigError  # noqa: E402
from efficient_arch.models import layers  # noqa: E402

E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448


def _fake_quant(a, axes, qtype=jnp.float8_e4m3fn):
    """Reference FP8 round trip: scale by the absmax over ``axes`` (the contracted axes; one
    scale per remaining channel), round to ``qtype``, scale back (float32)."""
    a = jnp.asarray(a, jnp.float32)
    scale = jnp.max(jnp.abs(a), axis=axes, keepdims=True) / float(jnp.finfo(qtype).max)
    return (a / scale).astype(qtype).astype(jnp.float32) * scale


def test_fp8_einsum_is_the_e4m3_round_trip():
    """Forward: fp8_einsum == the float32 einsum of activations and weights rounded to the E4M3
    grid with one absmax scale per token / per output channel; it differs from the exact product
    by FP8 rounding (so quantization is really applied) and stays within FP8 tolerance of it."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32)
    w = jnp.asarray(0.02 * rng.standard_normal((32, 3, 16)), jnp.float32)
    y = layers.fp8_einsum("btd,dhk->bthk", x, w)
    want = jnp.einsum("btd,dhk->bthk", _fake_quant(x, (2,)), _fake_quant(w, (0,)))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    exact = jnp.einsum("btd,dhk->bthk", x, w)
    err = float(jnp.max(jnp.abs(y - exact)) / jnp.max(jnp.abs(exact)))
    assert 1e-3 < err < 0.08, err  # E4M3: 3 mantissa bits, relative step 2^-3 at worst per operand
    # the quantized weights sit on the E4M3 grid: rescaled, they are exact float8 values
    wq = _fake_quant(w, (0,))
    scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / E4M3_MAX
    grid = wq / scale
    np.testing.assert_allclose(grid, grid.astype(jnp.float8_e4m3fn).astype(jnp.float32), rtol=1e-6)
    assert len(np.unique(np.abs(np.asarray(grid.astype(jnp.float8_e4m3fn).astype(jnp.float32))))) <= 127
    assert float(jnp.max(jnp.abs(grid))) == pytest.approx(E4M3_MAX, rel=1e-6)  # absmax maps to 448


def test_fp8_matmul_gradients_are_e5m2_and_close():
    """Backward: both gradient dots take an E5M2 gradient and an E4M3 operand; the gradients come
    back in the inputs' dtypes and lie within FP8 tolerance of the float64 gradients."""
    rng = np.random.default_rng(1)
    spec = "btd,dhk->bthk"
    x, w = rng.standard_normal((2, 8, 32)), 0.02 * rng.standard_normal((32, 3, 16))
    gout = rng.standard_normal((2, 8, 3, 16))
    with jax.enable_x64(True):
        want = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * gout), argnums=(0, 1))(x, w)

    def loss(x, w):
        return jnp.sum(layers.matmul(spec, x, w, jnp.bfloat16, quant="fp8").astype(jnp.float32) * gout)

    xb, wf = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.float32)
    dx, dw = jax.grad(loss, argnums=(0, 1))(xb, wf)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    for got, ref in ((dx, want[0]), (dw, want[1])):
        ref = np.asarray(ref)
        err = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()
        assert 1e-3 < err < 0.1, err
    dots = _dot_dtypes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(xb, wf).jaxpr)
    assert dots == {("float8_e4m3fn", "float8_e4m3fn"): 1, ("float8_e5m2", "float8_e4m3fn"): 2}, dots


def _dot_dtypes(jaxpr) -> dict:
    """{(lhs dtype, rhs dtype): count} of every dot_general in a jaxpr, sub-jaxprs included (a
    scan body counted once)."""
    out: dict = {}

    def walk(j):
        for e in j.eqns:
            if e.primitive.name == "dot_general":
                key = tuple(str(v.aval.dtype) for v in e.invars)
                out[key] = out.get(key, 0) + 1
            for p in e.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    walk(jaxpr)
    return out


def test_fp8_lm_forward_close_to_bf16_and_only_projections_quantized(tiny_config):
    """Tiny LM (attention + SwiGLU, 2 layers in a scan): FP8 logits within FP8 tolerance of the bf16
    logits but not equal; in the loss gradient's jaxpr the 5 projections of the scanned block run
    E4M3 forward and E5M2 x E4M3 backward, while the attention products and the LM head stay bf16."""
    from flax import nnx

    from efficient_arch.models.lm import new_model

    tok = (jnp.arange(64).reshape(4, 16) * 7) % 264
    logits, grads = {}, {}
    for quant in ("none", "fp8"):
        cfg = finalize(tiny_config(model__dtype="bfloat16", model__quant=quant))
        graphdef, state = nnx.split(new_model(cfg.model, 0))

        def loss(state, tok):
            lg, _ = nnx.merge(graphdef, state)(tok)
            return jnp.mean(jax.nn.logsumexp(lg, axis=-1) - lg[..., 0]), lg

        (_, logits[quant]), grads[quant] = jax.jit(jax.value_and_grad(loss, has_aux=True))(state, tok)
        if quant == "fp8":
            dots = _dot_dtypes(jax.make_jaxpr(jax.grad(lambda s, t: loss(s, t)[0]))(state, tok).jaxpr)
    diff = float(jnp.max(jnp.abs(logits["fp8"] - logits["none"])))
    assert 1e-4 < diff < 0.05 * float(jnp.max(jnp.abs(logits["none"]))) + 0.02, diff
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["fp8"])):
        assert float(jnp.max(jnp.abs(a - b))) <= 0.15 * float(jnp.max(jnp.abs(a))) + 1e-6
    # per scanned block: q, kv, o, gate_up, down (x1 forward, x2 backward); attention scores and
    # probabilities x values (x3) and the tied head (x3) in bf16
    assert dots == {("float8_e4m3fn", "float8_e4m3fn"): 5, ("float8_e5m2", "float8_e4m3fn"): 10,
                    ("bfloat16", "bfloat16"): 9}, dots


def test_fp8_tiny_training_loss_falls(tiny_config):
    """30 FP8 train steps (bf16 compute) on one fixed batch: the loss falls from ~ln(V) as the bf16
    run's does, and stays finite."""
    cfg = finalize(tiny_config(model__dtype="bfloat16", model__quant="fp8", model__seq_len=32, train__lr=1e-2,
                               train__steps=30, train__warmup_steps=5, flops__peak_flops=1e12), 1)
    mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 33)).astype(np.int32)
    with jax.set_mesh(mesh):
        run = train.build(cfg, mesh)
        batch = parallel.global_batch({"inputs": x[:, :-1], "targets": x[:, 1:]}, mesh, 4)
        state = run.init_state()
        losses = []
        for _ in range(30):
            state, m = run.train_step(state, batch)
            losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)), losses
    assert losses[0] > 5.0 and losses[-1] < 0.5 * losses[0], losses[::5]


@pytest.mark.parametrize("field,value,needle", [
    ("model__quant", "int4", "config.model.quant='int4': choose one of ('none', 'fp8')"),
    ("model__attention_impl", "flash", "config.model.attention_impl='flash': choose one of"),
])
def test_precision_config_errors(tiny_config, field, value, needle):
    with pytest.raises(ConfigError) as e:
        finalize(tiny_config(**{field: value}))
    assert needle in str(e.value)


def test_fp8_needs_float32_master_weights(tiny_config):
    with pytest.raises(ConfigError, match=r"config.model.param_dtype='bfloat16': model.quant='fp8' keeps "
                                          r"float32 master weights.*param_dtype=float32"):
        finalize(tiny_config(model__quant="fp8", model__param_dtype="bfloat16"))


def test_fp8_mfu_peak_is_the_fp8_peak_or_says_simulated(tmp_path):
    """quant=fp8: an H200 takes its dense FP8 peak (2x bf16); an A100 (no FP8) is an error naming
    the override; a CPU takes its measured compute-dtype peak and says FP8 is simulated."""
    class Dev:
        platform, device_kind = "gpu", "NVIDIA H200"

    assert hardware.peak_flops_for_policy("bfloat16", "fp8", device=Dev())[0] == 1979e12
    assert hardware.peak_flops_for_policy("bfloat16", "none", device=Dev())[0] == 989e12
    Dev.device_kind = "NVIDIA A100-SXM4-80GB"
    with pytest.raises(hardware.UnknownAcceleratorError, match="peak_flops"):
        hardware.peak_flops_for_policy("bfloat16", "fp8", device=Dev())
    assert hardware.peak_flops_for_policy("bfloat16", "fp8", override=5e12, device=Dev()) == (5e12, "user-given")
    cache = tmp_path / "cpu_peak.json"
    (tmp_path).mkdir(exist_ok=True)
    peak, label = hardware.peak_flops_for_policy("bfloat16", "fp8", device=jax.devices("cpu")[0], cache_dir=tmp_path)
    assert peak > 0 and label.startswith("FP8 simulated on CPU") and "bfloat16" in label
    del cache
    desc = layers.describe_precision({"dtype": "bfloat16", "param_dtype": "float32", "quant": "fp8"}, "cpu")
    assert desc.startswith("params float32, compute bfloat16, projection/MLP matmuls FP8") and "simulated" in desc


# ----------------------------------------------------------------------------- attention kernel choice


def test_attention_implementation_choice():
    """xla on CPU; cuDNN on a GPU for bf16/fp16 inputs that qualify; xla (with the reason) when
    they do not; 'xla' forces XLA; 'cudnn' where it cannot run is an error naming the field."""
    kw = dict(dtype=jnp.bfloat16, head_dim=64, seq_q=128, seq_k=128)
    assert layers.attention_implementation(platform="cpu", **kw)[0] == "xla"
    assert layers.attention_implementation(platform="gpu", **kw) == ("cudnn", "")
    assert layers.attention_implementation(platform="gpu", **kw, has_mask=True, local_window_size=(63, 0))[0] == "cudnn"
    assert layers.attention_implementation(platform="gpu", **kw, requested="xla")[0] == "xla"
    for change, needle in [({"dtype": jnp.float32}, "float32"), ({"head_dim": 12}, "head_dim 12"),
                           ({"head_dim": 512}, "head_dim 512"), ({"seq_q": 7, "seq_k": 7, "has_mask": True}, "odd"),
                           ({"seq_k": 64}, "causal with 128 queries and 64 keys")]:
        impl, why = layers.attention_implementation(platform="gpu", **{**kw, **change})
        assert impl == "xla" and needle in why, (change, why)
    with pytest.raises(ValueError, match="attention_impl='cudnn'.*platform 'cpu'.*attention_impl=auto"):
        layers.attention_implementation(platform="cpu", **kw, requested="cudnn")


def test_attention_cudnn_failure_at_trace_time_falls_back_to_xla(monkeypatch, caplog):
    """Pretending to be on a GPU on this CPU: jax's cuDNN path raises while tracing ("cuDNN is not
    detected"), the XLA form runs instead (same values as asking for xla) with one warning; with
    attention_impl='cudnn' the failure is an error, never a silent substitute."""
    monkeypatch.setattr(layers, "_backend", lambda: "gpu")
    monkeypatch.setattr(layers, "_CUDNN_FALLBACKS", set())
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, 8, 4, 16)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, 8, 2, 16)), jnp.bfloat16)
    with caplog.at_level("WARNING"):
        got = layers.dot_product_attention(q, k, k, dtype=jnp.bfloat16)
    assert any("using the XLA form" in r.message for r in caplog.records)
    np.testing.assert_array_equal(got, layers.dot_product_attention(q, k, k, dtype=jnp.bfloat16, implementation="xla"))
    with pytest.raises(ValueError, match="attention_impl='cudnn'"):
        layers.dot_product_attention(q, k, k, dtype=jnp.bfloat16, implementation="cudnn")
    with layers.precision(attention="cudnn"), pytest.raises(ValueError, match="attention_impl='cudnn'"):
        layers.dot_product_attention(q, k, k, dtype=jnp.bfloat16)


def test_attention_core_fully_masked_row_passes_no_gradient_to_q_k():
    """A query row with nothing allowed averages v uniformly (like jax's XLA form) and, its scores
    being constants, gets zero dq and gives zero dk (autodiff of jax's form agrees)."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((1, 4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)))
    mask = jnp.asarray(np.array([True, False, True, True])[None, None, :, None] & np.ones((1, 1, 4, 4), bool))
    g = jnp.asarray(rng.standard_normal((1, 4, 2, 8)), jnp.float32)
    ours = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, mask=mask, is_causal=False,
                                                                  dtype=jnp.float32) * g), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
                                           * g), argnums=(0, 1, 2))(q, k, v)
    assert np.all(np.asarray(ours[0])[:, 1] == 0)  # row 1 is fully masked
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dot_product_attention_rejects_bad_shapes_by_name():
    """Malformed inputs raise a ValueError that names the problem (not an index error from deep
    inside): ranks, mismatched k / v / head_dim, n_heads % n_kv_heads, causal with T != S, a 2-D or
    mis-sized mask, a bare-int or negative window; well-formed masks of each broadcast shape run."""
    z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    q, k = z(2, 6, 4, 8), z(2, 6, 2, 8)
    bad = [
        (dict(q=z(6, 4, 8)), "must be \\[B, T\\|S, heads, head_dim\\]"),
        (dict(k=z(2, 6, 2, 4)), "must match q"),
        (dict(v=z(2, 5, 2, 8)), "must match q"),
        (dict(k=z(2, 6, 3, 8), v=z(2, 6, 3, 8)), "not a multiple of n_kv_heads"),
        (dict(k=z(2, 5, 2, 8), v=z(2, 5, 2, 8)), "is_causal needs T == S"),
        (dict(mask=jnp.ones((6, 6), bool)), "mask\\[None, None\\]"),
        (dict(mask=jnp.ones((2, 3, 6, 6), bool)), "mask must be bool"),
        (dict(local_window_size=3), "two ints >= 0"),
        (dict(local_window_size=(3, -1)), "two ints >= 0"),
        (dict(mask=jnp.full((1, 1, 6, 6), 2, jnp.int32)), "must be bool"),  # 1 & 2 == 0 would mask all
        (dict(mask=jnp.zeros((1, 1, 6, 6), jnp.float32)), "must be bool"),
        (dict(k=z(2, 6, 0, 8), v=z(2, 6, 0, 8)), "must be >= 1"),
    ]
    for kw, msg in bad:
        args = dict(q=q, k=k, v=k) | kw
        with pytest.raises(ValueError, match=msg):
            dot_product_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    for shape in [(1, 1, 1, 6), (2, 1, 6, 6), (2, 4, 6, 6), (1, 4, 1, 6)]:
        out = dot_product_attention(q, k, k, mask=jnp.ones(shape, bool), local_window_size=(2, 0))
        assert out.shape == q.shape
