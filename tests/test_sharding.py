"""Sharded training equals single-device training, and every state leaf is sharded by the rules.

The sharded runs need 8 devices, so they happen in one child process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before that process imports JAX;
this pytest process is not affected). The child trains the same tiny model for 3 steps on the
same batches under several meshes, writes the initial/final parameters to ``.npz`` files and
prints a JSON report (per-step losses, parameter checksums, the sharding spec of every state
leaf); the assertions happen here, in the parent.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from efficient_arch import parallel

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> ((data, fsdp, tensor, expert), grad_accum, n_devices)
RUNS = {
    "1dev": ((1, 1, 1, 1), 1, 1),
    "8x1x1x1": ((8, 1, 1, 1), 1, 8),
    "2x2x2x1": ((2, 2, 2, 1), 1, 8),
    "1x4x2x1": ((1, 4, 2, 1), 1, 8),
    "2x2x2x1_accum2": ((2, 2, 2, 1), 2, 8),
}
N_STEPS = 3
BATCH, SEQ, VOCAB, N_LAYERS = 8, 16, 264, 2
# AdamW normalises each update to ~lr, so a gradient entry that is ~0 up to float32 reduction
# noise (which differs between shardings) can move by up to ~lr in either direction. Measured:
# max |param diff| ~0.9% of lr after 3 steps (2.6e-5 at lr=3e-3, 8.6e-7 at lr=1e-4). A small lr
# keeps that noise well under rtol 1e-4 / atol 1e-6, while a real sharding bug (wrong or
# unreduced gradients) still moves parameters by ~lr = 30x atol. grad_norm is compared
# separately, because Adam hides gradient-scale errors.
LR = 3e-5

CHILD = r'''
import json, os, sys
import numpy as np
import jax

out_dir, runs, n_steps, batch, seq, vocab, n_layers = (sys.argv[1], json.loads(sys.argv[2]),
    int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
lr = float(sys.argv[8])
cache = os.environ.get("EFFICIENT_ARCH_TEST_JAX_CACHE")
if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from flax import nnx
from efficient_arch import parallel, train
from efficient_arch.config import default_config, finalize
from efficient_arch.models.lm import new_model

assert jax.device_count() == 8, jax.devices()

def spec_json(spec):
    return [list(s) if isinstance(s, tuple) else s for s in spec]

def flat(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]

rng = np.random.default_rng(0)
batches = []
for _ in range(n_steps):
    seqs = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    batches.append({"inputs": seqs[:, :-1], "targets": seqs[:, 1:]})

report = {"devices": jax.device_count(), "runs": {}}
for name, (sizes, accum, n_dev) in runs.items():
    c = default_config()
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 64, n_layers, 4, 2
    m.d_ff, m.vocab_size, m.seq_len = 128, vocab, seq
    t = c.train
    t.batch_size, t.grad_accum, t.steps, t.warmup_steps = batch, accum, 10, 0
    t.lr = lr
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = sizes
    cfg = finalize(c, n_dev)
    mesh = parallel.make_mesh(cfg, devices=jax.devices()[:n_dev])
    run = train.build(cfg, mesh)
    # logical names straight from the model's parameter metadata
    abstract = nnx.eval_shape(lambda: new_model(cfg.model, 0))
    st = nnx.state(abstract, nnx.Param)
    names = {}
    for path, var in nnx.to_flat_state(st):
        key = "".join(f"[{p!r}]" for p in path)
        names[key] = list(var.get_metadata()["out_sharding"])
    with jax.set_mesh(mesh):
        state = run.init_state()
        init = {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat(state["params"])}
        losses, grad_norms = [], []
        for b in batches:
            gb = parallel.global_batch(b, mesh, batch)
            state, metrics = run.train_step(state, gb)
            losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
    final = {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat(state["params"])}
    keys = sorted(final)
    np.savez(os.path.join(out_dir, name + ".npz"),
             **{f"init{i}": init[k] for i, k in enumerate(keys)},
             **{f"final{i}": final[k] for i, k in enumerate(keys)})
    leaves = {}
    for part in ("params", "opt_state", "step", "rng"):
        for p, x in flat(state[part]):
            leaves[part + jax.tree_util.keystr(p)] = {
                "spec": spec_json(x.sharding.spec), "shape": list(x.shape),
                "shard_shape": list(x.sharding.shard_shape(x.shape)),
                "n_devices": len(x.sharding.device_set)}
    report["runs"][name] = {
        "losses": losses, "grad_norms": grad_norms, "keys": keys, "names": names,
        "checksum": {k: [float(final[k].sum()), float(np.abs(final[k]).sum())] for k in keys},
        "mesh": dict(mesh.shape), "leaves": leaves, "step": int(state["step"]),
        "batch_spec": spec_json(run.batch_sharding.spec)}
print("REPORT" + json.dumps(report))
'''


def spec_from_json(s):
    return P(*[tuple(a) if isinstance(a, list) else a for a in s])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("EFFICIENT_ARCH_TEST_JAX_CACHE", str(REPO_ROOT / ".cache" / "jax"))
    args = [sys.executable, "-c", CHILD, str(out), json.dumps(RUNS), str(N_STEPS), str(BATCH), str(SEQ),
            str(VOCAB), str(N_LAYERS), str(LR)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    rep = json.loads(line[len("REPORT"):])
    rep["params"] = {}
    for name, r in rep["runs"].items():
        with np.load(out / f"{name}.npz") as z:
            rep["params"][name] = {
                "init": {k: z[f"init{i}"] for i, k in enumerate(r["keys"])},
                "final": {k: z[f"final{i}"] for i, k in enumerate(r["keys"])}}
    return rep


def test_parent_process_is_unaffected():
    import jax

    assert "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
    assert jax.device_count() == 1


def test_child_saw_eight_devices_and_meshes(report):
    assert report["devices"] == 8
    for name, (sizes, _, _) in RUNS.items():
        mesh = report["runs"][name]["mesh"]
        assert tuple(mesh[a] for a in ("data", "fsdp", "tensor", "expert")) == sizes
        assert report["runs"][name]["step"] == N_STEPS


@pytest.mark.parametrize("name", [n for n in RUNS if n != "1dev"])
def test_losses_match_single_device(report, name):
    ref = report["runs"]["1dev"]["losses"]
    got = report["runs"][name]["losses"]
    assert len(got) == len(ref) == N_STEPS
    assert all(np.isfinite(ref)) and ref[0] == pytest.approx(np.log(VOCAB), rel=0.05)  # ~uniform at init
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(report["runs"][name]["grad_norms"], report["runs"]["1dev"]["grad_norms"],
                               rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in RUNS if n != "1dev"])
def test_params_match_single_device(report, name):
    ref, got = report["params"]["1dev"], report["params"][name]
    assert set(got["final"]) == set(ref["final"])
    for k in ref["final"]:
        # the initial parameters do not depend on the mesh (partitionable PRNG)
        np.testing.assert_array_equal(got["init"][k], ref["init"][k], err_msg=k)
        np.testing.assert_allclose(got["final"][k], ref["final"][k], rtol=1e-4, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(report["runs"][name]["checksum"][k], report["runs"]["1dev"]["checksum"][k],
                                   rtol=1e-4, atol=1e-3)


def test_training_changed_every_param(report):
    p = report["params"]["1dev"]
    for k in p["final"]:
        assert not np.array_equal(p["final"][k], p["init"][k]), k


# logical names each parameter must carry (independent of the model's own metadata)
EXPECTED_NAMES = {
    "embedding": ("vocab", "embed"),
    "final_norm": ("embed",),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wkv": ("layers", "embed", None, "kv_heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "w_gate_up": ("layers", "embed", None, "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "mixer_norm": ("layers", "embed"),
    "ffn_norm": ("layers", "embed"),
}


def expected_names(key):
    for k, v in EXPECTED_NAMES.items():
        if f"'{k}'" in key:
            return v
    raise KeyError(key)


def test_rules_spot_checks():
    assert parallel.logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    assert parallel.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert parallel.logical_to_spec(("batch", "seq")) == P(("data", "fsdp", "expert"), None)
    assert parallel.logical_to_spec(("layers", "mlp", "embed")) == P(None, "tensor", "fsdp")
    with pytest.raises(KeyError, match="nope"):
        parallel.logical_to_spec(("nope",))


@pytest.mark.parametrize("name", list(RUNS))
def test_param_shardings_follow_rules(report, name):
    r = report["runs"][name]
    mesh = r["mesh"]
    params = {k[len("params"):]: v for k, v in r["leaves"].items() if k.startswith("params")}
    assert set(params) == set(r["keys"]) and len(params) == 9
    for key, leaf in params.items():
        names = tuple(r["names"][key])
        assert names == expected_names(key), key
        spec = spec_from_json(leaf["spec"])
        assert spec == parallel.logical_to_spec(names), (key, spec)
        # the leaf is really split that way across devices
        want = []
        for dim, axes in zip(leaf["shape"], spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            want.append(dim // int(np.prod([mesh[a] for a in axes])))
        assert leaf["shard_shape"] == want, key
        assert leaf["n_devices"] == RUNS[name][2]
    if name == "2x2x2x1":
        wq = [v for k, v in params.items() if "'wq'" in k][0]
        assert spec_from_json(wq["spec"]) == P(None, "fsdp", "tensor", None)
        assert wq["shard_shape"] == [N_LAYERS, 64 // 2, 4 // 2, 16]
    assert spec_from_json(r["batch_spec"]) == P(("data", "fsdp", "expert"), None)


@pytest.mark.parametrize("name", list(RUNS))
def test_adam_moments_sharded_like_params(report, name):
    r = report["runs"][name]
    params = {k[len("params"):]: v for k, v in r["leaves"].items() if k.startswith("params")}
    found = {"mu": set(), "nu": set()}
    for key, leaf in r["leaves"].items():
        if not key.startswith("opt_state"):
            continue
        for moment in ("mu", "nu"):
            tag = f".{moment}"
            if tag in key:
                pkey = key[key.index(tag) + len(tag):]
                assert pkey in params, key
                assert leaf["spec"] == params[pkey]["spec"], (key, leaf["spec"], params[pkey]["spec"])
                assert leaf["shard_shape"] == params[pkey]["shard_shape"]
                found[moment].add(pkey)
                break
        else:  # everything else (counts, clip state) is a replicated scalar
            assert leaf["shape"] == [] and all(s is None for s in leaf["spec"]), key
    assert found["mu"] == found["nu"] == set(params)
    for part in ("step", "rng"):
        leaf = [v for k, v in r["leaves"].items() if k.startswith(part)][0]
        assert all(s is None for s in leaf["spec"])
