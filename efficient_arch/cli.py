"""Command line: ``efficient-arch train|flops|roofline|sweep|table|generate`` (also ``python -m efficient_arch``).

    efficient-arch train --config=experiments/configs/transformer.py:small \\
        --config.model.n_layers=4 --workdir=runs/x
    efficient-arch flops --config=experiments/configs/transformer.py:small [--json=out.json]
    efficient-arch roofline --config=experiments/configs/transformer.py:base --chip=h100 \\
        --batch=1 --context=32768 [--arch=all] [--json=out.json]
    efficient-arch sweep experiments/sweeps/mqar_tiny.py --workdir runs/mqar_tiny [--parallel 2]
    efficient-arch table mqar [--quick] [--workdir runs/tables/mqar] [--out results]
    efficient-arch generate --workdir=runs/x --prompt="def " --max_new_tokens=100 [--temperature=0.8]

Config overrides use ml_collections' ``config_flags`` syntax (``--config.section.field=value``,
typed, including None-able fields). Config errors are printed as one line naming the field and
the fix, with exit status 2, before anything compiles.
"""

from __future__ import annotations

import json
import os
import re
import sys

USAGE = """usage: efficient-arch COMMAND [flags]

commands:
  train   train a model: --config=FILE[:SIZE] [--config.a.b=v ...] --workdir=DIR [--noprogress]
          [--overwrite]  (resumes DIR's latest checkpoint; a DIR holding a different experiment is
          refused unless --overwrite, which moves it aside to DIR.old-<timestamp>)
  flops   compile the train step without training and print analytic vs XLA FLOPs:
          --config=FILE[:SIZE] [--config.a.b=v ...] [--json=PATH]
  roofline  FLOPs, bytes, arithmetic intensity and utilization ceiling of the train step and
          of one decode step on a chip: --config=FILE[:SIZE] [--config.a.b=v ...] --chip=h100
          --batch=B --context=T [--arch=all [--size=base]] [--hbm_bandwidth=BYTES_PER_S]
          [--weight_dtype=DTYPE] [--notrain] [--json=PATH]
          (--arch=all: one row per experiments/configs file at --size, or at the SIZE of
          --config=FILE:SIZE when --size is not given)
  sweep   run every point of a sweep file (efficient_arch/sweep.py), skipping finished ones:
          experiments/sweeps/NAME.py [--workdir=runs/NAME] [--parallel=N] [--list]
          (results in WORKDIR/results.csv and results.jsonl)
  table   run or reuse the sweep behind a reproduced table and write results/NAME.md, .csv, .png:
          NAME [--quick | --size=SIZE] [--workdir=runs/tables/NAME] [--out=results] [--parallel=N]
          (NAME: mqar, induction, mfu_by_arch, moe_ablation, public_mfu; --list shows them)
  generate  continue a text prompt with a trained run's latest checkpoint (prefill + cached
          decoding) and print prefill/decode tokens/s, bytes per decoded token and bandwidth use:
          --workdir=DIR --prompt=TEXT [--max_new_tokens=64] [--temperature=1.0] [--top_k=0]
          [--top_p=1.0] [--seed=0] [--step=N] [--hbm_bandwidth=BYTES_PER_S] [--json=PATH]
          (--temperature=0: greedy; --top_k=0 / --top_p=1: no filter)

default config: experiments/configs/transformer.py:small
"""

DEFAULT_CONFIG = "experiments/configs/transformer.py:small"
# the repo checkout this package lives in (editable install): the default config resolves there
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _default_config() -> str | None:
    for root in (os.getcwd(), REPO_ROOT):
        path = os.path.join(root, DEFAULT_CONFIG.split(":")[0])
        if os.path.exists(path):
            return path + ":" + DEFAULT_CONFIG.split(":")[1]
    return None


def _config_fields(node=None, prefix="") -> list[str]:
    from efficient_arch.config import default_config

    node = default_config() if node is None else node
    out = []
    for k, v in node.items():
        if hasattr(v, "items"):
            out += _config_fields(v, f"{prefix}{k}.")
        else:
            out.append(f"  --config.{prefix}{k}={v!r}")
    return out


def did_you_mean(name: str, choices) -> str:
    """``" (did you mean 'X'?)"`` naming the closest of ``choices`` to the unknown ``name``, or ''.

    The suggestion of the CLI's unknown-field message, also used by sweep overrides.
    """
    import difflib

    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_names(node=None) -> list[str]:
    from efficient_arch.config import default_config

    node = default_config() if node is None else node
    out = []
    for k, v in node.items():
        out += _field_names(v) if hasattr(v, "items") else []
        out.append(k)
    return out


