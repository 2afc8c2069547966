"""Sweeps: many training runs that differ by config overrides, collected into one results table.

A sweep is a Python file (``experiments/sweeps/NAME.py``) defining::

    BASE = "experiments/configs/transformer.py:tiny"   # config FILE[:ARG] every point starts from
    OVERRIDES = {"data.source": "mqar", "train.steps": 40}          # optional: applied to every point
    POINTS = [{"config": "experiments/configs/based.py:tiny"}, {}]  # optional: a list of points
    GRID = {"model.d_model": [32, 64], "train.lr": [1e-3, 3e-3]}    # optional: a cartesian product

The points are ``OVERRIDES | p | g`` for every ``p`` in ``POINTS`` (default ``[{}]``) and every
combination ``g`` of ``GRID`` (in that order). Keys are dotted config fields
(``"model.d_model"``); the key ``"config"`` replaces ``BASE`` for that point. Relative config
paths are resolved against the working directory, then the repository root.

``run_sweep`` gives every point its own workdir ``<workdir>/<slug>-<hash>`` (the slug names the
swept values, the hash covers the base and all overrides, so a changed point gets a new
directory) holding the run's usual outputs plus ``point.json`` (status, error, wall time) and
``log.txt``. A point whose ``point.json`` says ``ok`` and whose ``summary.json`` reached
``train.steps`` is skipped; any other point is (re)run, and ``train.run_training`` resumes it from
its latest checkpoint. A failing point (bad override, invalid config, NaN loss, crash) is recorded
with its error and the sweep goes on. Points run one after another in this process, or, with
``parallel=N > 1``, ``N`` at a time as subprocesses (``python -m efficient_arch.sweep --run-point
DIR``). After every point ``<workdir>/results.jsonl`` and ``results.csv`` are rewritten: one row
per point (:data:`RESULT_COLUMNS` plus the swept fields).

Signals: SIGTERM / SIGINT to the sweep is forwarded to the running point processes (each in its
own session, so a terminal's Ctrl-C reaches them once, through the sweep), which write a
checkpoint and exit; the sweep starts no new point, waits for them and exits with 128 + N, so no
trainer outlives it. An in-process point handles the signal itself. A point whose workdir lock
(``train.lock``, held by its training process) is taken is skipped, so two trainers never share
a point's workdir.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINT_FILE = "point.json"
LOG_FILE = "log.txt"
# columns of results.csv / keys of results.jsonl rows, before the swept fields
RESULT_COLUMNS = ("name", "status", "steps", "final_train_loss", "final_val_loss", "val_accuracy",
                  "max_val_accuracy", "val_bpb", "tokens_per_s", "mfu", "hfu", "n_params", "step_time_s",
                  "wall_s", "error", "workdir", "config", "overrides")
SUMMARY_FIELDS = ("steps", "final_train_loss", "final_val_loss", "val_accuracy", "val_bpb", "tokens_per_s",
                  "mfu", "hfu", "n_params", "step_time_s")


class SweepError(ValueError):
    """The sweep file is malformed; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep.

    Attributes:
      name: directory name ``<slug>-<8 hex>`` (unique within the sweep).
      config: base config ``FILE[:ARG]`` as written in the sweep file.
      overrides: dotted field -> value (JSON-serializable), applied in order.
      swept: the keys whose values differ between the sweep's points (the table's columns).
    """

    name: str
    config: str
    overrides: dict
    swept: tuple = ()


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A loaded sweep file: ``name`` (file stem), ``path`` and its ``points`` in order."""

    name: str
    path: str
    points: tuple

    @property
    def swept(self) -> tuple:
        """The dotted fields (and ``"config"``) whose values differ between the points."""
        return self.points[0].swept if self.points else ()


# ----------------------------------------------------------------------------- loading


def _canon(v):
    """JSON-stable form of an override value (tuples -> lists)."""
    return json.loads(json.dumps(v))


