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


@pytest.mark.parametrize("case", ["causal", "window", "segments", "cross"])
def test_bf16_attention_core_matches_xla_form(case):
    """The 16-bit attention core (GQA: 4 query heads on 2 KV heads) against
    ``jax.nn.dot_product_attention`` in float64, forward and gradients."""
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
    ours = lambda q, k, v: dot_product_attention(q, k, v, dtype=jnp.bfloat16, **kw)  # noqa: E731
    got = ours(*f32)
    assert got.dtype == jnp.bfloat16 and got.shape == (b, t, n, hd)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=0.04)
    got_g = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(*f32)
    for a, r in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(a, np.float64), r, atol=0.03 * np.abs(r).max())
    # float32 goes through jax.nn's XLA form: identical to it
    np.testing.assert_allclose(dot_product_attention(*f32, dtype=jnp.float32, **kw),
                               jax.nn.dot_product_attention(*f32, implementation="xla", **kw), rtol=1e-6, atol=1e-6)


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
