"""Mixture-of-Experts FFN: routing, capacity, both dispatch modes, losses, bias balancing, FLOPs,
parameter counts, layer interleaving, decoding, and mesh independence on 8 fake devices."""

from __future__ import annotations

import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_arch import flops, parallel, train
from efficient_arch.config import ConfigError, finalize
from efficient_arch.models import moe
from efficient_arch.models.layers import MLP
from efficient_arch.models.lm import count_params, layer_kinds, new_model

from conftest import REPO_ROOT, make_tiny_config, numpy_init_state, run_fake_devices_child


def _moe_cfg(**kw):
    base = dict(model__ffn="moe", model__moe__n_experts=4, model__moe__top_k=2, model__moe__d_ff_expert=32)
    return make_tiny_config(**{**base, **kw})


def _build(mcfg, cls=moe.MoE, seed=0):
    with nnx.use_eager_sharding(False):
        return cls(mcfg, rngs=nnx.Rngs(seed))


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ---------------------------------------------------------------------------------------------
# routing and capacity
# ---------------------------------------------------------------------------------------------


def test_capacity_formula_and_clamp():
    assert moe.capacity(64, 8, 2, 1.25) == math.ceil(1.25 * 64 * 2 / 8) == 20
    assert moe.capacity(64, 8, 2, 1.0) == 16
    # capacity larger than the token count is clamped to T (a token picks an expert once)
    assert moe.capacity(16, 2, 2, 4.0) == 16
    assert moe.capacity(16, 1, 1, 1.25) == 16
    assert moe.capacity(1, 64, 2, 1.0) == 1  # never below one slot


def _slot_positions_reference(idx, E):
    """Loop form of GShard priority: first choices in token order, then second choices ..."""
    B, T, k = idx.shape
    pos = np.zeros_like(idx)
    for b in range(B):
        fill = np.zeros(E, int)
        for j in range(k):
            for t in range(T):
                e = idx[b, t, j]
                pos[b, t, j] = fill[e]
                fill[e] += 1
    return pos


def test_slot_positions_match_loop_reference():
    rng = np.random.default_rng(0)
    E, k = 5, 2
    scores = rng.standard_normal((3, 17, E))
    idx = np.argsort(-scores, axis=-1)[..., :k].astype(np.int32)
    got = np.asarray(moe.slot_positions(jnp.asarray(idx), E))
    np.testing.assert_array_equal(got, _slot_positions_reference(idx, E))


def test_ties_go_to_lower_expert_and_capacity_keeps_earliest_tokens():
    """All router logits equal: every token picks experts 0..k-1 (lower index wins a tie); with
    capacity C the first C tokens of the sequence keep expert 0, the rest are dropped."""
    T, E, k = 8, 4, 2
    logits = jnp.zeros((1, T, E))
    idx, w, _ = moe.route(logits, jnp.zeros(E), router="softmax", top_k=k, norm_top_k=False, route_scale=1.0)
    np.testing.assert_array_equal(np.asarray(idx)[0], np.tile([0, 1], (T, 1)))
    np.testing.assert_allclose(np.asarray(w), 1.0 / E)
    pos = np.asarray(moe.slot_positions(idx, E))[0]
    np.testing.assert_array_equal(pos[:, 0], np.arange(T))
    C = moe.capacity(T, E, k, 1.0)  # ceil(8 * 2 / 4) = 4
    assert C == 4
    np.testing.assert_array_equal(pos[:, 0] < C, np.arange(T) < 4)


def test_sigmoid_router_normalizes_and_bias_only_selects():
    logits = jnp.asarray([[0.0, 1.0, 2.0, -1.0]])
    bias = jnp.asarray([0.0, 0.0, -10.0, 0.0])  # pushes expert 2 out of the selection
    idx, w, probs = moe.route(logits, bias, router="sigmoid", top_k=2, norm_top_k=True, route_scale=2.5)
    assert sorted(np.asarray(idx)[0].tolist()) == [0, 1]
    s = 1 / (1 + np.exp(-np.asarray([0.0, 1.0])))
    np.testing.assert_allclose(np.sort(np.asarray(w)[0]), np.sort(2.5 * s / s.sum()), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)