def _slug(point: dict, swept: tuple) -> str:
    parts = []
    for k in swept:
        if k not in point:  # a key only other points set (POINTS entries with different keys)
            continue
        v = point[k]
        if k == "config":
            file, _, arg = str(v).partition(":")
            parts.append(os.path.splitext(os.path.basename(file))[0] + (f"_{arg}" if arg else ""))
            continue
        if isinstance(v, (list, tuple)):
            v = "+".join(map(str, v))
        parts.append(f"{k.split('.')[-1]}={v}")
    slug = re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(parts))
    return slug[:80] or "point"


def _hash(config: str, overrides: dict) -> str:
    blob = json.dumps({"config": config, "overrides": overrides}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _check_keys(d, where: str) -> dict:
    if not isinstance(d, dict):
        raise SweepError(f"{where} must be a dict of dotted config fields to values, got {type(d).__name__}")
    for k in d:
        if not isinstance(k, str) or not (k == "config" or re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", k)):
            raise SweepError(f"{where}: key {k!r} is not a dotted config field ('model.d_model') or 'config'")
    return d


def expand_points(base: str, overrides: dict | None = None, points: list | None = None,
                  grid: dict | None = None) -> list[Point]:
    """The sweep's points: ``overrides | p | g`` for ``p`` in ``points`` and ``g`` in the product of ``grid``.

    Raises:
      SweepError: malformed arguments (non-dict points, empty grid lists, bad keys) or two
        identical points.
    """
    if not isinstance(base, str) or not base:
        raise SweepError(f"BASE must be a config 'FILE[:ARG]' string, got {base!r}")
    overrides = _check_keys(dict(overrides or {}), "OVERRIDES")
    points = [{}] if points is None else list(points)
    if not points:
        raise SweepError("POINTS is empty; give at least one point (a dict, {} = the base config)")
    points = [_check_keys(p, f"POINTS[{i}]") for i, p in enumerate(points)]
    grid = _check_keys(dict(grid or {}), "GRID")
    for k, vs in grid.items():
        if not isinstance(vs, (list, tuple)) or not vs:
            raise SweepError(f"GRID[{k!r}] must be a non-empty list of values, got {vs!r}")
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]
    raw = [{**overrides, **p, **g} for p in points for g in combos]
    raw = [_canon(r) for r in raw]
    keys = list(dict.fromkeys(k for r in raw for k in r))
    swept = tuple(k for k in keys if len({json.dumps(r.get(k, base if k == "config" else None), sort_keys=True)
                                         for r in raw}) > 1)
    out, seen = [], {}
    for r in raw:
        config = r.pop("config", base)
        h = _hash(config, r)
        if h in seen:
            raise SweepError(f"points {seen[h]} and {len(out)} are identical ({config}, {r}); remove one")
        seen[h] = len(out)
        out.append(Point(name=f"{_slug({'config': config, **r}, swept)}-{h}", config=config, overrides=r,
                         swept=swept))
    return out


def load_sweep(path: str) -> Sweep:
    """Load a sweep file (module constants ``BASE``, ``OVERRIDES``, ``POINTS``, ``GRID``).

    Raises:
      SweepError: missing file or ``BASE``, malformed constants (see :func:`expand_points`), or
        the file itself raised while importing.
    """
    if not os.path.isfile(path):
        raise SweepError(f"sweep file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_efficient_arch_sweep_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise SweepError(f"sweep file {path!r} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "BASE"):
        raise SweepError(f"sweep file {path!r} defines no BASE (the config 'FILE[:ARG]' its points start from)")
    pts = expand_points(module.BASE, getattr(module, "OVERRIDES", None), getattr(module, "POINTS", None),
                        getattr(module, "GRID", None))
    return Sweep(name=os.path.splitext(os.path.basename(path))[0], path=path, points=tuple(pts))


def resolve_config_path(spec: str) -> tuple[str, str | None]:
    """``"FILE[:ARG]"`` -> (existing absolute FILE, ARG), trying the working directory, then the repo.

    Raises:
      FileNotFoundError: the file is in neither place.
    """
    file, _, arg = spec.partition(":")
    roots = list(dict.fromkeys(os.path.realpath(r) for r in (os.getcwd(), REPO_ROOT)))
    for root in roots:
        p = file if os.path.isabs(file) else os.path.join(root, file)
        if os.path.isfile(p):
            return os.path.abspath(p), (arg or None)
    where = file if os.path.isabs(file) else " and ".join(roots)
    raise FileNotFoundError(f"config file {file!r} not found (looked in {where})")


def build_config(config: str, overrides: dict):
    """The (unfinalized) ConfigDict of a point: ``get_config(ARG)`` of FILE, then the overrides.

    Lists become tuples (JSON has no tuples). Raises ``FileNotFoundError``, ``KeyError`` /
    ``AttributeError`` (unknown field) or ``TypeError`` (wrong type) naming the override.
    """
    from efficient_arch.config import load_config

    file, arg = resolve_config_path(config)
    cfg = load_config(file, arg)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        try:
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = tuple(value) if isinstance(value, list) else value
        except (KeyError, AttributeError) as e:
            raise KeyError(f"override {key}={value!r}: unknown config field {key!r}{_suggest_field(cfg, key)}"
                           + "; the fields and their defaults are in efficient_arch/config.py (default_config)") from e
        except (TypeError, ValueError) as e:
            raise TypeError(f"override {key}={value!r}: {e}") from e
    return cfg


def _suggest_field(cfg, key: str) -> str:
    """`` (did you mean 'model.n_layers'?)`` for an unknown dotted field, as the CLI says it."""
    from efficient_arch.cli import did_you_mean

    node, prefix = cfg, []
    for part in key.split("."):
        if not hasattr(node, "keys"):
            return ""
        if part in node:
            node, prefix = node[part], prefix + [part]
            continue
        return did_you_mean(".".join(prefix + [part]), [".".join(prefix + [k]) for k in node.keys()])
    return ""


# ----------------------------------------------------------------------------- one point


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _target_steps(record: dict) -> int | None:
    try:
        return int(build_config(record["config"], record["overrides"]).train.steps)
    except Exception:  # an invalid point: never "finished"
        return None


def is_finished(point_dir: str) -> bool:
    """True when ``point.json`` says ``ok`` and ``summary.json`` reached the point's ``train.steps``."""
    rec = _read_json(os.path.join(point_dir, POINT_FILE))
    summary = _read_json(os.path.join(point_dir, "summary.json"))
    if not rec or rec.get("status") != "ok" or not summary:
        return False
    target = _target_steps(rec)
    return target is not None and int(summary.get("steps", -1)) >= target


def _prepare(point: Point, point_dir: str) -> dict:
    os.makedirs(point_dir, exist_ok=True)
    rec = _read_json(os.path.join(point_dir, POINT_FILE)) or {}
    rec.update(name=point.name, config=point.config, overrides=point.overrides, swept=list(point.swept))
    rec.setdefault("status", "pending")
    rec.setdefault("attempts", 0)
    rec.setdefault("wall_s", 0.0)
    _write_json(os.path.join(point_dir, POINT_FILE), rec)
    return rec


def run_point(point_dir: str) -> dict:
    """Train the point described by ``point_dir/point.json`` in ``point_dir`` (resuming), in this process.

    Updates ``point.json``: ``status`` ``running`` -> ``ok`` | ``failed`` (with ``error`` and
    ``traceback``) | ``interrupted``; ``attempts``; ``wall_s`` (seconds, summed over attempts).

    Returns:
      The updated record.

    Raises:
      SystemExit / KeyboardInterrupt: after recording ``interrupted`` (a signal stopped training;
        its checkpoint is written, the next sweep resumes it).
    """
    from efficient_arch.train import run_training

    path = os.path.join(point_dir, POINT_FILE)
    rec = _read_json(path)
    if rec is None:
        raise FileNotFoundError(f"{path} is missing or unreadable")
    rec.update(status="running", attempts=int(rec.get("attempts", 0)) + 1, pid=os.getpid(),
               started=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None, traceback=None)
    _write_json(path, rec)
    t0 = time.perf_counter()
    try:
        cfg = build_config(rec["config"], rec["overrides"])
        run_training(cfg, point_dir, progress=False)
        rec["status"] = "ok"
    except (SystemExit, KeyboardInterrupt) as e:
        rec["status"] = "interrupted"
        rec["error"] = f"{type(e).__name__}: {e}"
        raise
    except Exception as e:  # the failure is the point's result, not the sweep's
        rec["status"] = "failed"
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()
    finally:
        rec["wall_s"] = float(rec.get("wall_s") or 0.0) + time.perf_counter() - t0
        rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        rec.pop("pid", None)
        _write_json(path, rec)
    return rec


def _run_in_process(point_dir: str) -> dict:
    with open(os.path.join(point_dir, LOG_FILE), "a") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return run_point(point_dir)


def _run_subprocess(point_dir: str, env: dict | None = None, signals: "_Signals | None" = None) -> tuple[dict, int]:
    """Run one point as ``python -m efficient_arch.sweep --run-point DIR`` and wait for it.

    The child gets its own session (process group): a terminal's Ctrl-C reaches only the sweep,
    which forwards it once (``signals``), so the child checkpoints instead of seeing it twice.
    """
    cmd = [sys.executable, "-m", "efficient_arch.sweep", "--run-point", point_dir]
    with open(os.path.join(point_dir, LOG_FILE), "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if signals is not None:
            signals.started(proc)
        try:
            rc = proc.wait()
        finally:
            if signals is not None:
                signals.ended(proc)
    path = os.path.join(point_dir, POINT_FILE)
    rec = _read_json(path) or {}
    if rec.get("status") in ("running", "pending", None):  # the child died before recording
        with open(os.path.join(point_dir, LOG_FILE), errors="replace") as f:
            tail = f.read()[-2000:]
        rec.update(status="failed", error=f"the point's process exited with status {rc} without "
                   f"recording a result; last output:\n{tail}")
        rec.pop("pid", None)
        _write_json(path, rec)
    return rec, rc


class _Signals:
    """The sweep's SIGTERM / SIGINT handler (installed from the main thread only).

    Parallel points: each signal is forwarded to every running point process (they write a
    checkpoint and exit; a second signal, forwarded too, kills them at once); the sweep starts no
    new point and exits with 128 + N once they are gone, so no trainer outlives it. In-process
    points install their own handler while they train; outside training (``raise_now``) the
    sweep stops at once.
    """

    def __init__(self, raise_now: bool):
        self.signum = None
        self.raise_now = raise_now
        self.children: set = set()
        self._lock = threading.Lock()
        self._old: dict = {}

    def install(self) -> None:
        import signal

        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        import signal

        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __call__(self, signum, frame):
        import signal

        first = self.signum is None
        if first:
            self.signum = signum
        kids = list(self.children)  # no lock in a handler: the main thread may hold it
        for proc in kids:
            try:
                proc.send_signal(signum)
            except (ProcessLookupError, OSError):
                pass
        name = signal.Signals(signum).name
        if kids:
            msg = (f"\nsweep: {name} forwarded to the {len(kids)} running point(s), which write a checkpoint "
                   "and exit; no new point starts" + ("; send it again to kill them at once" if first else "") + "\n")
        else:
            msg = f"\nsweep: {name}: stopping\n"
        try:
            os.write(2, msg.encode())
        except OSError:
            pass
        if self.raise_now and not kids:
            raise SystemExit(128 + signum)

    def started(self, proc) -> None:
        with self._lock:
            self.children.add(proc)
            late = self.signum
        if late is not None:  # the signal came while this child was starting
            try:
                proc.send_signal(late)
            except (ProcessLookupError, OSError):
                pass

    def ended(self, proc) -> None:
        with self._lock:
            self.children.discard(proc)


def point_status(point_dir: str) -> str:
    """``finished``, ``running (pid N on HOST since ...)`` (a trainer holds the workdir lock),
    ``failed``, ``interrupted`` or ``to run``: what ``sweep --list`` shows."""
    if is_finished(point_dir):
        return "finished"
    from efficient_arch.train import workdir_holder

    holder = workdir_holder(point_dir)
    if holder:
        return f"running ({holder})"
    rec = _read_json(os.path.join(point_dir, POINT_FILE)) or {}
    return rec.get("status") if rec.get("status") in ("failed", "interrupted") else "to run"


def _adopt_renamed(workdir: str, point: Point, log) -> None:
    """A point directory named by an older naming rule (same hash suffix) is renamed to the
    point's current name, so its runs are reused (the hash covers the config and overrides)."""
    d = os.path.join(workdir, point.name)
    if os.path.exists(d) or not os.path.isdir(workdir):
        return
    suffix = "-" + point.name.rsplit("-", 1)[-1]
    old = [n for n in os.listdir(workdir) if n.endswith(suffix) and os.path.isdir(os.path.join(workdir, n))]
    if len(old) == 1:
        os.rename(os.path.join(workdir, old[0]), d)
        log(f"{old[0]}: renamed to {point.name} (the point's name now leaves out fields it does not set)")


# ----------------------------------------------------------------------------- results


def _max_val_accuracy(point_dir: str):
    best = None
    try:
        with open(os.path.join(point_dir, "metrics.jsonl")) as f:
            for line in f:
                v = json.loads(line).get("val_accuracy") if line.strip() else None
                if v is not None and (best is None or v > best):
                    best = v
    except (OSError, ValueError):
        return None
    return best


def result_row(sweep: Sweep, point: Point, workdir: str) -> dict:
    """One results row of ``point``: :data:`RESULT_COLUMNS` then the swept fields' values."""
    d = os.path.join(workdir, point.name)
    rec = _read_json(os.path.join(d, POINT_FILE)) or {}
    status = rec.get("status", "pending")
    row = {"name": point.name, "status": status}
    summary = _read_json(os.path.join(d, "summary.json")) if status == "ok" else None
    for k in SUMMARY_FIELDS:
        row[k] = summary.get(k) if summary else None
    row["max_val_accuracy"] = _max_val_accuracy(d) if summary else None
    row.update(wall_s=rec.get("wall_s"), error=rec.get("error") if status != "ok" else None, workdir=d,
               config=point.config, overrides=point.overrides)
    out = {k: row.get(k) for k in RESULT_COLUMNS}
    for k in point.swept:
        out[k] = point.config if k == "config" else point.overrides.get(k)
    return out


def write_results(sweep: Sweep, workdir: str) -> list[dict]:
    """Rewrite ``workdir/results.jsonl`` and ``results.csv`` from the points' directories.

    Returns:
      The rows, in the sweep's point order (CSV: lists/dicts as JSON, None as empty).
    """
    rows = [result_row(sweep, p, workdir) for p in sweep.points]
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, f".results.{os.getpid()}")
    with open(tmp + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp + ".jsonl", os.path.join(workdir, "results.jsonl"))
    columns = list(RESULT_COLUMNS) + [k for k in sweep.swept if k not in RESULT_COLUMNS]

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, (dict, list, tuple)):
            return json.dumps(v, sort_keys=True)
        if isinstance(v, float) and not math.isfinite(v):
            return ""
        return v

    with open(tmp + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: cell(r.get(k)) for k in columns})
    os.replace(tmp + ".csv", os.path.join(workdir, "results.csv"))
    return rows