def _die(msg: str):
    """Print a usage/config error to stderr and exit with status 2."""
    print(msg, file=sys.stderr)
    raise SystemExit(2)


def parse_args(cmd: str, argv: list[str]):
    """Parse ``argv`` (after the command name) into absl FlagValues with ``.config`` set.

    Raises:
      SystemExit(2): unknown flags or config fields, unparsable values, missing --config (the
        message goes to stderr).
    """
    from absl import flags
    from ml_collections import config_flags

    if any(a in ("-h", "--help", "--helpfull") for a in argv):
        print(USAGE + "\nconfig fields (defaults of efficient_arch/config.py):\n" + "\n".join(_config_fields()))
        raise SystemExit(0)
    for a in argv:  # a missing config file: say so in one line (config_flags nests the OSError)
        if a.startswith("--config=") and not os.path.exists(a[len("--config="):].split(":")[0]):
            _die(f"efficient-arch {cmd}: config file {a[len('--config='):].split(':')[0]!r} not found "
                 f"(relative paths start at {os.getcwd()}); e.g. --config={DEFAULT_CONFIG}")
    fv = flags.FlagValues()
    default = _default_config()
    # config_flags must know the override flags when defining: hand it this argv, not sys.argv
    none_fields = [a[len("--config."):-len("=None")] for a in argv
                   if a.startswith("--config.") and a.endswith("=None")]
    argv = [f"efficient-arch {cmd}"] + [a for a in argv if not (a.startswith("--config.") and a.endswith("=None"))]
    if cmd == "train":
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, summary)", flag_values=fv)
        flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
        flags.DEFINE_bool("overwrite", False, "move an existing --workdir aside to "
                          "<workdir>.old-<timestamp> (never deleted) and start fresh", flag_values=fv)
    if cmd == "flops":
        flags.DEFINE_string("json", None, "write the table as JSON to this path", flag_values=fv)
    if cmd == "roofline":
        flags.DEFINE_string("json", None, "write the result as JSON to this path", flag_values=fv)
        flags.DEFINE_string("chip", None, "chip: h100, h100-pcie, h200, h800, b200, a100-40gb, "
                            "a100-80gb, v4, v5e, v5p, v6e, ... (default: the local accelerator)", flag_values=fv)
        flags.DEFINE_integer("batch", 1, "sequences per step", flag_values=fv)
        flags.DEFINE_integer("context", None, "train sequence length and decode cache length "
                             "(default: the config's seq_len)", flag_values=fv)
        flags.DEFINE_string("arch", None, "'all': one row per experiments/configs file", flag_values=fv)
        flags.DEFINE_string("size", "base", "config size for --arch=all (default: the SIZE of "
                            "--config=FILE:SIZE if given, else base)", flag_values=fv)
        flags.DEFINE_float("hbm_bandwidth", None, "HBM bytes/s per device (overrides the table)", flag_values=fv)
        flags.DEFINE_string("weight_dtype", None, "dtype decode reads weights in (default: model.dtype)",
                            flag_values=fv)
        flags.DEFINE_bool("train", True, "also the train-step roofline (--notrain: decode only)", flag_values=fv)
    try:  # with the default --config, overrides are applied (and may fail) already when defining
        config_flags.DEFINE_config_file("config", default, "config file[:arg]", flag_values=fv,
                                        lock_config=True, sys_argv=argv)
        fv(argv)  # "--config.x=None" overrides are applied below: config_flags can't parse them
        if fv["config"].present or default:
            fv.config.to_dict()  # config_flags loads lazily: surface a missing config file here
    except flags.Error as e:
        msg = str(e)
        if "Traceback" in msg:  # config_flags embeds the config file's traceback: keep its last error
            errors = [ln.strip() for ln in msg.splitlines() if re.match(r"^\w+(Error|Exception)\b", ln.strip())]
            _die(f"efficient-arch {cmd}: could not load the config: {errors[-1] if errors else msg}")
        _die(f"efficient-arch {cmd}: {msg}\n\n{USAGE}")
    except (AttributeError, KeyError) as e:  # config_flags: override of a field that does not exist
        text = str(e.args[0] if e.args else e)
        name = re.search(r"[A-Za-z_]\w*", text).group(0)
        hint = re.search(r'Did you mean "(\w+)"', text)
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0].split(".")]
        _die(f"efficient-arch {cmd}: unknown config field {name!r} in {', '.join(bad) or 'the overrides'}"
             + (f" (did you mean {hint.group(1)!r}?)" if hint else did_you_mean(name, _field_names()))
             + "; the fields and their defaults are in efficient_arch/config.py (default_config)")
    except Exception as e:  # the config file itself failed: missing file, unknown size, syntax
        _die(f"efficient-arch {cmd}: could not load the config ({type(e).__name__}: {e})")
    if fv.config is None:
        _die(f"efficient-arch {cmd}: --config is required (e.g. --config={DEFAULT_CONFIG})")
    for path in none_fields:
        *parents, leaf = path.split(".")
        node = fv.config
        try:
            for p in parents:
                node = node[p]
            node[leaf] = None
        except (AttributeError, KeyError, TypeError) as e:
            _die(f"efficient-arch {cmd}: --config.{path}=None: {e}; only fields whose "
                 "default is None (typed placeholders) accept None")
    return fv