def test_aux_losses_match_hand_computation():
    """Switch loss E * sum_i f_i P_i and z-loss mean(logsumexp^2) on a 3-token, 3-expert case."""
    logits = np.asarray([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.5]])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    idx = np.asarray([[0], [1], [1]])  # top-1 choices
    f = np.asarray([1, 2, 0]) / 3.0
    P = p.mean(0)
    want_lb = 3 * np.sum(f * P)
    want_z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    got_idx, _, probs = moe.route(jnp.asarray(logits), jnp.zeros(3), router="softmax", top_k=1,
                                  norm_top_k=False, route_scale=1.0)
    np.testing.assert_array_equal(np.asarray(got_idx), idx)
    np.testing.assert_allclose(float(moe.load_balancing_loss(got_idx, probs, 3)), want_lb, rtol=1e-6)
    np.testing.assert_allclose(float(moe.z_loss(jnp.asarray(logits))), want_z, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_one_expert_equals_dense_mlp(dispatch):
    """n_experts=1, top_k=1, no shared expert: the MoE is the dense SwiGLU MLP with its weights."""
    mcfg = finalize(_moe_cfg(model__moe__n_experts=1, model__moe__top_k=1, model__moe__d_ff_expert=48,
                             model__d_ff=48, model__moe__dispatch=dispatch)).model
    layer = _build(mcfg)
    mlp = _build(mcfg, MLP, seed=3)
    mlp.w_gate_up[...] = layer.w_gate_up[...][0]
    mlp.w_down[...] = layer.w_down[...][0]
    x = _x((2, 16, mcfg.d_model))
    y, aux = layer(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(mlp(x)[0]), rtol=1e-5, atol=1e-6)
    assert float(aux["moe_dropped"]) == 0.0
    np.testing.assert_allclose(float(aux["moe_lb_loss"]), 1.0, rtol=1e-6)


def test_dropless_equals_capacity_when_capacity_is_ample():
    mcfg = finalize(_moe_cfg(model__moe__n_experts=4, model__moe__top_k=2, model__moe__n_shared_experts=1,
                             model__moe__capacity_factor=2.0)).model  # C = ceil(2*16*2/4) = 16 = T
    x = _x((3, 16, mcfg.d_model), seed=1)
    cap = _build(mcfg)
    graphdef, state = nnx.split(cap)
    y_cap, aux_cap = cap(x)
    mcfg_d = finalize(_moe_cfg(model__moe__n_experts=4, model__moe__top_k=2, model__moe__n_shared_experts=1,
                               model__moe__dispatch="dropless")).model
    drop = _build(mcfg_d)
    nnx.update(drop, state)
    y_drop, aux_drop = drop(x)
    assert float(aux_cap["moe_dropped"]) == 0.0
    np.testing.assert_allclose(np.asarray(y_drop), np.asarray(y_cap), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux_drop["aux_loss"]), float(aux_cap["aux_loss"]), rtol=1e-6)


def test_dropped_tokens_get_no_expert_output():
    """Low capacity: dropped assignments contribute nothing; the kept ones equal the dropless
    output restricted to them (checked on a top-1 router so each token has one assignment)."""
    kw = dict(model__moe__n_experts=2, model__moe__top_k=1, model__moe__capacity_factor=0.5)
    mcfg = finalize(_moe_cfg(**kw)).model
    layer = _build(mcfg)
    x = _x((2, 16, mcfg.d_model), seed=2)
    y, aux = layer(x)
    drop = _build(finalize(_moe_cfg(**kw, model__moe__dispatch="dropless")).model)
    nnx.update(drop, nnx.state(layer))
    y_full, _ = drop(x)
    logits = jnp.einsum("btd,de->bte", x, layer.router[...])
    idx, _, _ = moe.route(logits, jnp.zeros(2), router="softmax", top_k=1, norm_top_k=False, route_scale=1.0)
    kept = np.asarray(moe.slot_positions(idx, 2))[..., 0] < moe.capacity(16, 2, 1, 0.5)
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(np.asarray(y)[~kept], 0.0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(y_full)[kept], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux["moe_dropped"]), (~kept).sum())


