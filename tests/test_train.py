"""Tests for efficient_arch.train: optimisation actually works (overfit), bit-exact resume through
the SIGTERM/preemption path, gradient accumulation, the weight-decay mask and the non-finite-loss
guard of the loop."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import signal

import jax
import numpy as np
import pytest

from efficient_arch import metrics as metrics_lib
from efficient_arch import parallel, train
from efficient_arch.checkpoint import Checkpointer, committed_steps
from efficient_arch.config import finalize

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo pancakes; "
         "def main(): return 42 # naïve café résumé — ünïcödé 東京 1234567890 {[()]} <tag/> "
         "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor").split()


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of 12 varied UTF-8 text files (~2 KB each) and a data cache dir."""
    root = tmp_path_factory.mktemp("train_corpus")
    d = root / "corpus"
    d.mkdir()
    rng = random.Random(1234)
    for i in range(12):
        lines = []
        for _ in range(30):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))))
        (d / f"doc{i:02d}.txt").write_text(f"# document {i}\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return {"path": str(d), "cache": str(root / "cache")}


def text_config(tiny_config, corpus, **overrides):
    """Tiny config on the tmp text corpus; peak FLOPs given so no CPU calibration runs."""
    base = dict(data__source="text", data__path=corpus["path"], data__cache_dir=corpus["cache"],
                data__val_fraction=0.2, flops__peak_flops=1e12)
    base.update(overrides)
    return tiny_config(**base)


def loop_config(tiny_config, corpus, **overrides):
    """The config of every run_training test: 8 steps, checkpoint every 4, log every step.

    Tests may change fields that only the Python loop reads (ckpt_every, keep_ckpts) or grad_accum;
    everything else is shared so the init/train/eval programs compile once per session (persistent
    cache)."""
    base = dict(train__steps=8, train__ckpt_every=4, train__log_every=1, train__eval_every=1000,
                train__batch_size=4, train__keep_ckpts=5)
    base.update(overrides)
    return text_config(tiny_config, corpus, **base)


def build_run(cfg):
    cfg = finalize(cfg, jax.device_count())
    mesh = parallel.make_mesh(cfg)
    return cfg, mesh, train.build(cfg, mesh)


def fixed_batch(mesh, batch, seq_len, vocab, seed=0):
    w = np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    return parallel.global_batch({"inputs": w[:, :-1], "targets": w[:, 1:]}, mesh, batch)


def read_rows(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_rows(workdir):
    """Rows that carry a training loss, keyed by step (asserting each step is logged once)."""
    rows = [r for r in read_rows(workdir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate metric rows for steps {steps}"
    return {r["step"]: r for r in rows}


def restore_latest(workdir, run):
    with Checkpointer(workdir, keep=10, save_every=1) as ck:
        step = ck.latest_step()
        state, data_state, _ = ck.restore(step, run.abstract_state)
    return step, state, data_state


def assert_trees_bit_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8),
                                      err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- overfit


def test_overfits_one_fixed_batch(tiny_config):
    """60 steps on one fixed 4 x 32 batch of random tokens drive the loss from ~ln(V) to ~0."""
    steps = 60
    cfg, mesh, run = build_run(tiny_config(model__seq_len=32, train__lr=1e-2, train__steps=steps,
                                           train__warmup_steps=10))
    vocab = cfg.model.vocab_size
    with jax.set_mesh(mesh):
        batch = fixed_batch(mesh, 4, 32, 256)
        state = run.init_state()
        losses = []
        for _ in range(steps):
            state, m = run.train_step(state, batch)
            losses.append(float(m["loss"]))
    assert all(math.isfinite(x) for x in losses)
    # Initial output is near-uniform: loss ~ ln(vocab) (5.58 for V=264).
    assert abs(losses[0] - math.log(vocab)) < 0.25, losses[0]
    # Measured: ~7e-3 at step 60 (0.38 already at step 20). 128 random tokens are memorised.
    assert losses[-1] < 0.05, losses[::10]
    assert max(losses[-10:]) < 0.1, losses[-10:]


# ----------------------------------------------------------------------------- resume


MQAR = dict(data__source="mqar", data__path=None, data__task_vocab=64, data__n_kv_pairs=4, model__seq_len=32,
            model__vocab_size=64, train__eval_every=4, train__eval_batches=2)


@pytest.mark.parametrize("grad_accum,stop_at,task", [(1, 4, None), (2, 3, None), (2, 3, "mqar")],
                         ids=["accum1-stop-at-ckpt", "accum2-stop-off-ckpt", "mqar-accum2-stop-off-ckpt"])
def test_resume_is_bit_exact(tiny_config, corpus, tmp_path, monkeypatch, grad_accum, stop_at, task):
    """2N steps straight == N' steps, SIGTERM (the preemption path: checkpoint + SystemExit), resume.

    ``task="mqar"``: the synthetic task's iterator position (its per-step example stream) and the
    answer-only loss mask resume too; evaluation every 4 steps so val accuracy is compared.

    Both runs use train.steps=2N so the LR schedule is identical. The stop is triggered by raising
    SIGTERM in-process right after step ``stop_at`` is logged; the loop's own handler then finishes
    the step, force-saves and exits with 128+15. With ``stop_at`` not a multiple of ckpt_every the
    resume starts from the forced checkpoint.
    """
    n = 4
    cfg = loop_config(tiny_config, corpus, train__grad_accum=grad_accum, **(MQAR if task else {}))
    assert cfg.train.steps == 2 * n and cfg.train.ckpt_every == n
    a, b = tmp_path / "A", tmp_path / "B"
    sa = train.run_training(cfg, str(a), progress=False)
    assert sa["steps"] == 2 * n

    original_write = metrics_lib.MetricsWriter.write

    def write_then_sigterm(self, step, row):
        original_write(self, step, row)
        if step == stop_at and "loss" in row:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write_then_sigterm)
    with pytest.raises(SystemExit) as exc:
        train.run_training(cfg, str(b), progress=False)
    assert exc.value.code == 128 + signal.SIGTERM
    assert committed_steps(b / "checkpoints")[-1] == stop_at
    assert not (b / "summary.json").exists()
    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", original_write)

    sb = train.run_training(cfg, str(b), progress=False)
    assert sb["steps"] == 2 * n

    ra, rb = train_rows(a), train_rows(b)
    assert sorted(ra) == sorted(rb) == list(range(1, 2 * n + 1))
    for step in ra:
        for k in ("loss", "grad_norm", "lr"):
            assert ra[step][k] == rb[step][k], (step, k, ra[step][k], rb[step][k])
    # the loss actually moves (so equality is not trivially about constant values)
    assert ra[2 * n]["loss"] < ra[1]["loss"]
    assert ra[2 * n]["val_loss"] == rb[2 * n]["val_loss"]
    if task:
        assert cfg.data.source == task and ra[2 * n]["val_accuracy"] == rb[2 * n]["val_accuracy"]
        assert ra[n]["val_accuracy"] == rb[n]["val_accuracy"]
    assert sa["final_train_loss"] == sb["final_train_loss"] and sa["final_val_loss"] == sb["final_val_loss"]

    _, _, run = build_run(cfg)
    step_a, state_a, data_a = restore_latest(a, run)
    step_b, state_b, data_b = restore_latest(b, run)
    assert step_a == step_b == 2 * n
    assert data_a == data_b
    assert int(state_a["step"]) == 2 * n
    assert_trees_bit_equal(state_a, state_b)  # params, optimizer moments, step and RNG


# ----------------------------------------------------------------------------- grad accumulation


def test_grad_accum_matches_single_batch(tiny_config, corpus):
    """grad_accum=2 (two microbatches of 2) == grad_accum=1 on the same global batch of 4.

    Uses the loop config (its programs are shared with the resume tests). Its warmup makes lr(0)=0,
    so step 1 only fills Adam's moments with g1 and step 2 applies lr(1) * m_hat / sqrt(v_hat), a
    per-element function of (g1, g2): equal params after 2 steps mean equal gradient directions,
    and the logged loss / grad_norm (rtol 1e-5 at each step) pin their scale (mean, not sum).
    """
    cfg1, mesh, run1 = build_run(loop_config(tiny_config, corpus, train__grad_accum=1))
    cfg2, _, run2 = build_run(loop_config(tiny_config, corpus, train__grad_accum=2))
    T, V = cfg1.model.seq_len, cfg1.model.vocab_size
    with jax.set_mesh(mesh):
        batches = [fixed_batch(mesh, 4, T, 256, seed=s) for s in (11, 12)]
        s1, s2 = run1.init_state(), run2.init_state()
        init = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(s1["params"]))
        assert_trees_bit_equal(s1["params"], s2["params"])  # same seed -> same init
        for k, batch in enumerate(batches):
            s1, m1 = run1.train_step(s1, batch)
            s2, m2 = run2.train_step(s2, batch)
            m1, m2 = jax.device_get(m1), jax.device_get(m2)
            assert float(m1["lr"]) == float(m2["lr"]) == float(run1.schedule(k))
            np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
            np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
            assert abs(float(m1["loss"]) - math.log(V)) < 0.2 and float(m1["grad_norm"]) > 0.1
    lr = float(run1.schedule(1))
    assert lr > 0
    p1, p2 = jax.device_get(s1["params"]), jax.device_get(s2["params"])
    for (path, o), x1, x2 in zip(jax.tree_util.tree_leaves_with_path(init), jax.tree.leaves(p1),
                                 jax.tree.leaves(p2)):
        name = jax.tree_util.keystr(path)
        d1, d2 = np.asarray(x1, np.float64) - o, np.asarray(x2, np.float64) - o
        # Adam moves every coordinate by ~lr (|m_hat / sqrt(v_hat)| <= ~1): params really moved
        assert np.median(np.abs(d1)) > 0.1 * lr, name
        # 1e-5 relative, plus float32 rounding of the new params (~1 ulp), plus 2e-4 lr: the
        # microbatch sums reorder float32 additions (abs. error ~1e-7 of a leaf's large gradients)
        # and Adam rescales each coordinate to O(lr), so coordinates with gradients ~1e-2 of the
        # typical size see ~1e-5..1e-4 relative error (measured max 3.8e-5 lr). A wrong split or
        # misaligned targets would move coordinates by O(lr).
        ulp = np.spacing(np.abs(o).astype(np.float32)).astype(np.float64)
        err, bound = np.abs(d2 - d1), 1e-5 * np.abs(d1) + 4 * ulp + 2e-4 * lr
        assert np.all(err <= bound), (name, float(np.max(err - bound)))


# ----------------------------------------------------------------------------- weight decay


def test_decay_mask_excludes_norm_scales(tiny_config):
    cfg, _, run = build_run(tiny_config(model__tie_embeddings=False))
    params = jax.eval_shape(lambda: run.abstract_state["params"])
    mask = train.decay_mask(params)
    flat = jax.tree_util.tree_leaves_with_path(mask)
    assert len(flat) == len(jax.tree.leaves(params))
    got = {jax.tree_util.keystr(p): v for p, v in flat}
    # independent characterisation: a leaf belongs to a norm iff a module on its path is a *norm
    expected = {jax.tree_util.keystr(p): not any(str(getattr(k, "key", k)).endswith("norm") for k in p)
                for p, _ in flat}
    assert got == expected
    assert sum(not v for v in got.values()) == 3  # mixer_norm, ffn_norm (stacked), final_norm
    assert got["['head']"] and got["['embed']['embedding']"]


def test_optimizer_applies_decay_only_to_masked_params(tiny_config):
    """Zero gradients: AdamW's update is exactly -lr * wd * p for decayed params, 0 for norms."""
    lr, wd = 0.5, 0.1
    cfg, mesh, run = build_run(tiny_config(train__lr=lr, train__weight_decay=wd, train__warmup_steps=0))
    with jax.set_mesh(mesh):
        state = run.init_state()
        params = state["params"]
        zeros = jax.tree.map(np.zeros_like, jax.device_get(params))
        updates, _ = jax.jit(run.tx.update)(zeros, state["opt_state"], params)
    updates, params = jax.device_get(updates), jax.device_get(params)
    mask = train.decay_mask(params)
    n_decayed = 0
    for (path, u), p, decayed in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params),
                                     jax.tree.leaves(mask)):
        if decayed:
            n_decayed += 1
            assert np.any(p != 0)
            np.testing.assert_allclose(u, -lr * wd * p, rtol=1e-6, atol=1e-12, err_msg=jax.tree_util.keystr(path))
        else:
            assert np.all(u == 0), jax.tree_util.keystr(path)
            assert np.all(p == 1)  # norm scales init to ones: a decay would have been visible
    assert n_decayed == 6  # embedding, wq, wkv, wo, w_gate_up, w_down (tied head)