def _table(title: str, rows: list[tuple[str, str]]):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def cmd_train(argv: list[str]) -> int:
    fv = parse_args("train", argv)
    if not fv.workdir:
        _die("efficient-arch train: --workdir is required (e.g. --workdir=runs/small)")
    from rich.console import Console

    from efficient_arch.train import run_training

    s = run_training(fv.config, fv.workdir, progress=fv.progress, console=Console(), overwrite=fv.overwrite)
    import jax

    if jax.process_index() != 0:  # multi-host: process 0 reports
        return 0
    keys = ["n_params", "n_params_non_embedding", "n_active_params", "tokens_per_step", "step_time_s",
            "tokens_per_s", "model_flops_per_step", "attention_flops_convention", "hardware_flops_per_step",
            "xla_flops_per_step",
            "xla_vs_analytic_hardware", "precision", "peak_flops_per_s", "peak_flops_source", "mfu", "hfu", "device_kind",
            "n_devices", "compile_time_s", "final_train_loss", "final_val_loss", "val_bpb", "val_accuracy"]
    keys += [k for k in ("skipped_steps", "warning", "accounting_error") if s.get(k)]
    _table(f"summary ({os.path.join(fv.workdir, 'summary.json')})", [(k, _fmt(s.get(k))) for k in keys])
    return 0


