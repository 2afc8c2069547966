"""Sweeps (efficient_arch/sweep.py, `efficient-arch sweep`): point expansion and names, a failing
point recorded while the others finish, finished points skipped on rerun, an interrupted point
resumed from its checkpoint, results.csv/jsonl, and the parallel (subprocess) mode via the CLI."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from efficient_arch import sweep as S

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = f"{REPO}/experiments/configs/transformer.py:tiny"
# a 4-step MQAR run of a 1-layer d_model 32 transformer: a few seconds on 2 cores
TINY = {"data.source": "mqar", "data.n_kv_pairs": 2, "model.vocab_size": 32, "model.seq_len": 16,
        "model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 1, "model.n_layers": 1,
        "model.d_ff": None, "train.steps": 4, "train.batch_size": 4, "train.log_every": 2,
        "train.eval_every": 4, "train.eval_batches": 1, "train.ckpt_every": 2, "flops.peak_flops": 1e12}


def write_sweep(tmp_path, points, grid=None, name="s"):
    path = tmp_path / f"{name}.py"
    path.write_text(f"BASE = {BASE!r}\nOVERRIDES = {TINY!r}\nPOINTS = {points!r}\nGRID = {grid or {}!r}\n")
    return str(path)


def test_expand_points_product_names_and_errors():
    pts = S.expand_points("a.py:tiny", {"train.steps": 5}, [{"config": "b.py:x"}, {}],
                          {"model.d_model": [32, 64], "train.lr": [1e-3]})
    assert len(pts) == 4
    assert [p.config for p in pts] == ["b.py:x", "b.py:x", "a.py:tiny", "a.py:tiny"]
    assert [p.overrides["model.d_model"] for p in pts] == [32, 64, 32, 64]
    assert all(p.overrides["train.steps"] == 5 and p.overrides["train.lr"] == 1e-3 for p in pts)
    assert pts[0].swept == ("config", "model.d_model")  # train.lr and train.steps do not vary
    assert pts[0].name.startswith("b_x__d_model=32-") and len({p.name for p in pts}) == 4
    again = S.expand_points("a.py:tiny", {"train.steps": 5}, [{"config": "b.py:x"}, {}],
                            {"model.d_model": [32, 64], "train.lr": [1e-3]})
    assert [p.name for p in again] == [p.name for p in pts]  # names are stable
    other = S.expand_points("a.py:tiny", {"train.steps": 6}, [{"config": "b.py:x"}, {}],
                            {"model.d_model": [32, 64], "train.lr": [1e-3]})
    assert not {p.name for p in other} & {p.name for p in pts}  # a changed point gets a new directory
    with pytest.raises(S.SweepError, match="identical"):
        S.expand_points("a.py", None, [{"train.lr": 1}, {"train.lr": 1}])
    with pytest.raises(S.SweepError, match="dotted config field"):
        S.expand_points("a.py", {"lr": 1})
    with pytest.raises(S.SweepError, match="non-empty list"):
        S.expand_points("a.py", grid={"train.lr": []})


def test_load_sweep_errors(tmp_path):
    with pytest.raises(S.SweepError, match="does not exist"):
        S.load_sweep(str(tmp_path / "missing.py"))
    p = tmp_path / "nobase.py"
    p.write_text("GRID = {}\n")
    with pytest.raises(S.SweepError, match="no BASE"):
        S.load_sweep(str(p))
    with pytest.raises(KeyError, match="model.nope"):
        S.build_config(BASE, {"model.nope": 1})


def _statuses(rows):
    return [r["status"] for r in rows]


def test_failing_point_recorded_rest_finish_then_rerun_skips(tmp_path):
    path = write_sweep(tmp_path, [{"data.seed": 0}, {"model.n_heads": 3}, {"model.nope": 1}, {"data.seed": 1}])
    wd = str(tmp_path / "run")
    lines = []
    rows = S.run_sweep(path, wd, log=lines.append)
    assert _statuses(rows) == ["ok", "failed", "failed", "ok"]
    assert "model.n_heads" in rows[1]["error"] and "ConfigError" in rows[1]["error"]
    assert "model.nope" in rows[2]["error"]
    for r in (rows[0], rows[3]):
        assert r["steps"] == 4 and r["val_accuracy"] is not None and r["tokens_per_s"] > 0 and r["mfu"] > 0
        assert r["final_val_loss"] is not None and r["error"] is None
    # the table: one row per point, the swept fields as columns
    with open(os.path.join(wd, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert [t["status"] for t in table] == ["ok", "failed", "failed", "ok"]
    for col in ("name", "final_val_loss", "val_accuracy", "tokens_per_s", "mfu", "error", "overrides",
                "data.seed", "model.n_heads", "model.nope"):
        assert col in table[0]
    assert S.read_results(wd) == json.loads(json.dumps(rows))
    # rerun: finished points are skipped (not retrained), failed ones are retried
    done = [os.path.getmtime(os.path.join(wd, r["name"], "summary.json")) for r in (rows[0], rows[3])]
    lines.clear()
    rows2 = S.run_sweep(path, wd, log=lines.append)
    assert _statuses(rows2) == ["ok", "failed", "failed", "ok"]
    assert sum("finished, skipped" in ln for ln in lines) == 2
    assert done == [os.path.getmtime(os.path.join(wd, r["name"], "summary.json")) for r in (rows[0], rows[3])]
    recs = [json.load(open(os.path.join(wd, r["name"], "point.json"))) for r in rows2]
    assert [r["attempts"] for r in recs] == [1, 2, 2, 1]


def test_interrupted_point_resumes_from_its_checkpoint(tmp_path):
    from efficient_arch.train import run_training

    path = write_sweep(tmp_path, [{}])
    wd = tmp_path / "run"
    (point,) = S.load_sweep(path).points
    d = wd / point.name
    # what an interrupted first attempt leaves: a checkpoint at step 2, point.json not "ok"
    cfg = S.build_config(point.config, point.overrides)
    cfg.train.steps = 2
    run_training(cfg, str(d), progress=False)
    (d / "summary.json").unlink()
    (d / "point.json").write_text(json.dumps({"status": "interrupted", "attempts": 1, "wall_s": 1.0}))
    rows = S.run_sweep(path, str(wd), log=lambda s: None)
    assert rows[0]["status"] == "ok" and rows[0]["steps"] == 4
    assert "resumed from step 2" in (d / "log.txt").read_text()
    steps = [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4]  # steps 1-2 from the first attempt, 3-4 resumed; no step trained twice


def test_cli_parallel_sweep(tmp_path):
    path = write_sweep(tmp_path, [{}, {"model.n_heads": 3}])
    wd = tmp_path / "run"
    env = dict(os.environ)
    cache = os.environ.get("EFFICIENT_ARCH_TEST_JAX_CACHE", str(REPO / ".cache" / "jax"))
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "efficient_arch", "sweep", path, "--workdir", str(wd), "--parallel", "2"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr  # one point failed; the other finished
    rows = S.read_results(str(wd))
    assert _statuses(rows) == ["ok", "failed"]
    assert "model.n_heads" in rows[1]["error"]
    assert "running (subprocess)" in r.stdout
    assert (wd / "results.csv").exists()
    listed = subprocess.run(cmd[:-2] + ["--list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "[finished]" in listed.stdout and "[failed]" in listed.stdout
    assert "(subprocess)[" not in r.stdout  # one line per event


def test_point_names_leave_out_fields_a_point_does_not_set():
    pts = S.expand_points("a.py:tiny", None, [{"model.n_layers": 3}, {"train.lr": 1e-3}, {"config": "b.py:x"}])
    assert [p.name.rsplit("-", 1)[0] for p in pts] == ["n_layers=3__a_tiny", "lr=0.001__a_tiny", "b_x"]
    assert not any("None" in p.name for p in pts)


def test_config_errors_name_each_place_once_and_suggest_fields(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(FileNotFoundError) as exc:
        S.resolve_config_path("experiments/configs/nope.py:tiny")
    assert str(exc.value) == f"config file 'experiments/configs/nope.py' not found (looked in {REPO})"
    with pytest.raises(KeyError, match=r"unknown config field 'model.n_layer' \(did you mean 'model.n_layers'\?\)"):
        S.build_config(BASE, {"model.n_layer": 3})
    with pytest.raises(KeyError, match=r"unknown config field 'modle.d_model' \(did you mean 'model'\?\)"):
        S.build_config(BASE, {"modle.d_model": 3})


def test_a_point_whose_workdir_is_locked_is_not_run(tmp_path):
    """A point whose workdir lock another trainer holds is skipped with a line naming the holder,
    its files untouched; `--list` shows it running."""
    from efficient_arch import train

    path = write_sweep(tmp_path, [{}])
    wd = tmp_path / "run"
    (point,) = S.load_sweep(path).points
    d = wd / point.name
    d.mkdir(parents=True)
    held = train._lock_workdir(str(d))
    try:
        lines = []
        rows = S.run_sweep(path, str(wd), log=lines.append)
        assert any(f"{point.name}: skipped, its workdir is in use by another trainer (pid {os.getpid()} on " in ln
                   for ln in lines), lines
        assert rows[0]["status"] == "pending" and sorted(os.listdir(d)) == ["train.lock"]
        assert S.point_status(str(d)).startswith(f"running (pid {os.getpid()} on ")
    finally:
        held.close()
    assert S.point_status(str(d)) == "to run"


def _env():
    env = dict(os.environ)
    cache = os.environ.get("EFFICIENT_ARCH_TEST_JAX_CACHE", str(REPO / ".cache" / "jax"))
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _wait_for(cond, proc, timeout=240.0):
    import time

    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"the sweep exited early ({proc.returncode}): {proc.stdout.read()}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.2)


def _trained(d: pathlib.Path, step: int) -> bool:
    try:
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return False
    return any(r.get("step", 0) >= step and "loss" in r for r in rows)


@pytest.mark.parametrize("parallel", [2, 1])
def test_sigterm_stops_the_sweep_and_its_points(tmp_path, parallel):
    """SIGTERM to `efficient-arch sweep` while its points train: with --parallel 2 it is forwarded
    to both point processes, which checkpoint and exit, and the sweep waits for them (none
    outlives it: an immediate rerun used to start a second trainer in the same workdir); in
    serial mode the in-process point checkpoints. Either way: a console line, the partial table,
    exit 143, points recorded `interrupted` with a committed checkpoint, `--list` says so."""
    import signal

    from efficient_arch.checkpoint import committed_steps

    path = write_sweep(tmp_path, [{"data.seed": 0}, {"data.seed": 1}][:parallel], name="long")
    wd = tmp_path / "run"
    # long enough never to finish before the signal: 5000 steps, checkpoints every 2
    text = pathlib.Path(path).read_text().replace("'train.steps': 4", "'train.steps': 5000")
    pathlib.Path(path).write_text(text)
    points = S.load_sweep(path).points
    assert [p.overrides["train.steps"] for p in points] == [5000] * parallel
    cmd = [sys.executable, "-m", "efficient_arch", "sweep", path, "--workdir", str(wd), "--parallel", str(parallel)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        dirs = [wd / p.name for p in points]
        _wait_for(lambda: all(_trained(d, 4) for d in dirs), proc)
        pids = [json.loads((d / "point.json").read_text()).get("pid") for d in dirs]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 143, out[-3000:] + err[-3000:]
    assert "stopped by SIGTERM" in out and "rerun the same command to resume" in out
    # the lines and the table (its title holds the results path, which rich may wrap: long tmp paths)
    assert out.count("interrupted in") == parallel and "results.csv" in "".join(out.split())
    for line in out.splitlines():
        assert line.count("] ") <= 1 or "│" in line, line  # no two point lines run together
    for d, pid in zip(dirs, pids):
        assert json.loads((d / "point.json").read_text())["status"] == "interrupted"
        assert committed_steps(d / "checkpoints"), d
        if parallel > 1:  # the point processes are gone
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    listed = subprocess.run(cmd[:-2] + ["--list"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert listed.stdout.count("[interrupted]") == parallel, listed.stdout
