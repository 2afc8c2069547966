"""End-to-end tests of the command line (``python -m efficient_arch`` / ``efficient-arch``) in
subprocesses: a short training run and its outputs, config errors, --help and ``flops --json``."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import random
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "experiments/configs/transformer.py:tiny"
SUMMARY_KEYS = ("n_params", "n_params_non_embedding", "tokens_per_step", "step_time_s", "tokens_per_s",
                "model_flops_per_step", "xla_flops_per_step", "peak_flops_per_s", "peak_flops_source", "mfu",
                "device_kind", "n_devices", "final_train_loss", "final_val_loss", "val_bpb")
ROW_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")
PEAK = 1e12
STEPS, LOG_EVERY, EVAL_EVERY = 6, 2, 3


def _env():
    env = dict(os.environ)
    # share the tests' persistent compilation cache (same location as conftest.py) with the subprocesses
    cache = os.environ.get("EFFICIENT_ARCH_TEST_JAX_CACHE", str(REPO / ".cache" / "jax"))
    env.update(JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _console_script():
    exe = pathlib.Path(sys.executable).parent / "efficient-arch"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "efficient_arch"]


def run_cli(argv, *, module=False, timeout=300):
    cmd = ([sys.executable, "-m", "efficient_arch"] if module else _console_script()) + list(argv)
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_corpus")
    d = root / "corpus"
    d.mkdir()
    rng = random.Random(7)
    words = ("print return import class lambda yield async await tuple list dict set frozen value "
             "état naïve über 数据 — αβγ 0x1F 3.14159 {} [] () <> == != += -= # @ $").split()
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(40))
        (d / f"f{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
    return {"path": str(d), "cache": str(root / "cache")}


def data_flags(corpus):
    return ["--config.data.source=text", f"--config.data.path={corpus['path']}",
            f"--config.data.cache_dir={corpus['cache']}", "--config.data.val_fraction=0.2",
            f"--config.flops.peak_flops={PEAK}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """One `python -m efficient_arch train` run of the tiny config; returns (workdir, process)."""
    workdir = tmp_path_factory.mktemp("cli_run") / "run"
    argv = ["train", f"--config={TINY}", f"--config.train.steps={STEPS}",
            f"--config.train.log_every={LOG_EVERY}", f"--config.train.eval_every={EVAL_EVERY}",
            *data_flags(corpus), f"--workdir={workdir}", "--noprogress"]
    proc = run_cli(argv, module=True)
    return workdir, proc


def tiny_finalized(steps=None):
    import jax

    from efficient_arch.config import finalize

    spec = importlib.util.spec_from_file_location("_tiny_transformer_config",
                                                  REPO / "experiments" / "configs" / "transformer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("tiny")
    if steps is not None:
        cfg.train.steps = steps
    return finalize(cfg, jax.device_count())


# ----------------------------------------------------------------------------- train


def test_train_exits_zero_and_writes_summary(trained):
    workdir, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    assert not missing, missing

    for k in ("n_params", "n_params_non_embedding", "tokens_per_step", "n_devices"):
        assert isinstance(summary[k], int) and not isinstance(summary[k], bool) and summary[k] > 0, k
    for k in ("step_time_s", "tokens_per_s", "model_flops_per_step", "xla_flops_per_step", "peak_flops_per_s",
              "mfu", "final_train_loss", "final_val_loss", "val_bpb"):
        assert isinstance(summary[k], float) and math.isfinite(summary[k]) and summary[k] > 0, (k, summary[k])
    assert isinstance(summary["device_kind"], str) and summary["device_kind"]
    assert 0 < summary["mfu"] <= 1

    # values consistent with the config and with each other
    from efficient_arch.flops import analytic_flops
    from efficient_arch.models.lm import count_params

    cfg = tiny_finalized(steps=STEPS)
    counts = count_params(cfg.model)
    assert summary["n_params"] == counts["n_params"]
    assert summary["n_params_non_embedding"] == counts["n_params_non_embedding"] < summary["n_params"]
    assert summary["tokens_per_step"] == cfg.train.batch_size * cfg.model.seq_len
    assert summary["model_flops_per_step"] == analytic_flops(cfg)["model_flops_per_step"]
    assert summary["peak_flops_per_s"] == PEAK and summary["peak_flops_source"] == "user-given"
    assert summary["n_devices"] == 1  # the subprocess sees the one host CPU device
    # the console summary table shows the precision policy too (as summary.json has it)
    assert summary["precision"].startswith("params float32") and "precision" in proc.stdout
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens_per_step"] / summary["step_time_s"], rel=1e-9)
    assert summary["mfu"] == pytest.approx(
        summary["model_flops_per_step"] / summary["step_time_s"] / (summary["n_devices"] * PEAK), rel=1e-9)
    # XLA counts at least the matmuls (hardware FLOPs, full-square attention)
    assert summary["xla_flops_per_step"] >= summary["model_flops_per_step"]
    # loss in nats per token vs bits per *byte*: EOS targets count as tokens but not bytes, so
    # val_bpb >= val_loss / ln 2, and only slightly (one EOS per ~1 KB document)
    bits_per_token = summary["final_val_loss"] / math.log(2)
    assert bits_per_token <= summary["val_bpb"] <= 1.02 * bits_per_token
    # 6 steps at lr 3e-3 move the loss below its uniform start ln(264) = 5.58
    assert summary["final_train_loss"] < math.log(cfg.model.vocab_size)


def test_train_metrics_rows_and_checkpoint(trained):
    workdir, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    # any other row is the initial validation point (step 0, no training metrics)
    assert all(r["step"] == 0 and "val_loss" in r for r in rows if "loss" not in r)
    for r in train_rows:
        for k in ROW_KEYS:
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["step"], k, r.get(k))
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] <= 1 and r["grad_norm"] > 0 and r["lr"] > 0
    # validation at eval_every multiples that are log steps (6) and at the last step
    assert [r["step"] for r in train_rows if "val_loss" in r] == [STEPS]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_train_loss"] == train_rows[-1]["loss"]
    assert summary["final_val_loss"] == train_rows[-1]["val_loss"]

    from efficient_arch.checkpoint import committed_steps, read_config

    assert committed_steps(workdir / "checkpoints") == [STEPS]  # ckpt_every=13 > 6: the final forced save
    saved = read_config(workdir)
    assert saved["train"]["steps"] == STEPS and saved["model"]["d_model"] == 64


# ----------------------------------------------------------------------------- errors and help


def test_invalid_override_exits_2_naming_the_field(tmp_path, corpus):
    workdir = tmp_path / "never"
    proc = run_cli(["train", f"--config={TINY}", "--config.model.n_kv_heads=3", *data_flags(corpus),
                    f"--workdir={workdir}", "--noprogress"])
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "model.n_heads" in proc.stderr and "n_kv_heads=3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()  # rejected before anything is written or compiled


def test_unknown_config_field_is_rejected_clearly(tmp_path):
    workdir = tmp_path / "never"
    proc = run_cli(["train", f"--config={TINY}", "--config.model.foo=1", f"--workdir={workdir}", "--noprogress"])
    assert proc.returncode == 2
    err = proc.stderr
    assert "unknown config field" in err and "model.foo" in err, err
    assert "Traceback" not in err
    assert not workdir.exists()


def test_help_exits_zero():
    proc = run_cli(["--help"])
    assert proc.returncode == 0, proc.stderr
    assert "usage: efficient-arch" in proc.stdout
    assert "train" in proc.stdout and "flops" in proc.stdout


def test_unknown_command_exits_2():
    proc = run_cli(["trian"])
    assert proc.returncode == 2
    assert "unknown command 'trian'" in proc.stderr


# ----------------------------------------------------------------------------- flops


def test_flops_command_writes_json(tmp_path, trained):
    out = tmp_path / "f.json"
    proc = run_cli(["flops", f"--config={TINY}", f"--json={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    from efficient_arch.flops import analytic_flops

    ana = analytic_flops(tiny_finalized())
    assert data["model_flops_per_step"] == ana["model_flops_per_step"] > 0
    assert data["hardware_flops_per_step"] == ana["hardware_flops_per_step"]
    xla = data["xla_flops_per_step"]
    assert isinstance(xla, float) and xla >= data["hardware_flops_per_step"]
    assert data["xla_vs_analytic_hardware"] == pytest.approx(xla / data["hardware_flops_per_step"], rel=1e-12)
    # the tiny config scans its 2 layers: the correction must have added the second one
    assert xla > data["xla_flops_raw"]
    assert data["arithmetic_intensity_raw"] == pytest.approx(data["xla_flops_raw"] / data["bytes_accessed_raw"])
    mem = data["compiled_memory_bytes"]
    assert data["memory_per_device_bytes"] == (mem["argument_bytes"] + mem["output_bytes"]
                                               - mem["alias_bytes"] + mem["temp_bytes"]) > 0
    # same model and batch as the training run: its summary's XLA count agrees (only the LR
    # schedule's scalar arithmetic differs between 6 and 40 steps)
    workdir, train_proc = trained
    if train_proc.returncode == 0:
        summary = json.loads((workdir / "summary.json").read_text())
        assert summary["model_flops_per_step"] == data["model_flops_per_step"]
        assert summary["xla_flops_per_step"] == pytest.approx(xla, rel=1e-3)
