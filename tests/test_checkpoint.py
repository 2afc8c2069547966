"""Tests for efficient_arch.checkpoint (orbax CheckpointManager wrapper)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from efficient_arch.checkpoint import Checkpointer, committed_steps, read_config


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))


def _state(mesh, seed=0):
    row = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())
    k = jax.random.key(seed)
    return {
        "params": {
            "w": jax.device_put(jax.random.normal(k, (4, 3), jnp.float32), row),
            "b": jax.device_put(jnp.full((3,), 1 / 3, jnp.float32), rep),
        },
        "opt": {"mu": jax.device_put(jnp.arange(3, dtype=jnp.float32) * 1e-7, rep)},
        "step": jax.device_put(jnp.int32(seed + 11), rep),
        "rng": jax.device_put(jax.random.key_data(jax.random.fold_in(k, 1)), rep),
    }


def _abstract(state, mesh):
    # Ask for shardings different from how it was saved where possible.
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)


CONFIG = {"model": {"mixer": "attention", "d_model": 64}, "train": {"lr": 3e-4, "steps": 10},
          "flops": {"peak_flops": None}}


def test_round_trip_bit_identical(tmp_path, mesh):
    state = _state(mesh)
    data_state = {"epoch": 1, "index": 17, "name": "stdlib"}
    with Checkpointer(tmp_path, keep=3, save_every=1) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(5, state, data_state, CONFIG)
        ckpt.wait()
        assert ckpt.latest_step() == 5
        row = NamedSharding(mesh, P("data"))
        abstract = _abstract(state, mesh)
        abstract["params"]["w"] = jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=row)
        restored, ds, cfg = ckpt.restore(None, abstract)
    assert ds == data_state and cfg == CONFIG
    for (path, a), b, want in zip(jax.tree_util.tree_leaves_with_path(state),
                                  jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert b.dtype == a.dtype, path
        np.testing.assert_array_equal(np.atleast_1d(np.asarray(b)).view(np.uint8),
                                      np.atleast_1d(np.asarray(a)).view(np.uint8))
        assert b.sharding == want.sharding, path
    assert restored["step"].dtype == jnp.int32 and restored["rng"].dtype == jnp.uint32
    assert read_config(tmp_path) == CONFIG


def test_keep_save_every_force(tmp_path, mesh):
    state = _state(mesh)
    with Checkpointer(tmp_path, keep=2, save_every=3) as ckpt:
        saved = [s for s in range(1, 10) if ckpt.save(s, state, {"i": s}, {"s": s})]
        assert saved == [3, 6, 9]
        assert ckpt.save(10, state, {"i": 10}, {"s": 10}, force=True)
        assert not ckpt.save(10, state, {}, {}, force=True)  # already saved: no-op
        ckpt.wait()
        assert ckpt.all_steps() == [9, 10]
        _, ds, cfg = ckpt.restore(9, _abstract(state, mesh))
        assert ds == {"i": 9} and cfg == {"s": 9}
        with pytest.raises(FileNotFoundError):
            ckpt.restore(3, _abstract(state, mesh))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "9"]
    assert read_config(tmp_path) == {"s": 10}


def test_empty_workdir(tmp_path, mesh):
    assert read_config(tmp_path) is None
    assert committed_steps(tmp_path / "checkpoints") == []
    with Checkpointer(tmp_path, keep=1, save_every=1) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError):
            ckpt.restore(None, _abstract(_state(mesh), mesh))


def test_uncommitted_tmp_dirs_ignored(tmp_path, mesh):
    state = _state(mesh)
    with Checkpointer(tmp_path, keep=3, save_every=1) as ckpt:
        ckpt.save(2, state, {"i": 2}, {"s": 2})
        ckpt.wait()
        # What a save cut short by preemption leaves behind: orbax's tmp names
        # ("<step>.orbax-checkpoint-tmp" now, "-<timestamp>" in older versions).
        for name in ("7.orbax-checkpoint-tmp", "8.orbax-checkpoint-tmp-1712345678"):
            d = tmp_path / "checkpoints" / name / "config"
            d.mkdir(parents=True)
            (d / "metadata").write_text('{"s": 999}')
        assert ckpt.latest_step() == 2
        _, _, cfg = ckpt.restore(None, _abstract(state, mesh))
        assert cfg == {"s": 2}
    assert read_config(tmp_path) == {"s": 2}
    # A new Checkpointer (resume) still resumes from 2; orbax removes the
    # leftovers in the background, finished before its next save starts.
    with Checkpointer(tmp_path, keep=3, save_every=1) as ckpt:
        assert ckpt.latest_step() == 2
        assert ckpt.save(3, state, {"i": 3}, {"s": 3})
        ckpt.wait()
        assert ckpt.latest_step() == 3
    assert not any("tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())


def test_restore_requires_shardings(tmp_path, mesh):
    state = _state(mesh)
    with Checkpointer(tmp_path, keep=1, save_every=1) as ckpt:
        ckpt.save(1, state, {}, {})
        bad = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        with pytest.raises(ValueError, match="sharding"):
            ckpt.restore(1, bad)
        # concrete arrays are accepted as targets (their shardings are used)
        restored, _, _ = ckpt.restore(1, state)
        assert restored["params"]["w"].sharding == state["params"]["w"].sharding


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        Checkpointer(tmp_path, keep=0, save_every=1)
    with pytest.raises(ValueError):
        Checkpointer(tmp_path, keep=1, save_every=0)


def test_relative_workdir(tmp_path, mesh, monkeypatch):
    """`--workdir=runs/x` is relative: orbax needs absolute paths, the wrapper resolves them."""
    monkeypatch.chdir(tmp_path)
    state = _state(mesh, seed=3)
    with Checkpointer("runs/rel", keep=2, save_every=1) as ckpt:
        assert ckpt.save(1, state, {"i": 1}, CONFIG)
        ckpt.wait()
        restored, _, _ = ckpt.restore(None, _abstract(state, mesh))
    assert committed_steps(tmp_path / "runs/rel/checkpoints") == [1]
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(state["params"]["w"]))
    assert read_config("runs/rel") == CONFIG