# ----------------------------------------------------------------------------- non-finite loss


def _failing_step(msg):
    m = re.search(r"non-finite .* at step (\d+)", msg)
    assert m, msg
    return int(m.group(1))


def poison_train_batch(monkeypatch, k, bad_id):
    """Make run_training's k-th training batch (1-based) carry token id ``bad_id`` at [0, 0]."""
    import efficient_arch.data as data_lib

    real = data_lib.make_train_iterator

    class Poisoned:
        def __init__(self, it):
            self.it, self.n = it, 0

        def __next__(self):
            b = dict(next(self.it))
            self.n += 1
            if self.n == k:
                b["inputs"] = b["inputs"].copy()
                b["inputs"][0, 0] = bad_id
            return b

        def __getattr__(self, name):  # get_state / set_state
            return getattr(self.it, name)

    monkeypatch.setattr(data_lib, "make_train_iterator", lambda *a, **kw: Poisoned(real(*a, **kw)))


def test_poisoned_batch_raises_floating_point_error_naming_step(tiny_config, corpus, tmp_path, monkeypatch):
    """Batch 3 gets a token id >= vocab_size: the embedding gather fills NaN, so the loss of step 3
    (and only step 3) is non-finite. The loop must raise FloatingPointError naming step 3 after
    logging steps 1-2, keep the step-2 checkpoint as the last one, and write no summary."""
    poison_at = 3
    cfg = loop_config(tiny_config, corpus, train__ckpt_every=1)
    poison_train_batch(monkeypatch, poison_at, cfg.model.vocab_size + 7)
    with pytest.raises(FloatingPointError) as exc:
        train.run_training(cfg, str(tmp_path), progress=False)
    msg = str(exc.value)
    assert _failing_step(msg) == poison_at
    rows = train_rows(tmp_path)
    assert sorted(rows) == list(range(1, poison_at))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows.values())
    assert "train.lr" in msg  # names the fix
    assert committed_steps(tmp_path / "checkpoints")[-1] == poison_at - 1
    assert not (tmp_path / "summary.json").exists()


