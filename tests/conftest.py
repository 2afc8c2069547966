"""Shared test setup: a repo-local persistent JAX compilation cache and tiny configs.

float64 is *not* enabled globally; a test that needs it uses ``jax.enable_x64(True)``
as a context manager.
"""

from __future__ import annotations

import os
import pathlib

# Tests check values and compiled HLO, not speed: skip XLA's LLVM optimization passes (the HLO
# passes, which decide fusion, layouts and what cost/memory analysis report, still run). Compiles
# dominate this suite on 2 cores; this cuts them ~30%. Set before JAX is imported, and inherited by
# the tests' child processes (CLI runs, fake-device children). EFFICIENT_ARCH_TEST_OPTIMIZE=1 keeps
# the full optimizations.
if os.environ.get("EFFICIENT_ARCH_TEST_OPTIMIZE", "0") != "1":
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_arch.config import default_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# EFFICIENT_ARCH_TEST_JAX_CACHE overrides the location (e.g. an empty dir to time a cold run).
JAX_CACHE_DIR = pathlib.Path(os.environ.get("EFFICIENT_ARCH_TEST_JAX_CACHE", REPO_ROOT / ".cache" / "jax"))

JAX_CACHE_DIR.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(JAX_CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Small enough for 2 CPU cores, large enough to exercise GQA, RoPE and the scan over layers.
TINY = {
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 264, "seq_len": 16,
              "d_ff": 128},
    "train": {"batch_size": 4, "steps": 10, "warmup_steps": 2, "log_every": 1, "eval_every": 5,
              "eval_batches": 1, "ckpt_every": 5},
}


def make_tiny_config(**overrides):
    """Unfinalized ``default_config()`` with tiny sizes.

    Overrides use ``section__field=value`` (``model__n_kv_heads=2``) or, for nested sections,
    ``model__moe__top_k=1``. Unknown names raise (the config is locked).
    """
    c = default_config()
    for section, fields in TINY.items():
        for k, v in fields.items():
            c[section][k] = v
    for key, value in overrides.items():
        parts = key.split("__")
        if len(parts) < 2:
            raise KeyError(f"override {key!r}: use section__field=value")
        node = c
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return c


@pytest.fixture
def tiny_config():
    """Factory fixture: ``tiny_config(model__n_layers=3, ...)`` -> unfinalized ConfigDict."""
    return make_tiny_config


def numpy_init_state(run, seed=0):
    """A train state with numpy-drawn parameters in the library's init distributions (weights
    N(0, 0.02^2), norms / D = 1, biases 0, conv taps N(0, 0.3^2), Mamba-style A in [1, 16] and
    softplus(dt_bias) log-uniform in [1e-3, 1e-1]). Skips compiling ``run.init_state`` (a PRNG
    program over every parameter, the slowest compile of these tests on a cold cache); the
    library init itself is tested in test_model.py."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        key = jax.tree_util.keystr(path)
        if "A_log" in key:
            x = np.log(rng.uniform(1.0, 16.0, s.shape))
        elif "dt_bias" in key:
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), s.shape))
            x = dt + np.log(-np.expm1(-dt))
        elif "scale" in key or "'D'" in key:
            x = np.ones(s.shape)
        elif "bias" in key:
            x = np.zeros(s.shape)
        elif "conv" in key:
            x = 0.3 * rng.standard_normal(s.shape)
        else:
            x = 0.02 * rng.standard_normal(s.shape)
        return jnp.asarray(x, s.dtype)

    params = jax.tree_util.tree_map_with_path(fill, run.abstract_state["params"])
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": jax.jit(run.tx.init)(params),
             "rng": jax.random.key_data(jax.random.key(seed + 1))}
    return jax.device_put(state, run.state_shardings)


def build_mixer(cfg_model, seed: int = 0):
    """The registered mixer ``cfg_model.mixer`` built alone (no eager sharding), params seeded."""
    from flax import nnx

    from efficient_arch.models import registry

    with nnx.use_eager_sharding(False):
        return registry.get_mixer(cfg_model.mixer)(cfg_model, rngs=nnx.Rngs(seed))


def mixer_forward(cfg_model, seed: int = 0):
    """``(module, state, f)`` with ``f(state, x, segment_ids)`` the jitted forward of the mixer
    built by :func:`build_mixer`; passing the same ``state`` to another form's ``f`` compares forms
    on identical parameters."""
    from flax import nnx

    module = build_mixer(cfg_model, seed)
    graphdef, state = nnx.split(module)
    return module, state, jax.jit(lambda st, x, seg: nnx.merge(graphdef, st)(x, segment_ids=seg))


def run_fake_devices_child(code: str, n_devices: int = 8, timeout: int = 900) -> dict:
    """Run ``code`` (a Python program) in a child process with ``n_devices`` fake CPU devices and
    return the JSON it prints on its last line starting with ``RESULT`` (``print("RESULT" +
    json.dumps(out))``). The device count must be set before JAX is imported, hence a child.
    Fails the test with the child's stderr tail if it exits non-zero."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=str(REPO_ROOT), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])
