"""Fault tolerance of the training loop (issue #7): topology change on restore, kill -9 during an
asynchronous save, corrupt checkpoints, workdir protection, the NaN policy and multi-host runs.

The multi-device parts run in child processes started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (this pytest process keeps its one CPU
device). One child (module-scoped fixture ``topology``) trains the tiny model on 8 devices and
resumes its checkpoint on 1 and on 4 devices; its 8-device run is also the reference of the
multi-host test.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def write_corpus(d: pathlib.Path, n_files: int = 8, n_words: int = 400) -> pathlib.Path:
    """A small deterministic text corpus of ``n_files`` files of ``n_words`` words."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n_files):
        (d / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n")
    return d


def child_env(n_devices: int = 8) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("EFFICIENT_ARCH_TEST_JAX_CACHE", str(REPO_ROOT / ".cache" / "jax"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def read_losses(workdir: pathlib.Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


# ----------------------------------------------------------------------------- topology change

# Child: 6 steps on mesh (data, fsdp, tensor, expert) = 2x2x2x1 (8 devices) with a checkpoint at
# step 3; the step-3 checkpoint alone is copied into fresh workdirs and resumed to step 6 on 1
# device and on 4 devices as 1x1x4x1 (fsdp 2 -> 1, tensor 2 -> 4). Also restores step 3 directly
# onto each mesh and reports per-leaf SHA-256 of the values and each leaf's shard shape.
TOPOLOGY_CHILD = r'''
import hashlib, json, os, shutil, sys
import numpy as np
import jax
cache = os.environ.get("EFFICIENT_ARCH_TEST_JAX_CACHE")
if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from conftest import make_tiny_config
from efficient_arch import parallel, train
from efficient_arch.checkpoint import Checkpointer
from efficient_arch.config import finalize

root, corpus = sys.argv[1], sys.argv[2]
LAYOUTS = {"w8": ((2, 2, 2, 1), 8), "w1": ((1, 1, 1, 1), 1), "w4": ((1, 1, 4, 1), 4)}

def cfg_for(mesh):
    c = make_tiny_config(data__source="text", data__path=corpus, data__cache_dir=os.path.join(root, "cache"),
                         data__val_fraction=0.2, flops__peak_flops=1e12, train__steps=6, train__ckpt_every=3,
                         train__log_every=1, train__eval_every=1000, train__batch_size=8, train__keep_ckpts=5,
                         train__lr=3e-4)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = mesh
    return c

assert jax.device_count() == 8
report = {"restored": {}, "summary": {}}
for name, (mesh_sizes, n) in LAYOUTS.items():
    w = os.path.join(root, name)
    if name != "w8":
        shutil.copytree(os.path.join(root, "w8", "checkpoints", "3"), os.path.join(w, "checkpoints", "3"))
    s = train.run_training(cfg_for(mesh_sizes), w, progress=False, devices=jax.devices()[:n])
    report["summary"][name] = {"steps": s["steps"], "n_devices": s["n_devices"]}
    cfg = finalize(cfg_for(mesh_sizes), n)
    mesh = parallel.make_mesh(cfg, jax.devices()[:n])
    run = train.build(cfg, mesh)
    with jax.set_mesh(mesh), Checkpointer(os.path.join(root, "w8"), keep=10, save_every=1) as ck:
        state, _, _ = ck.restore(3, run.abstract_state)
    leaves = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        leaves[jax.tree_util.keystr(path)] = {
            "sha": hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest(),
            "shard_shape": list(x.sharding.shard_shape(x.shape))}
    want = {jax.tree_util.keystr(p): list(a.sharding.shard_shape(a.shape))
            for p, a in jax.tree_util.tree_leaves_with_path(run.abstract_state)}
    for k in leaves:
        leaves[k]["want_shard_shape"] = want[k]
    report["restored"][name] = {"leaves": leaves, "n_devices": len(mesh.devices.flat), "mesh": dict(mesh.shape)}
print("REPORT" + json.dumps(report))
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    return write_corpus(tmp_path_factory.mktemp("ft_corpus") / "corpus")


def tiny_run_config(corpus: pathlib.Path, **overrides):
    """The tiny model of conftest on ``corpus``: 8 steps of 4 x 16 tokens, log every step,
    checkpoint every 2 (programs shared with the other run_training tests via the JAX cache)."""
    from conftest import make_tiny_config

    base = dict(data__source="text", data__path=str(corpus), data__cache_dir=str(corpus.parent / "cache"),
                data__val_fraction=0.2, flops__peak_flops=1e12, train__steps=8, train__ckpt_every=2,
                train__log_every=1, train__eval_every=1000, train__batch_size=4, train__keep_ckpts=5)
    base.update(overrides)
    return make_tiny_config(**base)


def cli_argv(workdir, corpus: pathlib.Path, *extra: str, **overrides) -> list[str]:
    """``efficient-arch train`` arguments giving exactly :func:`tiny_run_config` (plus overrides
    ``{"train.steps": 10}`` and extra flags), so the CLI runs share the compiled programs."""
    fields = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 4,
              "model.d_ff": 128, "model.seq_len": 16, "train.batch_size": 4, "train.steps": 8,
              "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 1000, "train.eval_batches": 1,
              "train.ckpt_every": 2, "train.keep_ckpts": 5, "data.source": "text", "data.path": str(corpus),
              "data.cache_dir": str(corpus.parent / "cache"), "data.val_fraction": 0.2, "flops.peak_flops": 1e12}
    fields.update(overrides)
    return (["train", "--config=experiments/configs/transformer.py:tiny", f"--workdir={workdir}", "--noprogress"]
            + [f"--config.{k}={v}" for k, v in fields.items()] + list(extra))


@pytest.fixture(scope="module")
def topology(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("topology")
    proc = subprocess.run([sys.executable, "-c", TOPOLOGY_CHILD, str(root), str(corpus)], env=child_env(8),
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    return {"root": root, "corpus": corpus, "stdout": proc.stdout, **json.loads(line[len("REPORT"):])}


def test_checkpoint_restores_onto_other_meshes_with_identical_values(topology):
    restored = topology["restored"]
    assert {k: v["n_devices"] for k, v in restored.items()} == {"w8": 8, "w1": 1, "w4": 4}
    assert restored["w4"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4, "expert": 1}
    ref = restored["w8"]["leaves"]
    assert len(ref) > 20  # params, both Adam moments, counts, step, rng
    for name in ("w1", "w4"):
        got = restored[name]["leaves"]
        assert set(got) == set(ref)
        for k in ref:
            assert got[k]["sha"] == ref[k]["sha"], (name, k)  # bit-identical values
            assert got[k]["shard_shape"] == got[k]["want_shard_shape"], (name, k)  # laid out for this mesh
    # the layouts really differ: a tensor-sharded leaf has a different shard on each mesh
    wq = [k for k in ref if k.startswith("['params']") and "'wq'" in k][0]
    shards = {n: tuple(restored[n]["leaves"][wq]["shard_shape"]) for n in restored}
    assert len(set(shards.values())) == 3, shards


def test_training_continues_on_other_meshes(topology):
    """Resumed from the 8-device step-3 checkpoint, steps 4-6 on 1 and 4 devices give the 8-device
    run's losses (float32 reduction order differs between meshes: rtol 1e-5)."""
    root = topology["root"]
    ref = read_losses(root / "w8")
    assert sorted(ref) == list(range(1, 7))
    assert topology["stdout"].count("resumed from step 3") == 2
    for name in ("w1", "w4"):
        got = read_losses(root / name)
        assert sorted(got) == [4, 5, 6], name
        for step in got:
            np.testing.assert_allclose(got[step]["loss"], ref[step]["loss"], rtol=1e-5, err_msg=f"{name} {step}")
            np.testing.assert_allclose(got[step]["grad_norm"], ref[step]["grad_norm"], rtol=1e-4)
            assert got[step]["lr"] == ref[step]["lr"]
        assert topology["summary"][name]["steps"] == 6
    assert ref[6]["loss"] < ref[1]["loss"]


# ----------------------------------------------------------------------------- kill -9 mid-save

# Child: the tiny run (checkpoint every 2 steps) with orbax's final rename of step 4 held back:
# the step-4 save writes everything into 4.orbax-checkpoint-tmp, prints HANG and never commits,
# so the parent can SIGKILL the process deterministically in the middle of an asynchronous save.
KILL_CHILD = r"""
import asyncio, sys
import jax
import os
cache = os.environ.get("EFFICIENT_ARCH_TEST_JAX_CACHE")
if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from orbax.checkpoint._src.path import atomicity
real = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self, *a, **k):
    if self.get_final().name == "4":
        print("HANG", self.get(), flush=True)
        await asyncio.sleep(3600)
    return await real(self, *a, **k)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
import test_fault_tolerance as ft
from efficient_arch import train
import pathlib
train.run_training(ft.tiny_run_config(pathlib.Path(sys.argv[2])), sys.argv[1], progress=False)
"""


def test_kill_9_during_async_save(corpus, tmp_path, capsys):
    """SIGKILL while the step-4 save is in flight: step 4 is never chosen, the run resumes from
    step 2, recomputes steps 3-8 bit for bit, and the later saves (4, 6, 8) all commit."""
    import signal
    import threading

    from efficient_arch import train
    from efficient_arch.checkpoint import Checkpointer, committed_steps, uncommitted_steps

    work = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(work), str(corpus)], env=child_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("HANG"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    ckdir = work / "checkpoints"
    assert committed_steps(ckdir) == [2]
    assert uncommitted_steps(ckdir) == ["4.orbax-checkpoint-tmp"]
    assert (ckdir / "4.orbax-checkpoint-tmp" / "state").is_dir()  # the data was written, not committed
    import shutil

    shutil.copytree(work, tmp_path / "copy")  # opening a Checkpointer lets orbax clear tmp folders
    with Checkpointer(tmp_path / "copy", keep=5, save_every=2) as ck:
        assert ck.latest_step() == 2
    killed = read_losses(work)
    assert {3, 4} <= set(killed) and max(killed) <= 6  # logged past the last committed step

    capsys.readouterr()
    summary = train.run_training(tiny_run_config(corpus), str(work), progress=False)
    out = capsys.readouterr().out
    assert "ignoring never-committed checkpoint folder(s) 4.orbax-checkpoint-tmp" in out
    assert "resuming from the last committed step 2" in out and "resumed from step 2" in out
    assert summary["steps"] == 8
    assert committed_steps(ckdir) == [2, 4, 6, 8] and uncommitted_steps(ckdir) == []
    rows = read_losses(work)
    assert sorted(rows) == list(range(1, 9))  # one row per step: the killed run's extra rows moved
    abandoned = [json.loads(x) for x in (work / "metrics.abandoned.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in abandoned) == sorted(s for s in killed if s > 2)
    for r in abandoned:  # the recomputed steps equal what the killed run logged, bit for bit
        assert (r["loss"], r["grad_norm"], r["lr"]) == tuple(rows[r["step"]][k] for k in ("loss", "grad_norm", "lr"))


# Child: the tiny run sends itself SIGTERM right after step 3 is logged; the forced save of
# step 3 that follows never commits (its final rename hangs, printing HANG): a process stuck
# while stopping, which a second SIGTERM must kill at once.
STUCK_STOP_CHILD = r"""
import asyncio, os, signal, sys, pathlib
import jax
cache = os.environ.get("EFFICIENT_ARCH_TEST_JAX_CACHE")
if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from orbax.checkpoint._src.path import atomicity
real = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self, *a, **k):
    if self.get_final().name == "3":
        print("HANG", flush=True)
        await asyncio.sleep(3600)
    return await real(self, *a, **k)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
from efficient_arch import metrics
write = metrics.MetricsWriter.write

def write_then_sigterm(self, step, row):
    write(self, step, row)
    if step == 3 and "loss" in row:
        os.kill(os.getpid(), signal.SIGTERM)

metrics.MetricsWriter.write = write_then_sigterm
import test_fault_tolerance as ft
from efficient_arch import train
train.run_training(ft.tiny_run_config(pathlib.Path(sys.argv[2])), sys.argv[1], progress=False)
"""


def test_second_sigterm_kills_a_process_stuck_while_stopping(corpus, tmp_path):
    """The first SIGTERM starts the stop (and says on stderr that a second one exits at once); the
    stop's checkpoint hangs; a second SIGTERM kills the process (it used to be swallowed, leaving
    it hung). The last committed checkpoint (step 2) is kept, the cut save never counts."""
    import signal
    import threading

    from efficient_arch.checkpoint import committed_steps

    work = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", STUCK_STOP_CHILD, str(work), str(corpus)], env=child_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith("HANG"):
                proc.send_signal(signal.SIGTERM)
                break
        proc.wait(timeout=120)
        err = proc.stderr.read()
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err[-3000:]
    assert "received SIGTERM: finishing the current step, then writing a checkpoint and exiting with status 143; " \
           "send SIGTERM again to exit at once" in err
    assert committed_steps(work / "checkpoints") == [2]


# ----------------------------------------------------------------------------- corrupt checkpoints


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory) -> pathlib.Path:
    """A finished tiny run (8 steps, checkpoints 2, 4, 6, 8); tests copy it before changing it."""
    from efficient_arch import train

    work = tmp_path_factory.mktemp("finished") / "run"
    train.run_training(tiny_run_config(corpus), str(work), progress=False)
    return work


def listing(d: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# orbax leaves the reads of the other arrays un-awaited after the first one fails
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_checkpoint_is_reported_kept_and_skippable(finished_run, corpus, tmp_path, capsys):
    """A committed step whose array data was truncated: the run stops with an error naming the
    folder, the earlier step and the mv command; nothing is deleted; after moving the folder
    aside as told the run resumes from step 6 and recomputes steps 7-8 bit for bit."""
    import shutil

    from efficient_arch import cli, train
    from efficient_arch.checkpoint import CorruptCheckpointError, committed_steps

    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    step8 = work / "checkpoints" / "8"
    data = max((step8 / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(1000)
    before = listing(step8)
    logs_before = (listing(work / "tb"), (work / "metrics.jsonl").read_bytes())
    cfg = tiny_run_config(corpus, train__steps=10)
    with pytest.raises(CorruptCheckpointError) as exc:
        train.run_training(cfg, str(work), progress=False)
    msg = str(exc.value)
    assert (listing(work / "tb"), (work / "metrics.jsonl").read_bytes()) == logs_before  # no new events file
    assert f"checkpoint {step8} (step 8) is corrupt or truncated" in msg
    assert "OUT_OF_RANGE" in msg  # tensorstore's reason, not its wrapper
    assert f"mv {step8} {step8}.corrupt" in msg and "previous committed step 6" in msg
    assert "Nothing was deleted" in msg
    assert listing(step8) == before and committed_steps(work / "checkpoints") == [2, 4, 6, 8]

    # the CLI prints the same message as one line, exit status 2
    capsys.readouterr()
    assert cli.main(cli_argv(work, corpus, **{"train.steps": 10})) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"checkpoint error: checkpoint {step8} (step 8) is corrupt") and "Traceback" not in err
    assert listing(step8) == before

    shutil.move(step8, work / "checkpoints" / "8.corrupt")  # the fix the message names
    train.run_training(tiny_run_config(corpus), str(work), progress=False)
    out = capsys.readouterr().out
    assert "resumed from step 6" in out and "ignoring" not in out  # 8.corrupt is no leftover of a save
    assert committed_steps(work / "checkpoints") == [2, 4, 6, 8]
    assert listing(work / "checkpoints" / "8.corrupt") == before  # kept, never garbage-collected
    ref, got = read_losses(finished_run), read_losses(work)
    assert sorted(got) == list(range(1, 9))
    for step in (7, 8):
        assert got[step]["loss"] == ref[step]["loss"] and got[step]["grad_norm"] == ref[step]["grad_norm"]


def test_bytes_flipped_in_place_are_detected_by_checksums(finished_run, corpus, tmp_path):
    """Two bytes of the largest array file of step 8 flipped, size unchanged (what bit rot or a
    bad copy does; orbax / tensorstore read it without complaint): the restore compares the
    arrays with the checksums recorded at save time and reports the folder as corrupt, naming
    the damaged leaves; nothing is changed."""
    import shutil

    from efficient_arch import train
    from efficient_arch.checkpoint import CorruptCheckpointError

    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    step8 = work / "checkpoints" / "8"
    data = max((step8 / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    for off in (len(raw) // 3, len(raw) // 2):
        raw[off] ^= 0x5A
    data.write_bytes(bytes(raw))
    before = listing(step8)
    with pytest.raises(CorruptCheckpointError) as exc:
        train.run_training(tiny_run_config(corpus, train__steps=10), str(work), progress=False)
    msg = str(exc.value)
    assert f"checkpoint {step8} (step 8) is corrupt" in msg and "ChecksumMismatch" in msg
    assert "does not match the checksums recorded when this step was saved, so its files changed" in msg
    assert "['opt_state']" in msg or "['params']" in msg
    assert "previous committed step 6" in msg and listing(step8) == before


def test_generate_checks_the_restored_parameters_against_their_checksums(finished_run, tmp_path):
    """``generate.load_run`` restores only the parameters; they are compared with the checksums
    recorded at save time too: a parameter whose recorded sum no longer matches its bytes (here the
    record is edited, as if the array file had changed) makes the checkpoint corrupt, naming the
    leaf; the untouched run loads."""
    import json
    import shutil

    from efficient_arch import generate
    from efficient_arch.checkpoint import CHECKSUM_KEY, CorruptCheckpointError

    assert generate.load_run(str(finished_run)).step == 8
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    files = [p for p in (work / "checkpoints" / "8" / "data").rglob("*") if p.is_file()]
    edited = None
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and CHECKSUM_KEY in data:
            edited = next(k for k in data[CHECKSUM_KEY] if k.startswith("['params']"))
            data[CHECKSUM_KEY][edited]["sum"] = (data[CHECKSUM_KEY][edited]["sum"] + 1) % 2**32
            f.write_text(json.dumps(data))
    assert edited, files
    with pytest.raises(CorruptCheckpointError) as exc:
        generate.load_run(str(work))
    msg = str(exc.value)
    assert "ChecksumMismatch" in msg and "parameter array(s) does not match the checksums" in msg and edited in msg


@pytest.mark.parametrize("damage", ["config_garbage", "empty_folder"])
def test_unreadable_latest_config_is_reported(finished_run, corpus, tmp_path, damage):
    """The config item of the latest step is not JSON, or the step folder is empty: the error
    names the folder before anything is built, and the folder is left as it was."""
    import shutil

    from efficient_arch import train
    from efficient_arch.checkpoint import CorruptCheckpointError

    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    step8 = work / "checkpoints" / "8"
    if damage == "config_garbage":
        (step8 / "config" / "metadata").write_text("{garbage")
    else:
        shutil.rmtree(step8)
        step8.mkdir()
    before = listing(step8)
    with pytest.raises(CorruptCheckpointError, match=r"\(step 8\) is corrupt or truncated") as exc:
        train.run_training(tiny_run_config(corpus, train__steps=10), str(work), progress=False)
    assert "previous committed step 6" in str(exc.value)
    assert step8.is_dir() and listing(step8) == before


# ----------------------------------------------------------------------------- workdir protection


def test_config_diff_names_run_changes_and_allows_execution_changes(corpus):
    from efficient_arch import train
    from efficient_arch.config import finalize

    saved = finalize(tiny_run_config(corpus), 1).to_dict()
    same = finalize(tiny_run_config(corpus, model__remat="full", model__scan_layers=False, model__dtype="bfloat16",
                                    train__steps=20, train__grad_accum=2, train__log_every=5, train__eval_every=7,
                                    train__ckpt_every=3, train__keep_ckpts=1, data__cache_dir="/elsewhere",
                                    data__path="/moved/corpus", flops__peak_flops=2e12, mesh__data=1), 1)
    assert train.config_diff(saved, same) == []
    other = finalize(tiny_run_config(corpus, train__lr=1e-3, train__seed=3, data__val_fraction=0.25,
                                     model__n_layers=4, train__eval_batches=2), 1)
    assert [d[0] for d in train.config_diff(saved, other)] == [
        "data.val_fraction", "model.n_layers", "train.eval_batches", "train.lr", "train.seed"]
    # a field the checkpoint predates counts as its default
    old = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "b2"}}
    assert train.config_diff(old, same) == []
    assert [d[0] for d in train.config_diff(old, finalize(tiny_run_config(corpus, train__b2=0.99), 1))] == ["train.b2"]


def test_other_experiment_refused_unless_overwrite(finished_run, corpus, tmp_path, capsys):
    """A workdir holding a finished run: a run with another data split (or lr) is refused, naming
    the fields; --overwrite moves the old workdir aside untouched and trains from step 0."""
    import shutil

    from efficient_arch import cli
    from efficient_arch.checkpoint import committed_steps, read_config

    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    before = listing(work)
    capsys.readouterr()
    assert cli.main(cli_argv(work, corpus, **{"data.val_fraction": 0.25, "train.lr": 0.001})) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"config error: {work} holds a different experiment (data.val_fraction: checkpoint "
                          "0.2 vs now 0.25; train.lr: checkpoint 0.003 vs now 0.001)")
    assert "--overwrite" in err and "Traceback" not in err
    assert listing(work) == before

    # changes that keep the run (log cadence, steps already reached) are accepted: nothing to do
    assert cli.main(cli_argv(work, corpus, **{"train.log_every": 4, "model.remat": "full"})) == 0
    assert "already trained to step 8" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert listing(work) == before

    assert cli.main(cli_argv(work, corpus, "--overwrite", **{"data.val_fraction": 0.25})) == 0
    out = "".join(capsys.readouterr().out.split())
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and "movedtheold" in out and str(old[0]) in out
    assert listing(old[0]) == before  # the old experiment, byte for byte
    assert committed_steps(work / "checkpoints") == [2, 4, 6, 8]
    assert read_config(work)["data"]["val_fraction"] == 0.25
    assert sorted(read_losses(work)) == list(range(1, 9))


def test_overwrite_moves_nothing_until_the_run_can_start(finished_run, corpus, tmp_path, capsys):
    """--overwrite with a bad data path (or an invalid config): exit 2 naming the problem, and the
    old workdir is still in place, untouched (it used to be moved aside first)."""
    import shutil

    from efficient_arch import cli

    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    before = listing(work)
    for bad, want in (({"data.path": tmp_path / "no_such_corpus"}, "config error: data: config.data.path="),
                      ({"model.n_kv_heads": 3}, "config error: config.model.n_heads=4: must be divisible")):
        capsys.readouterr()
        assert cli.main(cli_argv(work, corpus, "--overwrite", **bad)) == 2
        assert capsys.readouterr().err.startswith(want)
        assert listing(work) == before
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]


def test_a_locked_workdir_is_refused_naming_the_holder(finished_run, corpus, tmp_path, capsys):
    """A workdir whose lock another trainer holds (here: this process, through a second open
    file): train refuses with exit 2 naming the holder's pid, also with --overwrite (it never
    moves a workdir in use); once the lock is released the run proceeds."""
    import shutil

    from efficient_arch import cli, train

    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    held = train._lock_workdir(str(work))
    try:
        before = listing(work)
        assert train.workdir_holder(str(work)).startswith(f"pid {os.getpid()} on ")
        for extra in ((), ("--overwrite",)):
            capsys.readouterr()
            assert cli.main(cli_argv(work, corpus, *extra, **{"train.steps": 10})) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"workdir error: {work} is in use by another training process (pid {os.getpid()} on ")
            assert "two trainers must never share a workdir" in err and "kill -TERM" in err
            assert listing(work) == before
            assert not [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    finally:
        held.close()
    assert train.workdir_holder(str(work)) is None
    assert cli.main(cli_argv(work, corpus, **{"train.steps": 10})) == 0
    assert "resumed from step 8" in " ".join(capsys.readouterr().out.split())


def test_lock_is_released_when_the_checkpointer_cannot_open(finished_run, corpus, tmp_path, monkeypatch):
    """A checkpoint folder that cannot be opened (Checkpointer raises after the lock was taken):
    the error reaches the caller and the workdir's lock is released at once, not left to the
    garbage collector (a retry in the same process would otherwise be refused)."""
    import shutil

    from efficient_arch import cli, train

    work = tmp_path / "run"
    shutil.copytree(finished_run, work)

    def broken(*a, **k):
        raise OSError("checkpoint folder unreadable (test)")

    from efficient_arch import checkpoint

    monkeypatch.setattr(checkpoint, "Checkpointer", broken)  # train imports it at call time
    with pytest.raises(OSError, match="unreadable") as raised:
        cli.main(cli_argv(work, corpus, **{"train.steps": 10}))
    assert raised.tb is not None  # the traceback (and its frames) still alive, as in a debugger
    f, holder = train._try_lock(os.path.join(str(work), train.LOCK_FILE))
    assert f is not None and holder is None, holder  # free: this process can take it again
    f.close()


# ----------------------------------------------------------------------------- NaN policy


def poison_batches(monkeypatch, steps: set[int], bad_id: int):
    """run_training's training batches of the given (1-based) steps carry token id ``bad_id``
    (>= vocab_size: the embedding gather returns NaN, so loss and gradients are NaN)."""
    import efficient_arch.data as data_lib

    real = data_lib.make_train_iterator

    class Poisoned:
        def __init__(self, it):
            self.it, self.n = it, 0

        def __next__(self):
            b = dict(next(self.it))
            self.n += 1
            if self.n in steps:
                b["inputs"] = b["inputs"].copy()
                b["inputs"][0, 0] = bad_id
            return b

        def __getattr__(self, name):  # get_state / set_state
            return getattr(self.it, name)

    monkeypatch.setattr(data_lib, "make_train_iterator", lambda *a, **kw: Poisoned(real(*a, **kw)))


@pytest.mark.parametrize("field,value", [("nan_policy", "ignore"), ("max_skipped_steps", 0),
                                         ("max_skipped_steps", -1)])
def test_nan_policy_fields_validated(corpus, field, value):
    from efficient_arch.config import ConfigError, finalize

    with pytest.raises(ConfigError, match=rf"config\.train\.{field}={value!r}: (choose one of|must be a positive)"):
        finalize(tiny_run_config(corpus, **{f"train__{field}": value}))


def test_nan_policy_skip_discards_the_update_and_counts(corpus, tmp_path, monkeypatch, capsys):
    """Step 3's batch makes loss and gradients NaN: under nan_policy=skip the run goes on to
    step 8, the step-3 checkpoint holds exactly the step-2 params and Adam state (step and RNG
    advance), the rows count the skip, and the later steps train normally."""
    import jax

    from efficient_arch import parallel, train
    from efficient_arch.checkpoint import Checkpointer
    from efficient_arch.config import finalize

    cfg = tiny_run_config(corpus, train__nan_policy="skip", train__ckpt_every=1, train__keep_ckpts=10)
    poison_batches(monkeypatch, {3}, cfg.model.vocab_size + 7)
    summary = train.run_training(cfg, str(tmp_path), progress=False)
    out = capsys.readouterr().out
    assert "non-finite loss (loss nan, grad_norm nan) at step 3: update skipped (1 in a row, 1 in total" in out
    assert summary["steps"] == 8 and summary["skipped_steps"] == 1
    rows = read_losses(tmp_path)
    assert sorted(rows) == list(range(1, 9))
    assert rows[3]["loss"] is None and rows[3]["grad_norm"] is None  # NaN logged as null
    assert [rows[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(np.isfinite(rows[s]["loss"]) for s in (4, 5, 6, 7, 8)) and rows[8]["loss"] < rows[2]["loss"]

    fcfg = finalize(cfg, 1)
    mesh = parallel.make_mesh(fcfg)
    run = train.build(fcfg, mesh)
    with jax.set_mesh(mesh), Checkpointer(tmp_path, keep=10, save_every=1) as ck:
        s2, _, _ = ck.restore(2, run.abstract_state)
        s3, d3, _ = ck.restore(3, run.abstract_state)
        s4, _, _ = ck.restore(4, run.abstract_state)
    for part in ("params", "opt_state"):
        for a, b, c in zip(jax.tree.leaves(s2[part]), jax.tree.leaves(s3[part]), jax.tree.leaves(s4[part])):
            a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
            assert np.isfinite(b).all() and np.array_equal(a, b)  # the update was discarded
        assert any(not np.array_equal(np.asarray(b), np.asarray(c))  # step 4 trained again
                   for b, c in zip(jax.tree.leaves(s3[part]), jax.tree.leaves(s4[part])))
    assert int(s3["step"]) == 3 and not np.array_equal(np.asarray(s2["rng"]), np.asarray(s3["rng"]))
    assert d3["loop"] == {"skipped_steps": 1, "consecutive_skips": 1}


def test_nan_policy_skip_stops_after_max_consecutive(corpus, tmp_path, monkeypatch):
    """Every batch from step 3 on is poisoned, max_skipped_steps=2: the run stops at step 4 with
    a FloatingPointError naming it; the last checkpoint (step 3, finite, update discarded) is kept."""
    from efficient_arch import train
    from efficient_arch.checkpoint import committed_steps

    cfg = tiny_run_config(corpus, train__nan_policy="skip", train__max_skipped_steps=2, train__ckpt_every=1,
                          train__keep_ckpts=10)
    poison_batches(monkeypatch, set(range(3, 9)), cfg.model.vocab_size + 7)
    with pytest.raises(FloatingPointError) as exc:
        train.run_training(cfg, str(tmp_path), progress=False)
    msg = str(exc.value)
    assert "at step 4: 2 consecutive steps skipped (train.max_skipped_steps=2); stopping" in msg
    assert "last committed checkpoint (step 3) is kept" in msg
    assert committed_steps(tmp_path / "checkpoints") == [1, 2, 3]
    assert sorted(read_losses(tmp_path)) == [1, 2, 3]  # the stopping step is not logged (as under "stop")
    assert not (tmp_path / "summary.json").exists()


def test_nan_stop_message_without_checkpoint_and_with_the_overwrite_fix(corpus, tmp_path, monkeypatch):
    """A NaN at step 1: the message says no checkpoint was written yet (not "step None") and that a
    lower lr needs --overwrite or a new --workdir (the workdir refuses a changed lr)."""
    from efficient_arch import train

    cfg = tiny_run_config(corpus)
    poison_batches(monkeypatch, {1}, cfg.model.vocab_size + 7)
    with pytest.raises(FloatingPointError) as exc:
        train.run_training(cfg, str(tmp_path), progress=False)
    msg = str(exc.value)
    assert "at step 1; nothing from this step was saved and no checkpoint was written yet" in msg
    assert "None" not in msg.replace("(loss nan, grad_norm nan)", "")
    assert "rerun with --overwrite" in msg and "new --workdir" in msg and "different experiment" in msg


def test_nan_skip_that_skips_every_step_is_not_a_finished_run(corpus, tmp_path, monkeypatch):
    """nan_policy=skip, every batch poisoned, fewer steps than max_skipped_steps: the run used to
    end with exit 0 and the initial parameters; now it raises at the last step naming what
    happened, writes no summary and no final checkpoint (a rerun does not count it finished)."""
    from efficient_arch import train
    from efficient_arch.checkpoint import committed_steps

    cfg = tiny_run_config(corpus, train__nan_policy="skip", train__steps=4)
    poison_batches(monkeypatch, set(range(1, 5)), cfg.model.vocab_size + 7)
    with pytest.raises(FloatingPointError) as exc:
        train.run_training(cfg, str(tmp_path), progress=False)
    msg = str(exc.value)
    assert "at step 4: every one of the 4 steps run since step 0 was skipped" in msg
    assert "not marked finished" in msg and "only checked to be finite, not healthy" in msg
    assert not (tmp_path / "summary.json").exists() and committed_steps(tmp_path / "checkpoints") == [2]


def test_more_steps_warn_of_the_schedule_and_a_nan_after_resume_names_the_checkpoint(
        corpus, tmp_path, monkeypatch, capsys):
    """A finished 4-step run continued to 8 steps: the resume warns that train.steps changed and
    how the lr schedule jumps; a NaN at the first resumed step says the restored checkpoint's
    arrays matched their checksums (so the saved state itself is suspect)."""
    from efficient_arch import train

    train.run_training(tiny_run_config(corpus, train__steps=4), str(tmp_path), progress=False)
    cfg = tiny_run_config(corpus, train__steps=8)
    lr_old = float(train.make_schedule(tiny_run_config(corpus, train__steps=4).train)(4))
    lr_new = float(train.make_schedule(cfg.train)(4))
    assert lr_new > 2 * lr_old  # the jump the warning is about
    poison_batches(monkeypatch, {1}, cfg.model.vocab_size + 7)  # the first batch of the resumed run
    capsys.readouterr()
    with pytest.raises(FloatingPointError) as exc:
        train.run_training(cfg, str(tmp_path), progress=False)
    out = " ".join(capsys.readouterr().out.split())
    assert (f"warning: train.steps changed from 4 (the checkpoint's) to 8: the warmup-cosine learning-rate "
            f"schedule is recomputed over 8 steps, so step 5 trains at lr {lr_new:.3g} where the original "
            f"schedule was at {lr_old:.3g}") in out
    msg = str(exc.value)
    assert "at step 5; nothing from this step was saved and the last committed checkpoint (step 4) is kept" in msg
    assert "first step after resuming from the step-4 checkpoint, whose arrays match the checksums" in msg


# ----------------------------------------------------------------------------- bad inputs (docs/bad_inputs.md)


def test_bad_inputs_fail_with_one_line_not_a_traceback(corpus, tmp_path, capsys):
    """Inputs of docs/bad_inputs.md that used to end in a traceback: a corpus shorter than one
    sequence, a --workdir that is a file or cannot be created, a missing config file."""
    from efficient_arch import cli

    short = tmp_path / "short.txt"
    short.write_text("too short")
    (tmp_path / "a_file").write_text("x")
    cases = [
        (cli_argv(tmp_path / "w1", corpus, **{"data.path": short}),
         "config error: data: config.model.seq_len=16: the train split has 8 tokens, fewer than the 17 one "
         "window needs"),
        (cli_argv(tmp_path / "a_file", corpus),
         f"config error: --workdir='{tmp_path / 'a_file'}' is an existing file, not a directory"),
        (cli_argv(tmp_path / "a_file" / "sub", corpus),
         f"config error: --workdir='{tmp_path / 'a_file' / 'sub'}' cannot be created"),
        (["train", "--config=experiments/configs/nope.py:tiny", f"--workdir={tmp_path / 'w2'}"],
         "efficient-arch train: config file 'experiments/configs/nope.py' not found"),
    ]
    for argv, want in cases:
        capsys.readouterr()
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # usage errors exit from the parser
            rc = e.code
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith(want) and "Traceback" not in err, (argv, rc, err)
    assert not (tmp_path / "w2").exists()


# ----------------------------------------------------------------------------- multi-host


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def multihost(topology, tmp_path_factory):
    """The topology fixture's 8-device run, now as 2 processes x 4 CPU devices: two
    ``python -m efficient_arch train`` processes joined through $JAX_COORDINATOR_ADDRESS /
    $JAX_NUM_PROCESSES / $JAX_PROCESS_ID (gloo CPU collectives), same config and data."""
    work = tmp_path_factory.mktemp("multihost") / "run"
    corpus = topology["corpus"]
    argv = cli_argv(work, corpus, **{"train.steps": 6, "train.ckpt_every": 3, "train.batch_size": 8,
                                     "train.lr": 3e-4, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                     "mesh.expert": 1})
    cache = os.environ.get("EFFICIENT_ARCH_TEST_JAX_CACHE", str(REPO_ROOT / ".cache" / "jax"))
    port = free_port()
    procs = []
    for pid in range(2):
        env = child_env(4)
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        procs.append(subprocess.Popen([sys.executable, "-m", "efficient_arch", *argv], env=env, cwd=REPO_ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    for rc, out, err in outs:
        assert rc == 0, (out[-3000:], err[-5000:])
    return {"work": work, "outs": outs, "argv": argv}


def test_two_processes_match_one_process(multihost, topology):
    """2 processes x 4 devices == 1 process x 8 devices (mesh 2x2x2x1, same global batches):
    the same loss at every step (float32 reduction order: rtol 1e-5) and the same final
    parameters; logs written once (process 0), checkpoints written together."""
    import jax

    from efficient_arch import parallel, train
    from efficient_arch.checkpoint import Checkpointer, committed_steps
    from efficient_arch.config import finalize

    work = multihost["work"]
    (rc0, out0, _), (rc1, out1, _) = multihost["outs"]
    assert "distributed: process 0 of 2" in " ".join(out0.split()) and "8 global devices" in " ".join(out0.split())
    assert "distributed: process" not in out1 and "summary" not in out1, out1[-3000:]  # process 0 reports
    ref, got = read_losses(topology["root"] / "w8"), read_losses(work)
    assert sorted(got) == sorted(ref) == list(range(1, 7))  # each step logged once
    for step in ref:
        np.testing.assert_allclose(got[step]["loss"], ref[step]["loss"], rtol=1e-5, err_msg=str(step))
        np.testing.assert_allclose(got[step]["grad_norm"], ref[step]["grad_norm"], rtol=1e-4)
        assert got[step]["lr"] == ref[step]["lr"]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["n_devices"] == 8 and summary["steps"] == 6
    assert committed_steps(work / "checkpoints") == [3, 6]

    # both checkpoints restore onto this 1-device process (a topology change as well)
    cfg = finalize(tiny_run_config(topology["corpus"], train__steps=6, train__batch_size=8, train__lr=3e-4), 1)
    mesh = parallel.make_mesh(cfg)
    run = train.build(cfg, mesh)
    states = {}
    for name, d in (("1x8", topology["root"] / "w8"), ("2x4", work)):
        with jax.set_mesh(mesh), Checkpointer(d, keep=10, save_every=1) as ck:
            states[name], data_state, _ = ck.restore(6, run.abstract_state)
    lr = 3e-4
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(states["1x8"]["params"]),
                            jax.tree.leaves(states["2x4"]["params"])):
        # Adam turns float32 reduction noise in near-zero gradient entries into moves of up to ~lr
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=0.02 * lr,
                                   err_msg=jax.tree_util.keystr(path))
    assert int(states["2x4"]["step"]) == 6



# Process 1 of the two-process run: SIGTERM to itself right after its step-2 checkpoint call
# (process 0 gets no signal); otherwise `python -m efficient_arch train` with the same flags.
SIGNAL_ONE_PROCESS_CHILD = r"""
import os, signal, sys
from efficient_arch import checkpoint, cli
save = checkpoint.Checkpointer.save

def save_then_sigterm(self, step, *a, **k):
    out = save(self, step, *a, **k)
    if int(step) == 2 and not k.get("force"):
        os.kill(os.getpid(), signal.SIGTERM)
    return out

checkpoint.Checkpointer.save = save_then_sigterm
sys.exit(cli.main(sys.argv[1:]))
"""


def run_two_processes(argv, home, signal_process_1: bool = False, timeout: int = 400):
    """``efficient-arch train argv`` as 2 processes x 4 CPU devices (as the multihost fixture),
    with $HOME=home (its CPU-peak cache). Returns [(returncode, stdout, stderr)] per process;
    a process still running after ``timeout`` s is killed and reported with returncode None."""
    cache = os.environ.get("EFFICIENT_ARCH_TEST_JAX_CACHE", str(REPO_ROOT / ".cache" / "jax"))
    port = free_port()
    procs = []
    for pid in range(2):
        env = child_env(4)
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", HOME=str(home))
        code = (["-c", SIGNAL_ONE_PROCESS_CHILD] if signal_process_1 and pid == 1 else ["-m", "efficient_arch"])
        procs.append(subprocess.Popen([sys.executable, *code, *argv], env=env, cwd=REPO_ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            try:
                out, err = p.communicate(timeout=timeout)
                outs.append((p.returncode, out, err))
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                outs.append((None, out, err))
    finally:
        for p in procs:
            p.kill()
    return outs


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(corpus, tmp_path):
    """SIGTERM to process 1 only, after step 2: both processes agree to stop at step 2 (one
    all-gather of the signal flag per step), write the step-2 checkpoint together and exit 143
    (before: process 1 stopped to save alone and both hung). The same command then resumes both
    from step 2 to the end. No peak override: each process calibrates the CPU peak on one of
    its own devices, and the cache holds a plausible figure (process 1 used to time process 0's
    device, ~7e15 FLOP/s, and that poisoned the cache)."""
    from efficient_arch import hardware
    from efficient_arch.checkpoint import committed_steps

    work = tmp_path / "run"
    home = tmp_path / "home"
    argv = cli_argv(work, corpus, **{"train.steps": 6, "train.ckpt_every": 3, "train.batch_size": 8,
                                     "train.lr": 3e-4, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                     "mesh.expert": 1})
    argv = [a for a in argv if not a.startswith("--config.flops.peak_flops=")]
    (rc0, out0, err0), (rc1, out1, err1) = run_two_processes(argv, home, signal_process_1=True)
    assert (rc0, rc1) == (143, 143), (rc0, rc1, out0[-2000:], err0[-3000:], err1[-3000:])
    out0 = " ".join(out0.split())
    assert ("stopped by signal 15 (SIGTERM) (received by process 1; every process stopped at this step) at step 2; "
            "checkpoint written") in out0
    assert "received SIGTERM: finishing the current step" in err1 and "received SIGTERM" not in err0
    assert committed_steps(work / "checkpoints") == [2]
    assert sorted(read_losses(work)) == [1, 2]

    (rc0, out0, err0), (rc1, _, err1) = run_two_processes(argv, home)
    assert (rc0, rc1) == (0, 0), (out0[-2000:], err0[-3000:], err1[-3000:])
    assert "resumed from step 2" in " ".join(out0.split())
    assert committed_steps(work / "checkpoints") == [2, 3, 6]
    assert sorted(read_losses(work)) == list(range(1, 7))  # every step logged once

    cached = json.loads((home / ".cache" / "efficient_arch" / "cpu_peak.json").read_text())
    assert cached and all(0 < e["flops_per_s"] <= hardware.MAX_PLAUSIBLE_FLOPS_PER_CORE * e["fingerprint"]["cores"]
                          for e in cached.values()), cached
    summary = json.loads((work / "summary.json").read_text())  # the best seen, shared by 4 devices
    assert 0 < summary["peak_flops_per_s"] * 4 <= max(e["flops_per_s"] for e in cached.values()) * (1 + 1e-9)
    assert summary["mfu"] > 1e-4, summary["mfu"]


def test_distributed_settings_from_config_env_and_launchers(corpus):
    """Who decides to start jax.distributed: nothing set -> single process; JAX_* variables or
    config.distributed -> those values (config first); SLURM / Open MPI / TPU launchers with more
    than one process -> JAX's auto-detection; bad values -> ConfigError naming them."""
    from efficient_arch.config import ConfigError, finalize
    from efficient_arch.parallel import detect_cluster, distributed_settings, init_distributed

    cfg = finalize(tiny_run_config(corpus))
    assert distributed_settings(cfg, {}) is None
    assert distributed_settings(cfg, {"JAX_NUM_PROCESSES": "1"}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    got = distributed_settings(cfg, env)
    assert (got["coordinator_address"], got["num_processes"], got["process_id"]) == ("10.0.0.1:1234", 4, 3)
    assert got["initialization_timeout"] == 300
    over = finalize(tiny_run_config(corpus, distributed__num_processes=2, distributed__process_id=1,
                                    distributed__coordinator_address="host0:9999", distributed__timeout_s=60))
    got = distributed_settings(over, env)  # the config wins over the environment
    assert (got["coordinator_address"], got["num_processes"], got["process_id"], got["initialization_timeout"]) == (
        "host0:9999", 2, 1, 60)
    slurm = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}
    assert detect_cluster(slurm) == ("SLURM", 8) and detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None
    assert detect_cluster({"OMPI_COMM_WORLD_SIZE": "2"}) == ("Open MPI", 2)
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == ("Cloud TPU", 4)
    got = distributed_settings(cfg, slurm)
    assert got["num_processes"] is None and "SLURM" in got["source"]  # left to jax's auto-detection
    assert distributed_settings(finalize(tiny_run_config(corpus, distributed__auto_detect=False)), slurm) is None
    with pytest.raises(ConfigError, match=r"JAX_NUM_PROCESSES='two': must be an integer"):
        distributed_settings(cfg, {"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ConfigError, match=r"JAX_PROCESS_ID=2: must lie in \[0, num_processes=2\)"):
        distributed_settings(cfg, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ConfigError, match=r"no coordinator: set distributed.coordinator_address"):
        init_distributed(cfg, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ConfigError, match=r"coordinator localhost:\d+ \(process 0\) was not reachable within "
                                          r"distributed.timeout_s=1 s"):
        init_distributed(finalize(tiny_run_config(corpus, distributed__timeout_s=1)),
                         {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                          "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}"})
    for field, value, msg in (("process_id", 3, "must be below distributed.num_processes=2"),
                              ("coordinator_address", "host0", "must be 'host:port'"),
                              ("timeout_s", 0, "must be a positive integer")):
        kw = {f"distributed__{field}": value, "distributed__num_processes": 2}
        with pytest.raises(ConfigError, match=rf"config\.distributed\.{field}={value!r}: {msg}"):
            finalize(tiny_run_config(corpus, **kw))