def read_results(workdir: str) -> list[dict]:
    """The rows of ``workdir/results.jsonl`` (what :func:`write_results` wrote)."""
    with open(os.path.join(workdir, "results.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- the sweep


def run_sweep(sweep: Sweep | str, workdir: str, *, parallel: int = 1, log=print) -> list[dict]:
    """Run every unfinished point of ``sweep`` (a :class:`Sweep` or a sweep file path) under ``workdir``.

    Args:
      sweep: the sweep or the path of its file.
      workdir: the sweep directory (created); point ``p`` trains in ``workdir/p.name``.
      parallel: 1 = one point after another in this process; N > 1 = N subprocesses at a time.
      log: called with one line per point event (start, skip, result).

    Returns:
      The results rows (also written to ``results.jsonl`` / ``results.csv``).

    Raises:
      SweepError: malformed sweep file, ``parallel < 1``.
      SystemExit / KeyboardInterrupt: a signal interrupted a point (recorded as ``interrupted``;
        the results are written first; rerunning the sweep resumes).
    """
    if isinstance(sweep, str):
        sweep = load_sweep(sweep)
    if not isinstance(parallel, int) or parallel < 1:
        raise SweepError(f"parallel={parallel!r}: must be a positive number of concurrent points")
    from efficient_arch.train import workdir_holder

    os.makedirs(workdir, exist_ok=True)
    log_lock = threading.RLock()  # one line at a time: points finish in worker threads

    def say(msg: str) -> None:
        with log_lock:
            log(msg)

    n = len(sweep.points)
    todo = []
    for i, p in enumerate(sweep.points):
        _adopt_renamed(workdir, p, say)
        d = os.path.join(workdir, p.name)
        holder = workdir_holder(d)
        if holder:  # never a second trainer in a point's workdir
            say(f"[{i + 1}/{n}] {p.name}: skipped, its workdir is in use by another trainer ({holder}); "
                "rerun the sweep once it has finished")
            continue
        _prepare(p, d)
        if is_finished(d):
            say(f"[{i + 1}/{n}] {p.name}: finished, skipped")
        else:
            todo.append((i, p, d))
    write_results(sweep, workdir)

    def report(i, p, rec, dt):
        with log_lock:
            msg = f"[{i + 1}/{n}] {p.name}: {rec.get('status')} in {dt:.1f} s"
            if rec.get("status") == "interrupted":
                msg += " (its checkpoint is written; rerun the sweep to resume it)"
            elif rec.get("status") != "ok" and rec.get("error"):
                msg += f" ({rec['error'].splitlines()[0][:300]})"
            log(msg)
            write_results(sweep, workdir)

    signals = _Signals(raise_now=parallel == 1)
    signals.install()
    try:
        if parallel == 1:
            for i, p, d in todo:
                say(f"[{i + 1}/{n}] {p.name}: running")
                t0 = time.perf_counter()
                try:
                    rec = _run_in_process(d)
                except (SystemExit, KeyboardInterrupt):
                    report(i, p, _read_json(os.path.join(d, POINT_FILE)) or {"status": "interrupted"},
                           time.perf_counter() - t0)
                    raise
                report(i, p, rec, time.perf_counter() - t0)
        else:
            _run_parallel(todo, parallel, report, say, n, signals)
    finally:
        signals.restore()
        rows = write_results(sweep, workdir)
    return rows


def _run_parallel(todo, parallel: int, report, log, n: int, signals: _Signals) -> None:
    from concurrent.futures import ThreadPoolExecutor

    interrupted: list[int] = []

    def one(item):
        i, p, d = item
        if signals.signum is not None or interrupted:
            return
        log(f"[{i + 1}/{n}] {p.name}: running (subprocess)")
        t0 = time.perf_counter()
        rec, rc = _run_subprocess(d, signals=signals)
        if rec.get("status") == "interrupted":
            interrupted.append(rc)
        report(i, p, rec, time.perf_counter() - t0)

    with ThreadPoolExecutor(max_workers=parallel) as ex:
        list(ex.map(one, todo))
    if signals.signum is not None:
        raise SystemExit(128 + signals.signum)
    if interrupted:
        raise SystemExit(interrupted[0] or 130)


def _point_main(argv: list[str]) -> int:
    """``python -m efficient_arch.sweep --run-point DIR``: run one point (the parallel sweep's child)."""
    if len(argv) != 2 or argv[0] != "--run-point":
        print("usage: python -m efficient_arch.sweep --run-point POINT_DIR", file=sys.stderr)
        return 2
    rec = run_point(argv[1])
    return 0 if rec["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(_point_main(sys.argv[1:]))