def test_nan_gradients_never_checkpointed(tiny_config, corpus, tmp_path, monkeypatch):
    """Embedding scaled by 1e25 at init: RMSNorm's x*x overflows to inf, so the forward is finite
    (normed activations and logits are 0, loss = ln V) but the gradients are NaN at step 1 (IEEE
    semantics, deterministic). The loop must raise at step 1 (grad_norm non-finite) before saving:
    no committed checkpoint holds non-finite parameters."""
    real_build = train.build

    def poisoned_build(cfg, mesh):
        run = real_build(cfg, mesh)
        init = run.init_state

        def init_state():
            state = init()
            state["params"]["embed"]["embedding"] = state["params"]["embed"]["embedding"] * 1e25
            return state

        return dataclasses.replace(run, init_state=init_state)

    monkeypatch.setattr(train, "build", poisoned_build)
    cfg = loop_config(tiny_config, corpus, train__ckpt_every=1)
    with pytest.raises(FloatingPointError) as exc:
        train.run_training(cfg, str(tmp_path), progress=False)
    assert "non-finite" in str(exc.value)
    _, _, run = build_run(cfg)
    steps = committed_steps(tmp_path / "checkpoints")
    with Checkpointer(tmp_path, keep=10, save_every=1) as ck:
        for s in steps:
            state, _, _ = ck.restore(s, run.abstract_state)
            for path, x in jax.tree_util.tree_leaves_with_path(state["params"]):
                assert np.isfinite(np.asarray(x)).all(), f"checkpoint {s}: {jax.tree_util.keystr(path)} non-finite"


def test_mfu_above_one_is_flagged_not_silent(tiny_config, corpus, tmp_path):
    """A peak far below what the CPU achieves makes MFU > 100%: the summary names the
    accounting error and the fix instead of reporting it as a result."""
    cfg = loop_config(tiny_config, corpus, train__steps=3, flops__peak_flops=1e6)
    s = train.run_training(cfg, str(tmp_path), progress=False)
    assert s["mfu"] > 1
    assert "exceed 100%" in s["accounting_error"] and "flops.peak_flops" in s["accounting_error"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["accounting_error"] == s["accounting_error"]