def test_bias_update_moves_load_toward_balance():
    """A router skewed towards expert 0: repeated aux-loss-free bias steps (no gradient) lower the
    max/mean load and the coefficient of variation."""
    mcfg = finalize(_moe_cfg(model__moe__n_experts=4, model__moe__top_k=1)).model
    layer = _build(mcfg)
    layer.router[...] = layer.router[...].at[:, 0].add(0.02)  # skew: logit 0 up by ~1.3
    x = _x((4, 16, mcfg.d_model), seed=4) + 1.0
    f = jax.jit(lambda st: nnx.merge(*nnx.split(layer)[:1], st)(x)[1]["expert_counts"])
    state = nnx.state(layer)
    history = []
    for _ in range(60):
        counts = f(state)
        history.append(moe.load_metrics(counts[None]))
        params = {"groups": {"blocks": {0: {"ffn": {"expert_bias": state["expert_bias"][...][None]}}}}}
        from efficient_arch.models.lm import update_expert_bias

        new = update_expert_bias(params, {"groups/expert_counts/0": counts[None]}, 1e-2)
        state["expert_bias"][...] = new["groups"]["blocks"][0]["ffn"]["expert_bias"][0]
    first, last = history[0], history[-1]
    assert float(first["moe_load_max"]) > 2.5
    assert float(last["moe_load_max"]) < float(first["moe_load_max"]) - 0.3
    assert float(last["moe_load_cv"]) < 0.5 * float(first["moe_load_cv"])


# ---------------------------------------------------------------------------------------------
# in the LM and the train step
# ---------------------------------------------------------------------------------------------


def test_layer_kinds_interleave_and_dense_prefix():
    cfg = finalize(_moe_cfg(model__n_layers=6, model__moe__moe_every=2, model__moe__first_k_dense=2)).model
    assert [f for _, f in layer_kinds(cfg)] == ["mlp", "mlp", "mlp", "moe", "mlp", "moe"]
    cfg = finalize(_moe_cfg(model__n_layers=4, model__layer_pattern=("gated_deltanet", "attention"),
                            model__moe__moe_every=1)).model
    assert layer_kinds(cfg) == [("gated_deltanet", "moe"), ("attention", "moe")] * 2


@pytest.mark.parametrize("override, field", [
    (dict(model__moe__top_k=5), "model.moe.top_k"),
    (dict(model__moe__router="relu"), "model.moe.router"),
    (dict(model__moe__dispatch="sparse"), "model.moe.dispatch"),
    (dict(model__n_layers=3, model__moe__moe_every=2), "model.n_layers"),
    (dict(model__moe__first_k_dense=1, model__moe__moe_every=2, model__n_layers=4), "model.moe.first_k_dense"),
    (dict(model__moe__first_k_dense=2), "model.moe.first_k_dense"),
    (dict(model__moe__capacity_factor=0.0), "model.moe.capacity_factor"),
])
def test_bad_moe_config_names_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        finalize(_moe_cfg(**override))


def test_expert_axis_must_divide_experts():
    c = _moe_cfg(model__moe__n_experts=4, train__batch_size=8)
    c.mesh.expert = 8
    c.mesh.data = 1
    with pytest.raises(ConfigError, match=r"model\.moe\.n_experts"):
        finalize(c, 8)


def test_active_params_and_flops_count_top_k_only():
    d, f, E, k, L = 64, 32, 8, 2, 2
    cfg = finalize(_moe_cfg(model__moe__n_experts=E, model__moe__top_k=k, model__moe__d_ff_expert=f,
                            model__moe__n_shared_experts=1))
    counts = count_params(cfg.model)
    assert counts["n_params"] - counts["n_active_params"] == L * (E - k) * 3 * d * f
    model = new_model(cfg.model, 0)
    total = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert counts["n_params"] == total - L * E  # expert_bias is not a trained parameter
    fwd = flops.forward_flops_per_token(cfg.model)
    assert fwd["ffn"] == L * (2 * d * E + (k + 1) * 6 * d * f)