def cmd_flops(argv: list[str]) -> int:
    fv = parse_args("flops", argv)
    import jax

    from efficient_arch import flops as flops_lib
    from efficient_arch import hardware, parallel, train
    from efficient_arch.config import finalize
    from efficient_arch.models.lm import count_params

    cfg = finalize(fv.config, jax.device_count())
    mesh = parallel.make_mesh(cfg)
    with jax.set_mesh(mesh):
        run = train.build(cfg, mesh)
        lowered = run.train_step.lower(run.abstract_state, run.abstract_batch())
        compiled = lowered.compile()
        xla = flops_lib.xla_flops_per_step(cfg, mesh, lowered)
    ana = flops_lib.analytic_flops(cfg)
    ca = hardware.normalize_cost_analysis(lowered.cost_analysis())
    mem = hardware.memory_analysis_bytes(compiled)
    out = {**count_params(cfg.model), **ana, **xla,
           "xla_vs_analytic_hardware": xla["xla_flops_per_step"] / ana["hardware_flops_per_step"],
           "bytes_accessed_raw": ca.get("bytes_accessed"),
           # FLOPs per byte of the same (rolled) program XLA analysed: loops count once in both
           "arithmetic_intensity_raw": (xla["xla_flops_raw"] / ca["bytes_accessed"]
                                        if ca.get("bytes_accessed") else None),
           # per device: arguments + outputs - donated aliases + XLA temporaries
           "memory_per_device_bytes": (mem.get("argument_bytes", 0) + mem.get("output_bytes", 0)
                                       - mem.get("alias_bytes", 0) + mem.get("temp_bytes", 0)),
           "compiled_memory_bytes": mem}
    _table("FLOPs per train step (global)", [(k, _fmt(v)) for k, v in out.items() if not isinstance(v, dict)])
    if fv.json:
        with open(fv.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def cmd_roofline(argv: list[str]) -> int:
    fv = parse_args("roofline", argv)
    from efficient_arch import roofline as rl
    from efficient_arch.config import ConfigError

    chip = fv.chip
    if chip is None:
        import jax

        dev = jax.devices()[0]
        if dev.platform == "cpu":
            _die("efficient-arch roofline: the local device is a CPU; pass --chip=<accelerator> "
                 "(h100, a100-80gb, v5e, ...) or --chip=NAME --hbm_bandwidth=<bytes/s> "
                 "--config.flops.peak_flops=<FLOP/s>")
        chip = dev.device_kind
    if fv.arch not in (None, "all"):
        _die(f"efficient-arch roofline: --arch={fv.arch!r}: only 'all' is known (one row per config file); "
             "for one architecture pass --config")
    kw = dict(chip=chip, batch=fv.batch, weight_dtype=fv.weight_dtype, hbm_bandwidth=fv.hbm_bandwidth,
              train=fv.train)
    try:
        if fv.arch == "all":
            overrides = [a for a in argv if a.startswith("--config.")]
            size = fv.size
            given = [a.split(":", 1)[1] for a in argv if a.startswith("--config=") and ":" in a]
            if given and not fv["size"].present:  # --config=FILE:SIZE names the size of every row
                size = given[-1]
            rows = []
            for path in rl.config_files(os.path.join(REPO_ROOT, "experiments", "configs")):
                cfg = parse_args("roofline", [f"--config={path}:{size}"] + overrides).config
                context = fv.context or cfg.model.seq_len
                rows.append({"config": os.path.basename(path), **rl.roofline(cfg, context=context, **kw)})
            rl.print_all(rows)
            out = {"size": size, "rows": rows}
        else:
            out = rl.roofline(fv.config, context=fv.context or fv.config.model.seq_len, **kw)
            rl.print_one(out)
    except ConfigError:
        raise
    except ValueError as e:  # UnknownAcceleratorError included: the message names the flag to pass
        _die(f"efficient-arch roofline: {e}")
    if fv.json:
        with open(fv.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def cmd_sweep(argv: list[str]) -> int:
    """``efficient-arch sweep FILE [--workdir DIR] [--parallel N] [--list]``; exit 1 if a point failed."""
    import argparse

    from efficient_arch import sweep as sweep_lib

    ap = argparse.ArgumentParser(prog="efficient-arch sweep", description="Run every point of a sweep file.")
    ap.add_argument("file", help="sweep file, e.g. experiments/sweeps/mqar_tiny.py")
    ap.add_argument("--workdir", default=None, help="sweep directory (default runs/<file stem>)")
    ap.add_argument("--parallel", type=int, default=1, help="points at a time (> 1: subprocesses)")
    ap.add_argument("--list", action="store_true", help="print the points and their status, run nothing")
    args = ap.parse_args(argv)
    try:
        sweep = sweep_lib.load_sweep(args.file)
        if args.parallel < 1:
            raise sweep_lib.SweepError(f"--parallel={args.parallel}: must be >= 1")
    except sweep_lib.SweepError as e:
        _die(f"efficient-arch sweep: {e}")
    workdir = args.workdir or os.path.join("runs", sweep.name)
    if args.list:
        for p in sweep.points:
            state = sweep_lib.point_status(os.path.join(workdir, p.name))
            print(f"{p.name}  [{state}]  {p.config}  {json.dumps(p.overrides)}")
        return 0
    print(f"sweep {sweep.name}: {len(sweep.points)} points in {workdir} (parallel {args.parallel})")
    stopped = None
    try:
        rows = sweep_lib.run_sweep(sweep, workdir, parallel=args.parallel)
    except (SystemExit, KeyboardInterrupt) as e:  # a signal: the points wrote checkpoints
        stopped = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
        rows = [sweep_lib.result_row(sweep, p, workdir) for p in sweep.points]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{sweep.name} ({os.path.join(workdir, 'results.csv')})")
    cols = ["name", "status", "val_accuracy", "final_val_loss", "tokens_per_s", "mfu", "wall_s"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("name", "status") else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    if stopped is not None:
        import signal

        name = signal.Signals(stopped - 128).name if 128 < stopped < 128 + 65 else f"status {stopped}"
        print(f"sweep {sweep.name} stopped by {name}: the interrupted point(s) wrote a checkpoint; rerun the same "
              "command to resume them (finished points are skipped). Partial results:")
    Console().print(table)
    if stopped is not None:
        return stopped
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def cmd_table(argv: list[str]) -> int:
    """``efficient-arch table NAME [--quick | --size S] [--workdir DIR] [--out DIR] [--parallel N]``.

    Exit status 1 if a point of the table's sweep failed (the files are written all the same).
    """
    import argparse

    from efficient_arch import sweep as sweep_lib
    from efficient_arch import tables

    ap = argparse.ArgumentParser(prog="efficient-arch table",
                                 description="Run or reuse the sweep behind a table; write OUT/NAME.md, .csv, .png.")
    ap.add_argument("name", nargs="?", help="table: experiments/tables/NAME.py")
    ap.add_argument("--quick", action="store_true", help="CI size (seconds to a minute per table)")
    ap.add_argument("--size", default=None, help="a size the table defines (default full; --quick = quick)")
    ap.add_argument("--workdir", default=None, help="sweep directory (default runs/tables/NAME[-SIZE])")
    ap.add_argument("--out", default=None, help="output directory (default results; results/quick for --quick)")
    ap.add_argument("--parallel", type=int, default=1, help="points at a time (> 1: subprocesses)")
    ap.add_argument("--list", action="store_true", help="list the tables and their sizes")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for n in tables.available():
            print(f"{n}  sizes: {', '.join(tables.sizes(tables.load_table(n)))}")
        return 0 if args.list else 2
    if args.quick and args.size not in (None, "quick"):
        _die(f"efficient-arch table: --quick and --size={args.size} contradict each other")
    size = "quick" if args.quick else (args.size or "full")
    out = args.out or (os.path.join("results", "quick") if size == "quick" else "results")
    try:
        res = tables.run_table(args.name, size=size, workdir=args.workdir, out_dir=out, parallel=args.parallel)
    except (tables.TableError, sweep_lib.SweepError) as e:
        _die(f"efficient-arch table: {e}")
    print(open(res["md"]).read())
    print(f"wrote {res['md']}, {res['csv']}" + (f", {res['png']}" if res["png"] else "")
          + f" in {res['wall_s']:.0f} s")
    return 1 if res["failed"] else 0


def cmd_generate(argv: list[str]) -> int:
    """``efficient-arch generate --workdir DIR --prompt TEXT [--max_new_tokens N] [sampling flags]``.

    Prints the prompt and its continuation, then the speed table (efficient_arch/generate.py).
    Bad input exits 2 with one line naming the flag and the fix.
    """
    import argparse

    ap = argparse.ArgumentParser(prog="efficient-arch generate",
                                 description="Continue a prompt with a trained run (prefill + cached decoding).")
    ap.add_argument("--workdir", default=None, help="the training run's --workdir (its latest checkpoint is used)")
    ap.add_argument("--prompt", default=None, help="text to continue (its UTF-8 bytes are the tokens)")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate (default 64)")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; default 1.0")
    ap.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus: smallest set reaching this probability "
                    "(1.0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest committed)")
    ap.add_argument("--hbm_bandwidth", type=float, default=None,
                    help="memory bytes/s of the device for the utilization (default: the chip table; none on CPU)")
    ap.add_argument("--json", default=None, help="also write the report as JSON to this path")
    args = ap.parse_args(argv)
    from efficient_arch import generate as gen

    if not args.workdir:
        _die("efficient-arch generate: --workdir is required: the folder of a training run "
             "(efficient-arch train ... --workdir=DIR), e.g. --workdir=runs/small")
    if args.prompt is None or args.prompt == "":
        _die("efficient-arch generate: --prompt is empty; give the text to continue, e.g. --prompt='def main('")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        _die(f"efficient-arch generate: --json={args.json}: its folder does not exist; create it or give "
             "another path")
    try:
        report = gen.run_generate(args.workdir, args.prompt, args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, step=args.step,
                                  hbm_bandwidth=args.hbm_bandwidth)
    except gen.GenerateError as e:
        _die(f"efficient-arch generate: {e}")
    if args.json:  # before printing: a closed stdout (| head) must not lose it
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    gen.print_report(report)
    return 0


COMMANDS = {"train": cmd_train, "flops": cmd_flops, "roofline": cmd_roofline, "sweep": cmd_sweep,
            "table": cmd_table, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``efficient-arch`` console script. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"efficient-arch: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from efficient_arch.checkpoint import CorruptCheckpointError, WorkdirBusyError
    from efficient_arch.config import ConfigError

    try:
        return COMMANDS[cmd](rest)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except CorruptCheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    except WorkdirBusyError as e:
        print(f"workdir error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
