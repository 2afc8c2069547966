"""Reproduced tables: ``efficient-arch table NAME [--quick]`` runs (or reuses) the sweep behind a
table and writes ``results/NAME.md``, ``results/NAME.csv`` and ``results/NAME.png``.

A table is a Python file ``experiments/tables/NAME.py`` defining::

    TITLE = "MQAR accuracy vs model width"          # the Markdown heading
    SIZES = ("quick", "full")                       # optional; the first is --quick, "full" the default

    def sweep(size):          # optional: the training runs behind the table, or None
        return {"base": "experiments/configs/transformer.py:tiny", "overrides": {...},
                "points": [...], "grid": {...}}     # as a sweep file (efficient_arch/sweep.py)

    def rows(ctx):            # required: the table's rows (dicts; the first row's keys are the columns)
        ...                   # ctx.results: one sweep results row per point (sweep.RESULT_COLUMNS ...)

    def plot(rows, fig, ctx): # optional: draw on a matplotlib Figure (saved as NAME.png)
        ...

    def notes(rows, ctx):     # optional: Markdown after the table (published numbers, verdict)
        ...

:func:`run_table` expands ``sweep(size)`` into points with :func:`efficient_arch.sweep.expand_points`
and runs them with :func:`efficient_arch.sweep.run_sweep` in the table's workdir (default
``runs/tables/NAME`` or ``runs/tables/NAME-SIZE``), so finished points are skipped on a rerun and
interrupted ones resume; then it calls ``rows``, ``plot`` and ``notes`` and writes the three
files. Work a table does beyond training (the induction table's evaluation at longer lengths)
is cached by the table itself in the point directories (:meth:`Context.cached`).

Unless JAX already has one, a persistent compilation cache under
``~/.cache/efficient_arch/jax`` (``EFFICIENT_ARCH_JAX_CACHE`` overrides; ``0`` disables) is
enabled, so a rerun does not recompile the points' programs.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
import time
from typing import Any, Callable

from efficient_arch import sweep as sweep_lib

REPO_ROOT = sweep_lib.REPO_ROOT
TABLES_DIR = os.path.join(REPO_ROOT, "experiments", "tables")
DEFAULT_SIZES = ("quick", "full")


class TableError(ValueError):
    """Unknown table, malformed table file or unknown size; the message names the problem."""


@dataclasses.dataclass
class Context:
    """What a table's ``rows`` / ``plot`` / ``notes`` get.

    Attributes:
      name: the table name (``mqar``).
      size: ``"quick"``, ``"full"`` or another of the table's ``SIZES``.
      workdir: the table's sweep directory (points train in ``workdir/<point name>``).
      sweep: the :class:`efficient_arch.sweep.Sweep` run (None for tables without training).
      results: one row per point (:func:`efficient_arch.sweep.result_row`, in point order).
      log: callable taking one line of progress text.
    """

    name: str
    size: str
    workdir: str
    sweep: Any = None
    results: list = dataclasses.field(default_factory=list)
    log: Callable[[str], None] = print

    def summary(self, result: dict) -> dict:
        """The point's ``summary.json`` (``{}`` if it has none: a failed or pending point)."""
        return _read_json(os.path.join(result["workdir"], "summary.json")) or {}

    def metrics(self, result: dict) -> list[dict]:
        """The point's ``metrics.jsonl`` rows (``[]`` if missing)."""
        path = os.path.join(result["workdir"], "metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def last_metric(self, result: dict, key: str):
        """The last logged value of ``key`` in the point's ``metrics.jsonl`` (None if never logged)."""
        vals = [m[key] for m in self.metrics(result) if m.get(key) is not None]
        return vals[-1] if vals else None

    def config(self, result: dict):
        """The point's (unfinalized) config: base config file plus its overrides."""
        return sweep_lib.build_config(result["config"], result["overrides"])

    def cached(self, result: dict, key: str, compute: Callable[[], Any]):
        """``compute()`` once per point and ``key``: stored in ``<point>/table_cache.json``.

        Only for finished (``ok``) points; the value must be JSON-serializable. The cache is
        dropped whenever the point's ``summary.json`` changes (a retrained point).
        """
        path = os.path.join(result["workdir"], "table_cache.json")
        stamp = _mtime(os.path.join(result["workdir"], "summary.json"))
        cache = _read_json(path) or {}
        if cache.get("_summary_mtime") != stamp:
            cache = {"_summary_mtime": stamp}
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = compute()
            cache.setdefault("_seconds", {})[key] = time.perf_counter() - t0
            _write_json(path, cache)
        return cache[key]

    def cached_seconds(self) -> float:
        """Seconds spent computing the cached values of every point (what a first run paid)."""
        total = 0.0
        for r in self.results:
            cache = _read_json(os.path.join(r["workdir"], "table_cache.json")) or {}
            total += sum(cache.get("_seconds", {}).values())
        return total


def evaluate_point(result: dict, overrides: dict, *, n_batches: int | None = None) -> dict:
    """Evaluate a finished point's final parameters under its config with ``overrides`` applied.

    E.g. ``{"model.seq_len": 1024, "model.max_seq_len": 1024, "train.batch_size": 8}`` scores a
    model trained at a shorter length on validation examples of length 1024 (the parameters'
    shapes must not change: RoPE and the recurrent mixers have no length-shaped parameters).
    The point's latest checkpoint is restored into the train state of the modified config.

    Args:
      result: a sweep results row (``workdir``, ``config``, ``overrides``) of an ``ok`` point.
      overrides: dotted config fields applied on top of the point's own overrides.
      n_batches: validation batches (default the config's ``train.eval_batches``).

    Returns:
      :func:`efficient_arch.train.evaluate`'s dict: ``val_loss``, ``val_bpb``, ``val_accuracy``.
    """
    import jax

    from efficient_arch import parallel, train
    from efficient_arch.checkpoint import Checkpointer
    from efficient_arch.config import finalize
    from efficient_arch.data import load_source, make_eval_batches

    cfg = sweep_lib.build_config(result["config"], {**result["overrides"], **overrides})
    cfg = finalize(cfg, jax.device_count())
    source = load_source(cfg)
    batches = make_eval_batches(cfg, source, n_batches or cfg.train.eval_batches, process_index=0,
                                process_count=1)
    mesh = parallel.make_mesh(cfg)
    run = train.build(cfg, mesh)
    with jax.set_mesh(mesh):
        ckpt = Checkpointer(result["workdir"], keep=max(int(cfg.train.keep_ckpts), 1),
                            save_every=max(int(cfg.train.ckpt_every), 1), async_save=False)
        try:
            state, _, _ = ckpt.restore(None, run.abstract_state)
        finally:
            ckpt.close()
        return train.evaluate(run, state["params"], batches)


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _mtime(path: str):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- loading


def available() -> list[str]:
    """Names of the table files in ``experiments/tables`` (those defining ``rows``)."""
    out = []
    for fn in sorted(os.listdir(TABLES_DIR)):
        if fn.endswith(".py") and not fn.startswith("_"):
            with open(os.path.join(TABLES_DIR, fn)) as f:
                if "\ndef rows(" in f.read():
                    out.append(fn[:-3])
    return out


def load_table(name: str):
    """Import ``experiments/tables/NAME.py`` (a table module).

    Raises:
      TableError: no such file, or it defines no ``rows(ctx)``.
    """
    path = os.path.join(TABLES_DIR, f"{name}.py")
    if not name.replace("_", "").isalnum() or not os.path.isfile(path):
        raise TableError(f"unknown table {name!r}; tables: {', '.join(available())}")
    spec = importlib.util.spec_from_file_location(f"_efficient_arch_table_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "rows", None)):
        raise TableError(f"experiments/tables/{name}.py defines no rows(ctx): not a table module "
                         f"(tables: {', '.join(available())})")
    return mod


def sizes(mod) -> tuple:
    """The sizes a table module knows (``SIZES``, default ``("quick", "full")``)."""
    return tuple(getattr(mod, "SIZES", DEFAULT_SIZES))


def table_sweep(name: str, mod, size: str):
    """The :class:`efficient_arch.sweep.Sweep` behind table ``name`` at ``size`` (None: no training)."""
    fn = getattr(mod, "sweep", None)
    spec = fn(size) if callable(fn) else None
    if spec is None:
        return None
    unknown = set(spec) - {"base", "overrides", "points", "grid"}
    if unknown:
        raise TableError(f"experiments/tables/{name}.py: sweep({size!r}) returned unknown keys {sorted(unknown)}")
    pts = sweep_lib.expand_points(spec["base"], spec.get("overrides"), spec.get("points"), spec.get("grid"))
    return sweep_lib.Sweep(name=f"{name}-{size}", path=os.path.join(TABLES_DIR, f"{name}.py"), points=tuple(pts))


def default_workdir(name: str, size: str) -> str:
    """``runs/tables/NAME`` for the full size, ``runs/tables/NAME-SIZE`` otherwise."""
    return os.path.join("runs", "tables", name if size == "full" else f"{name}-{size}")


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache unless one is set; returns its directory (or None)."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = os.environ.get("EFFICIENT_ARCH_JAX_CACHE", os.path.expanduser("~/.cache/efficient_arch/jax"))
    if path in ("", "0"):
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


# ----------------------------------------------------------------------------- writing


def _cell(v, md: bool = False):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-" if md else ""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    if md and isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e5 or a < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}"
    return v


def write_csv(rows: list[dict], path: str) -> None:
    """Write ``rows`` (dicts, columns = union of keys in first-seen order) to ``path``; None -> empty."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in cols})


def markdown_table(rows: list[dict]) -> str:
    """``rows`` as a GitHub Markdown table (floats to 4 significant digits, None as ``-``)."""
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(_cell(r.get(c), md=True)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _write_png(mod, rows: list[dict], ctx: Context, path: str) -> str | None:
    fn = getattr(mod, "plot", None)
    if not callable(fn):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(7.5, 4.5), dpi=110)
    try:
        fn(rows, fig, ctx)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------- running


def run_table(name: str, *, size: str = "full", workdir: str | None = None, out_dir: str = "results",
              parallel: int = 1, log: Callable[[str], None] = print) -> dict:
    """Run (or reuse) the sweep behind table ``name`` and write ``out_dir/NAME.{md,csv,png}``.

    Args:
      name: a table file ``experiments/tables/NAME.py``.
      size: one of the table's ``SIZES`` (``"quick"``: CI-sized).
      workdir: the sweep directory (default :func:`default_workdir`).
      out_dir: where the three files go (created).
      parallel: points at a time (see :func:`efficient_arch.sweep.run_sweep`).
      log: progress lines.

    Returns:
      ``{"rows", "results", "md", "csv", "png", "wall_s", "failed"}``: the table rows, the
      sweep's results rows, the written paths (``png`` None when the table has no plot), the
      wall time and the names of failed points.

    Raises:
      TableError: unknown table or size, malformed table file.
    """
    mod = load_table(name)
    if size not in sizes(mod):
        raise TableError(f"table {name!r} has no size {size!r}; sizes: {', '.join(sizes(mod))}")
    t0 = time.perf_counter()
    load0 = _load()
    workdir = workdir or default_workdir(name, size)
    ctx = Context(name=name, size=size, workdir=workdir, log=log)
    ctx.sweep = table_sweep(name, mod, size)
    if ctx.sweep is not None:
        enable_compilation_cache()
        log(f"table {name} ({size}): {len(ctx.sweep.points)} points in {workdir}")
        todo = [p.name for p in ctx.sweep.points if not sweep_lib.is_finished(os.path.join(workdir, p.name))]
        ctx.results = sweep_lib.run_sweep(ctx.sweep, workdir, parallel=parallel, log=log)
        if todo:  # remember the machine's load while these points trained (the md header reports it)
            runs_path = os.path.join(workdir, "table_runs.json")
            past = _read_json(runs_path) or []
            past.append({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "points_run": len(todo),
                         "wall_s": time.perf_counter() - t0, "load_start": load0, "load_end": _load(),
                         "cpus": os.cpu_count()})
            _write_json(runs_path, past)
    rows = mod.rows(ctx)
    os.makedirs(out_dir, exist_ok=True)
    md_path, csv_path = os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.csv")
    png_path = _write_png(mod, rows, ctx, os.path.join(out_dir, f"{name}.png"))
    write_csv(rows, csv_path)
    wall = time.perf_counter() - t0
    failed = [r["name"] for r in ctx.results if r.get("status") != "ok"]
    train_s = sum(float(r.get("wall_s") or 0.0) for r in ctx.results)
    eval_s = ctx.cached_seconds()
    notes = getattr(mod, "notes", None)
    doc = (mod.__doc__ or "").strip().splitlines()
    head = [f"# {getattr(mod, 'TITLE', doc[0] if doc else name)}", "",
            f"Size `{size}`: `efficient-arch table {name}{' --quick' if size == 'quick' else ''}"
            f"{'' if size in ('quick', 'full') else ' --size ' + size}`"
            + (f", {len(ctx.results)} training runs in `{workdir}` ({train_s:.0f} s of training, "
               "summed over the points" + (f", and {eval_s:.0f} s of the table's own evaluations"
                                          if eval_s else "") + ")" if ctx.sweep is not None else "")
            + f"; this invocation: {wall:.0f} s"
            + (" (it reuses finished points and cached evaluations)." if ctx.sweep is not None else ".")]
    loads = [v for run in (_read_json(os.path.join(workdir, "table_runs.json")) or [])
             for v in (run.get("load_start"), run.get("load_end")) if v is not None]
    if loads:
        head[-1] += (f" While the points trained, the 1-minute load average was {min(loads):.1f}-{max(loads):.1f} "
                     f"on {os.cpu_count()} CPUs (start and end of each training invocation): tokens/s and "
                     "MFU are those of a machine with that much other work.")
    if failed:
        head += ["", f"**{len(failed)} point(s) failed**: " + ", ".join(f"`{n}`" for n in failed)
                 + " (errors in the CSV and the points' `point.json`)."]
    body = "\n".join(head) + "\n\n" + markdown_table(rows)
    if png_path:
        body += f"\n![{name}]({os.path.basename(png_path)})\n"
    if callable(notes):
        body += "\n" + notes(rows, ctx).strip() + "\n"
    with open(md_path, "w") as f:
        f.write(body)
    return {"rows": rows, "results": ctx.results, "md": md_path, "csv": csv_path, "png": png_path,
            "wall_s": wall, "failed": failed}