def test_flops_change_with_n_experts_only_by_router():
    """top_k fixed: model FLOPs per token grow with n_experts by 2 d per expert per layer only."""
    fl = {E: flops.forward_flops_per_token(finalize(_moe_cfg(model__moe__n_experts=E)).model)["total"]
          for E in (2, 4, 16)}
    d, L = 64, 2
    assert fl[4] - fl[2] == L * 2 * d * 2
    assert fl[16] - fl[4] == L * 2 * d * 12


def test_executed_flops_by_dispatch_and_platform():
    """Hardware (executed) FFN FLOPs per token: capacity runs E*C/T expert passes; dropless runs
    top_k on GPU/TPU (native ragged dot) but E*top_k on CPU (JAX's dense ragged_dot lowering)."""
    d, f, E, k, T = 64, 32, 8, 2, 16
    per = 6.0 * d * f
    cap = finalize(_moe_cfg(model__moe__n_experts=E, model__moe__capacity_factor=1.25)).model
    drop = finalize(_moe_cfg(model__moe__n_experts=E, model__moe__dispatch="dropless")).model
    C = moe.capacity(T, E, k, 1.25)  # ceil(1.25 * 16 * 2 / 8) = 5
    assert moe.MoE.flops_per_token(cap, T, executed=True) == 2 * d * E + E * C / T * per
    assert moe.MoE.flops_per_token(drop, T, executed=True, platform="gpu") == 2 * d * E + k * per
    assert moe.MoE.flops_per_token(drop, T, executed=True, platform="tpu") == 2 * d * E + k * per
    assert moe.MoE.flops_per_token(drop, T, executed=True, platform="cpu") == 2 * d * E + E * k * per
    assert moe.MoE.flops_per_token(drop, T) == moe.MoE.flops_per_token(cap, T) == 2 * d * E + k * per


@pytest.mark.parametrize("dispatch, remat", [("capacity", "none"), ("dropless", "none"), ("capacity", "dots"),
                                            ("capacity", "full")])
