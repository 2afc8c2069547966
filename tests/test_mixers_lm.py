"""Every registered sequence mixer inside the shared LM and train step.

Per mixer: token-by-token decoding with the LM's caches reproduces the full forward pass; a few
train steps on a fixed batch lower the loss; the same steps on 8 fake devices (2x2x2 mesh, one
subprocess for all mixers) give the same losses as on 1 device; analytic FLOPs of the whole train
step agree with XLA's corrected count.
"""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_arch import flops, parallel, train
from efficient_arch.config import finalize
from efficient_arch.models import registry
from efficient_arch.models.lm import new_model

from conftest import REPO_ROOT, make_tiny_config, numpy_init_state, run_fake_devices_child

MIXERS = registry.mixer_names()
# small chunk and window so chunked forms span several chunks and the window cuts the sequence
SMALL = dict(model__chunk_size=8, model__window_size=8, model__state_size=16, model__feature_dim=8,
             model__n_kv_heads=2)


def _cfg(mixer, **kw):
    return make_tiny_config(model__mixer=mixer, **{**SMALL, **kw})


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_matches_forward(mixer):
    cfg = finalize(_cfg(mixer, model__seq_len=24))
    model = new_model(cfg.model, 0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 21)), jnp.int32)
    full, _ = model(tokens)
    cache = model.init_cache(2, 24)
    step = jax.jit(lambda tok, c, pos: model.decode(tok, c, position=pos))
    outs = []
    for t in range(tokens.shape[1]):
        logits, cache = step(tokens[:, t:t + 1], cache, jnp.int32(t))
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), rtol=2e-4, atol=2e-4)


def _fixed_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (cfg.train.batch_size, cfg.model.seq_len + 1)).astype(np.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:]}


@pytest.mark.parametrize("mixer", MIXERS)
def test_trains_in_shared_step(mixer):
    cfg = finalize(_cfg(mixer, train__lr=1e-2, train__warmup_steps=0), 1)
    mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        run = train.build(cfg, mesh)
        state = numpy_init_state(run)  # skips compiling the PRNG init program (slow on a cold cache)
        batch = parallel.global_batch(_fixed_batch(cfg), mesh, cfg.train.batch_size)
        losses = []
        for _ in range(8):
            state, m = run.train_step(state, batch)
            losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.3, losses


CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny_config, numpy_init_state
    from efficient_arch import parallel, train
    from efficient_arch.config import finalize
    from efficient_arch.models import registry
    # one LM whose layer group holds every registered mixer: one compile per mesh covers them all
    mixers = tuple(registry.mixer_names())
    out = {{"mixers": list(mixers)}}
    for name, mesh_sizes in (("1", (1, 1, 1, 1)), ("2x2x2", (2, 2, 2, 1))):
        c = make_tiny_config(model__layer_pattern=mixers, model__n_layers=len(mixers),
                             model__chunk_size=8, model__window_size=8, model__state_size=16,
                             model__feature_dim=8, model__n_kv_heads=2, train__batch_size=8,
                             train__lr=1e-3, train__warmup_steps=0)
        for a, s in zip(("data", "fsdp", "tensor", "expert"), mesh_sizes):
            c.mesh[a] = s
        n = 1 if name == "1" else 8
        cfg = finalize(c, n)
        mesh = parallel.make_mesh(cfg, devices=jax.devices()[:n])
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (8, cfg.model.seq_len + 1)).astype(np.int32)
        with jax.set_mesh(mesh):
            run = train.build(cfg, mesh)
            state = numpy_init_state(run)
            b = parallel.global_batch({{"inputs": x[:, :-1], "targets": x[:, 1:]}}, mesh, 8)
            losses = []
            for _ in range(3):
                state, m = run.train_step(state, b)
                losses.append([float(m["loss"]), float(m["grad_norm"])])
        out[name] = losses
    print("RESULT" + json.dumps(out))
""")


def test_sharded_equals_single_device_for_every_mixer():
    """All registered mixers in one LM (layer_pattern = every mixer): 3 train steps on a 2x2x2
    mesh of 8 fake devices give the losses and gradient norms of 1 device."""
    out = run_fake_devices_child(CHILD.format(tests=str(REPO_ROOT / "tests")))
    assert out["mixers"] == MIXERS
    single, sharded = np.asarray(out["1"]), np.asarray(out["2x2x2"])
    assert np.all(np.isfinite(single)) and single[-1, 0] < single[0, 0]
    # float32, different reduction order across shardings: agreement to ~1e-5 relative
    np.testing.assert_allclose(sharded, single, rtol=2e-5)


@pytest.mark.parametrize("mixer", MIXERS)
def test_analytic_flops_match_xla(mixer):
    """Whole train step, hardware convention (attention full square as executed), matmuls
    dominating (d_model 128, seq 64): XLA/analytic in [1, 1.05]; the excess is elementwise work
    (norms, gates, softmax, AdamW) that model FLOPs do not count."""
    cfg = finalize(make_tiny_config(model__mixer=mixer, model__d_model=128, model__n_heads=4,
                                    model__n_kv_heads=4, model__d_ff=384, model__seq_len=64,
                                    model__chunk_size=16, model__window_size=16, model__state_size=32,
                                    model__feature_dim=16, model__vocab_size=512), 1)
    mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
    xla = flops.xla_flops_per_step(cfg, mesh)["xla_flops_per_step"]
    ana = flops.analytic_flops(cfg)["hardware_flops_per_step"]
    assert 1.0 <= xla / ana <= 1.05, (mixer, xla / ana)


def test_decode_beyond_the_kv_cache_is_loud():
    """A KV cache of max_len slots cannot hold token max_len: the logits are NaN, never a
    silently wrong distribution (a clamped write would overwrite the last slot)."""
    cfg = finalize(_cfg("attention", model__seq_len=8))
    model = new_model(cfg.model, 0)
    cache = model.init_cache(1, 4)
    tok = jnp.zeros((1, 1), jnp.int32)
    for t in range(4):
        logits, cache = model.decode(tok, cache, position=jnp.int32(t))
        assert np.isfinite(np.asarray(logits)).all()
    logits, _ = model.decode(tok, cache, position=jnp.int32(4))
    assert np.isnan(np.asarray(logits)).all()