def test_analytic_flops_match_xla(dispatch, remat):
    """Whole train step: XLA (optimizer update excluded: AdamW's ~10 FLOPs per *total* parameter
    are not model FLOPs and are large next to 2k tokens/step with 8 experts) over the analytic
    hardware FLOPs in [1, 1.05]. Dispatch scatter / gather are counted as 0 FLOPs analytically;
    XLA counts the scatter's element updates (a few per token x d_model), inside the margin.
    Under remat the routed experts (dots batched over experts) are recomputed with ``dots``, and
    everything but the shared experts' w_down with ``full``."""
    cfg = finalize(_moe_cfg(model__d_model=128, model__n_heads=4, model__d_ff=256, model__seq_len=64,
                            model__moe__n_experts=8, model__moe__d_ff_expert=128,
                            model__moe__n_shared_experts=1, model__moe__moe_every=2, model__n_layers=4,
                            model__moe__first_k_dense=2, model__moe__dispatch=dispatch,
                            model__vocab_size=512, model__remat=remat), 1)
    mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
    x = flops.xla_flops_per_step(cfg, mesh)
    ana = flops.analytic_flops(cfg)["hardware_flops_per_step"]
    ratio = (x["xla_flops_per_step"] - x["xla_optimizer_flops"]) / ana
    assert 1.0 <= ratio <= 1.05, ratio
    assert flops.analytic_flops(cfg)["model_flops_per_step"] <= ana


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (cfg.train.batch_size, cfg.model.seq_len + 1)).astype(np.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def test_train_step_logs_moe_metrics_and_aux_mean_over_microbatches():
    """Metrics carry aux / z loss, load stats and drop fraction; with grad_accum 2 the logged
    load-balancing loss is the mean of the two microbatches' losses (not their sum); the bias
    moves only by the aux-loss-free rule."""
    kw = dict(model__moe__bias_update_rate=1e-2, train__batch_size=4, train__warmup_steps=0)
    cfg1 = finalize(_moe_cfg(**kw), 1)
    cfg2 = finalize(_moe_cfg(**kw, train__grad_accum=2), 1)
    mesh = parallel.make_mesh(cfg1, devices=jax.devices()[:1])
    b = _batch(cfg1)
    with jax.set_mesh(mesh):
        run1, run2 = train.build(cfg1, mesh), train.build(cfg2, mesh)
        state = numpy_init_state(run1)
        params = state["params"]
        halves = [{k: v[j::2] for k, v in b.items()} for j in range(2)]  # the accum split: rows j, j+2
        lb = [float(run1.loss_and_grad(params, parallel.global_batch(h, mesh, 2))[0][1]["moe_lb_loss"])
              for h in halves]
        new, m = run2.train_step(jax.tree.map(jnp.copy, state), parallel.global_batch(b, mesh, 4))
    for key in ("aux_loss", "moe_lb_loss", "moe_z_loss", "moe_load_max", "moe_load_cv", "moe_drop_fraction"):
        assert np.isfinite(float(m[key])), key
    assert not any(np.ndim(v) for v in m.values())
    np.testing.assert_allclose(float(m["moe_lb_loss"]), np.mean(lb), rtol=1e-5)
    bias_old = np.asarray(params["groups"]["blocks"][0]["ffn"]["expert_bias"])
    bias_new = np.asarray(new["params"]["groups"]["blocks"][0]["ffn"]["expert_bias"])
    step = np.abs(bias_new - bias_old)
    assert np.all((np.isclose(step, 1e-2)) | (step == 0)) and step.max() > 0


def test_moe_lm_trains_and_decodes_like_forward():
    cfg = finalize(_moe_cfg(model__n_layers=4, model__moe__moe_every=2, model__moe__first_k_dense=2,
                            model__moe__n_shared_experts=1, model__moe__router="sigmoid",
                            model__moe__norm_top_k=True,
                            model__moe__capacity_factor=4.0, model__seq_len=24,
                            train__lr=1e-2, train__warmup_steps=0), 1)
    model = new_model(cfg.model, 0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)), jnp.int32)
    full, _ = model(tokens)
    cache = model.init_cache(2, 24)
    assert set(cache) == {"prefix", "groups"}
    step = jax.jit(lambda tok, c, pos: model.decode(tok, c, position=pos))
    outs = []
    for t in range(tokens.shape[1]):
        logits, cache = step(tokens[:, t:t + 1], cache, jnp.int32(t))
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), rtol=2e-4, atol=2e-4)

    mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        run = train.build(cfg, mesh)
        state = numpy_init_state(run)
        batch = parallel.global_batch(_batch(cfg), mesh, cfg.train.batch_size)
        losses = []
        for _ in range(8):
            state, m = run.train_step(state, batch)
            losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.3, losses


# ---------------------------------------------------------------------------------------------
# 8 fake devices: expert parallelism
# ---------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny_config, numpy_init_state
    from efficient_arch import parallel, train
    from efficient_arch.config import finalize
    out = {{}}
    meshes = {{"1": (1, 1, 1, 1), "e2": (4, 1, 1, 2), "e4": (1, 2, 1, 4), "e8": (1, 1, 1, 8),
              "e2t2": (2, 1, 2, 2)}}
    for dispatch in ("capacity", "dropless"):
        for name, sizes in meshes.items():
            if dispatch == "dropless" and name not in ("1", "e8"):
                continue
            c = make_tiny_config(model__ffn="moe", model__moe__n_experts=8, model__moe__top_k=2,
                                 model__moe__d_ff_expert=32, model__moe__n_shared_experts=1,
                                 model__moe__bias_update_rate=1e-3, model__moe__dispatch=dispatch,
                                 model__moe__capacity_factor=1.0, train__batch_size=8,
                                 train__lr=1e-3, train__warmup_steps=0)
            for a, s in zip(("data", "fsdp", "tensor", "expert"), sizes):
                c.mesh[a] = s
            n = int(np.prod(sizes))
            cfg = finalize(c, n)
            mesh = parallel.make_mesh(cfg, devices=jax.devices()[:n])
            rng = np.random.default_rng(0)
            x = rng.integers(0, 256, (8, cfg.model.seq_len + 1)).astype(np.int32)
            with jax.set_mesh(mesh):
                run = train.build(cfg, mesh)
                state = numpy_init_state(run)
                b = parallel.global_batch({{"inputs": x[:, :-1], "targets": x[:, 1:]}}, mesh, 8)
                (_, m0), g = run.loss_and_grad(state["params"], b)
                gl = [float(jnp.sum(jnp.abs(v))) for v in jax.tree.leaves(g)]
                rows = []
                # the full train step (bias update, metrics) on two meshes only: each compile costs
                for _ in range(3 if name in ("1", "e4") else 0):
                    state, m = run.train_step(state, b)
                    rows.append([float(m[k]) for k in ("loss", "aux_loss", "moe_drop_fraction", "grad_norm")])
                d = (m0["moe_dropped"] / m0["moe_assigned"]) if "moe_dropped" in m0 else 0.0
            out[dispatch + ":" + name] = {{"rows": rows, "grad_l1": gl, "aux0": float(m0["aux_loss"]),
                                           "drop0": float(d)}}
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def eight_device_report():
    return run_fake_devices_child(CHILD.format(tests=str(REPO_ROOT / "tests")))


@pytest.mark.parametrize("dispatch, mesh", [("capacity", m) for m in ("e2", "e4", "e8", "e2t2")]
                         + [("dropless", "e8")])
def test_aux_loss_and_grads_do_not_depend_on_mesh(eight_device_report, dispatch, mesh):
    """Expert axis 2, 4, 8 (and expert 2 x tensor 2) on 8 fake devices: the aux loss, the drop
    fraction and every gradient leaf equal 1 device's; on expert axis 4, 3 full train steps (with
    the bias update) give the same losses, drop fractions and grad norms. (Dropless on expert
    axis 8 only, and train steps on one mesh, to bound the test time: each is a compile.)"""
    one, other = eight_device_report[f"{dispatch}:1"], eight_device_report[f"{dispatch}:{mesh}"]
    np.testing.assert_allclose(other["aux0"], one["aux0"], rtol=1e-5)
    np.testing.assert_allclose(other["drop0"], one["drop0"], rtol=1e-6)
    np.testing.assert_allclose(other["grad_l1"], one["grad_l1"], rtol=1e-4)
    if other["rows"]:
        np.testing.assert_allclose(other["rows"], one["rows"], rtol=2e-5, atol=1e-7)
    if dispatch == "capacity":
        assert one["drop0"] > 0  # capacity factor 1.0 drops something: the check is not vacuous


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_bf16_moe_train_step_runs_and_tracks_float32(dispatch):
    """bf16 compute through both dispatches (capacity's batched expert dots once failed on CPU:
    "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"): the first step's loss
    and gradient norm within bf16 rounding of float32's from the same parameters and batch."""
    out = {}
    for dt in ("float32", "bfloat16"):
        cfg = finalize(make_tiny_config(model__ffn="moe", model__moe__n_experts=4, model__moe__top_k=2,
                                        model__moe__dispatch=dispatch, model__dtype=dt,
                                        flops__peak_flops=1e12), 1)
        mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
        w = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.seq_len + 1))
        with jax.set_mesh(mesh):
            run = train.build(cfg, mesh)
            batch = parallel.global_batch({"inputs": w[:, :-1].astype(np.int32), "targets": w[:, 1:].astype(np.int32)},
                                          mesh, cfg.train.batch_size)
            _, m = run.train_step(numpy_init_state(run), batch)
        out[dt] = (float(m["loss"]), float(m["grad_norm"]))
    (l32, g32), (l16, g16) = out["float32"], out["bfloat16"]
    assert math.isfinite(l16) and abs(l16 - l32) < 0.02 * l32 and abs(g16 - g32) < 0.1 * g32, out
