"""Train state, the one train step shared by every architecture, the eval step and the loop.

The state is a plain pytree ``{"step": int32[], "params": dict, "opt_state": optax state,
"rng": uint32[2]}`` with every leaf sharded by the rules in ``parallel.py`` (optimizer moments
like their parameters). ``train_step(state, batch) -> (state, metrics)`` is a ``jax.jit`` with
explicit in/out shardings and the state donated; it never asks which mixer or FFN the model has:
it adds whatever ``aux["aux_loss"]`` the model reports to the cross-entropy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efficient_arch import parallel
from efficient_arch.checkpoint import WorkdirBusyError
from efficient_arch.config import TASK_SOURCES
from efficient_arch.ops import scan as scan_lib
from efficient_arch.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_eval
from efficient_arch.models.layers import describe_precision
from efficient_arch.models.lm import apply_step_stats, new_model

# not weight-decayed: norm scales, biases, and SSM decay / skip parameters (Mamba-2 practice), and
# the MoE selection bias (zero gradient, so AdamW leaves it alone; moved by MoE.post_step)
NO_DECAY_NAMES = ("scale", "bias", "A_log", "dt_bias", "D", "expert_bias")


def make_schedule(t) -> optax.Schedule:
    """Linear warmup to ``train.lr`` over ``warmup_steps``, then cosine to ``lr * min_lr_ratio``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.min_lr_ratio)


def decay_mask(params) -> Any:
    """True for parameters that get weight decay: everything but norm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", path[-1])) not in NO_DECAY_NAMES, params)


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (Loshchilov & Hutter 2019) with global-norm clipping and the warmup-cosine schedule."""
    schedule = make_schedule(t)
    parts = [optax.clip_by_global_norm(t.clip_norm)] if t.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """Token cross-entropy in nats.

    Args:
      logits: float32 ``[B, T, V]``; targets: int32 ``[B, T]``; mask: optional ``[B, T]`` weights
        (1 where the position carries a loss).
    Returns:
      ``(sum of losses, number of counted tokens)`` as float32 scalars.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def _opt_specs(opt_state_shape, param_specs, params_shape):
    """Shard optimizer-state leaves like the parameter at the same path suffix; else replicate."""
    by_path = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=lambda x: isinstance(x, P))[0]:
        by_path[tuple(path)] = spec
    shapes = {tuple(p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(params_shape)[0]}

    def pick(path, leaf):
        path = tuple(path)
        for k in range(len(path)):
            suffix = path[k:]
            if suffix in by_path and shapes.get(suffix) == leaf.shape:
                return by_path[suffix]
        return P()

    return jax.tree_util.tree_map_with_path(pick, opt_state_shape)


@dataclasses.dataclass
class Run:
    """Everything built from a finalized config before any array exists.

    Attributes:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with shardings) of the train state.
      state_shardings / batch_sharding: NamedShardings used as jit in/out shardings.
      train_step: jitted ``(state, batch) -> (state, metrics)`` with the state donated. With
        ``train.nan_policy="skip"`` a step whose loss or gradient norm is non-finite leaves params
        and optimizer state unchanged (step and RNG still advance) and reports
        ``metrics["skipped"] = 1.0`` (else 0.0).
      eval_step: jitted ``(params, batch) -> (loss_sum, n_tokens, n_correct)`` over the (masked)
        target positions; ``n_correct`` counts argmax predictions equal to the target.
      loss_and_grad: jitted ``(params, batch) -> ((loss, metrics), grads)`` on one microbatch.
      update_step: jitted optimizer half of the step ``(state, grads) -> (state, metrics)``.
    """

    cfg: Any
    mesh: Mesh
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: Any
    state_shardings: Any
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable
    init_state: Callable
    loss_and_grad: Callable
    update_step: Callable

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shape of one global batch: int32 ``[batch_size, seq_len]`` inputs and targets."""
        shape = (self.cfg.train.batch_size, self.cfg.model.seq_len)
        s = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
        if self.cfg.data.source in TASK_SOURCES:  # synthetic tasks: int32 loss_mask, 1 on answers
            return {"inputs": s, "targets": s, "loss_mask": s}
        return {"inputs": s, "targets": s}


def build(cfg, mesh: Mesh) -> Run:
    """Build model graph, shardings, optimizer and the jitted steps for a finalized ``cfg``."""
    mcfg, t = cfg.model, cfg.train
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):  # shapes only
        abstract_model = nnx.eval_shape(lambda: new_model(mcfg, t.seed))
    graphdef, abs_vars = nnx.split(abstract_model)
    param_specs = nnx.to_pure_dict(parallel.state_specs(abs_vars))
    params_shape = nnx.to_pure_dict(abs_vars)
    tx, schedule = make_optimizer(t)
    opt_shape = jax.eval_shape(tx.init, params_shape)
    specs = {"step": P(), "params": param_specs,
             "opt_state": _opt_specs(opt_shape, param_specs, params_shape), "rng": P()}
    state_shardings = parallel.named(mesh, specs)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shape,
              "opt_state": opt_shape, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, state_shardings)
    batch_sharding = NamedSharding(mesh, parallel.batch_spec())
    accum = t.grad_accum

    def init_fn():
        model = new_model(mcfg, t.seed)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                "rng": jax.random.key_data(jax.random.key(t.seed + 1))}

    def n_loss_tokens(batch):
        mask = batch.get("loss_mask")
        if mask is None:
            return jnp.asarray(batch["targets"].size, jnp.float32)
        return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)

    def fused_head_inputs(model, batch):
        """``(hidden states, head weight, tied, float32 loss mask (ones without one), aux)``: the
        inputs of the chunked head + loss (``train.ce_chunk_size``)."""
        h, aux = model.hidden(batch["inputs"], segment_ids=batch.get("segment_ids"))
        w, tied = model.head_weight()
        mask = batch.get("loss_mask")
        mask = jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
        return h, w, tied, mask, aux

    def loss_fn(params, batch, denom):
        # ce = this microbatch's summed token loss / tokens in the *global* batch, so the sum
        # over microbatches is the global token mean whatever each microbatch's count is
        model = nnx.merge(graphdef, params)
        if t.ce_chunk_size:  # fused head + loss, chunked: no [B, T, vocab] logits
            h, w, tied, mask, aux = fused_head_inputs(model, batch)
            loss_sum = linear_cross_entropy(h, w, batch["targets"], mask, int(t.ce_chunk_size), tied, model.dtype)
        else:
            logits, aux = model(batch["inputs"], segment_ids=batch.get("segment_ids"))
            loss_sum, _ = cross_entropy(logits, batch["targets"], batch.get("loss_mask"))
        ce = loss_sum / denom
        aux = {k: jnp.asarray(v, jnp.float32) / accum for k, v in aux.items()}  # mean over microbatches
        return ce + aux.get("aux_loss", 0.0), {"loss": ce, **aux}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def loss_and_grad_fn(params, batch):
        """value-and-grad of the loss on one (micro)batch: ((loss, metrics), grads)."""
        return grad_fn(params, batch, n_loss_tokens(batch))

    def microbatches(batch):
        # microbatch j = rows j, j+accum, ...: each device keeps its own rows (no resharding)
        def split(x):
            x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
            return parallel.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
        return jax.tree.map(split, batch)

    def step_fn(state, batch):
        params = state["params"]
        denom = n_loss_tokens(batch)
        if accum == 1:
            (_, metrics), grads = grad_fn(params, batch, denom)
        else:
            mbs = microbatches(batch)
            zeros = jax.tree.map(jnp.zeros_like, params)

            def body(carry, mb):
                g_acc, m_acc = carry
                (_, m), g = grad_fn(params, mb, denom)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

            m_shape = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], mbs), denom)[0][1]
            m_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (grads, metrics), _ = scan_lib.scan(body, (zeros, m_zero), mbs)
        return update_fn(state, grads, metrics)

    def update_fn(state, grads, metrics):
        """The optimizer half of the step: clip, AdamW, schedule, step and RNG advance."""
        params = state["params"]
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        # per-layer statistics the model reported (e.g. MoE expert counts): its modules' own
        # post-step rules (aux-loss-free bias step) and loggable scalars
        params, metrics = apply_step_stats(mcfg, params, metrics)
        if t.nan_policy == "skip":  # non-finite loss / gradients: keep the old params and moments
            ok = jnp.isfinite(grad_norm) & jnp.isfinite(metrics.get("loss", 0.0))
            keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731 - select, NaNs don't leak
            params = jax.tree.map(keep, params, state["params"])
            opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
            metrics = {**metrics, "skipped": 1.0 - ok.astype(jnp.float32)}
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state["step"])}
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}
        return new_state, metrics

    def eval_fn(params, batch):
        model = nnx.merge(graphdef, params)
        if t.ce_chunk_size:  # as the train step: no [B, T, vocab] logits
            h, w, tied, m, _ = fused_head_inputs(model, batch)
            loss_sum, correct = linear_cross_entropy_eval(h, w, batch["targets"], m, int(t.ce_chunk_size), tied,
                                                          model.dtype)
            return loss_sum, jnp.sum(m), correct
        mask = batch.get("loss_mask")
        logits, _ = model(batch["inputs"], segment_ids=batch.get("segment_ids"))
        loss_sum, count = cross_entropy(logits, batch["targets"], mask)
        hit = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        correct = jnp.sum(hit if mask is None else hit * mask.astype(jnp.float32))
        return loss_sum, count, correct

    replicated = NamedSharding(mesh, P())
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_step = jax.jit(eval_fn, in_shardings=(state_shardings["params"], batch_sharding),
                        out_shardings=(replicated, replicated, replicated))
    init_state = jax.jit(init_fn, out_shardings=state_shardings)
    loss_and_grad = jax.jit(loss_and_grad_fn, in_shardings=(state_shardings["params"], batch_sharding))
    update_step = jax.jit(lambda state, grads: update_fn(state, grads, {}),
                          in_shardings=(state_shardings, state_shardings["params"]))
    return Run(cfg=cfg, mesh=mesh, graphdef=graphdef, tx=tx, schedule=schedule,
               abstract_state=abstract_state, state_shardings=state_shardings,
               batch_sharding=batch_sharding, train_step=train_step, eval_step=eval_step,
               init_state=init_state, loss_and_grad=loss_and_grad, update_step=update_step)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


class _StopFlag:
    """Handler of SIGTERM/SIGINT: the loop finishes the current step, checkpoints and exits.

    The first signal restores the default handlers (so a second SIGTERM / SIGINT kills a process
    stuck while stopping at once, keeping the last committed checkpoint) and says so on stderr.
    """

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        import signal

        if self.signum is None:
            self.signum = signum
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        name = signal.Signals(signum).name
        msg = (f"\nefficient-arch: received {name}: finishing the current step, then writing a checkpoint "
               f"and exiting with status {128 + signum}; send {name} again to exit at once without that "
               "checkpoint (the last committed one is kept)\n")
        try:  # os.write: safe inside a signal handler, whatever the main thread was printing
            os.write(2, msg.encode())
        except OSError:
            pass


def _agree_stop(local_signum: int | None) -> list[tuple[int, int]]:
    """The processes that received a stop signal, agreed on by every process at this step.

    One process alone must never stop to write a checkpoint (a collective) while the others go
    on training: every process calls this once per step, at the same point of the loop, and they
    all stop at the same step when any of them was signalled. With several processes that is one
    all-gather of an int32 per step (about 3 ms on the 2 x 4-CPU-device tiny run, whose step takes
    about 200 ms); with one process, no communication.

    Returns:
      ``[(process index, signal number), ...]`` of the signalled processes ([] when none).
    """
    if jax.process_count() == 1:
        return [(0, local_signum)] if local_signum else []
    from jax.experimental import multihost_utils

    got = np.asarray(multihost_utils.process_allgather(np.int32(local_signum or 0))).reshape(-1)
    return [(i, int(s)) for i, s in enumerate(got) if s]


LOCK_FILE = "train.lock"


def _try_lock(path: str):
    """``(open file holding an exclusive flock on path, None)`` or ``(None, holder text)``."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process that wrote no pid"
        f.close()
        return None, holder
    return f, None


def _lock_workdir(workdir: str, record: bool = True):
    """Take the exclusive lock of ``workdir`` (``fcntl.flock`` on ``<workdir>/train.lock``).

    The lock lives as long as the returned open file (released by ``close()`` or when the process
    ends, however it ends); with ``record`` the file then holds this process's pid, host and start
    time (without, its content is left as it was). Remote paths (``gs://...``) are not locked
    (returns None).

    Raises:
      WorkdirBusyError: another process holds the lock.
    """
    import socket
    import time

    if "://" in workdir:
        return None
    path = os.path.join(workdir, LOCK_FILE)
    f, holder = _try_lock(path)
    if f is None:
        raise WorkdirBusyError(
            f"{workdir} is in use by another training process ({holder}; it holds the lock {path}); two "
            "trainers must never share a workdir. Wait for it to finish, or stop it (kill -TERM <pid>: it "
            "writes a checkpoint and exits) and rerun to resume, or use another --workdir")
    if not record:
        return f
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    f.flush()
    return f


def workdir_holder(workdir: str) -> str | None:
    """Who holds ``workdir``'s training lock ("pid N on HOST since ..."), or None when it is free
    (or has never been locked). Changes nothing."""
    path = os.path.join(workdir, LOCK_FILE)
    if "://" in workdir or not os.path.isfile(path):
        return None
    try:
        f, holder = _try_lock(path)
    except OSError:
        return None
    if f is not None:
        f.close()
    return holder


# Config fields that may change between runs of one workdir: they leave the training trajectory
# unchanged (execution: remat, layer scan, compute dtype, gradient accumulation, mesh; loop cadence;
# accounting; where the data and its cache live -- the data's content is checked by fingerprint)
# or extend it (train.steps). The NaN policy only acts on a step that would otherwise stop the run.
RESUMABLE_CHANGES = (
    "model.remat", "model.scan_layers", "model.dtype", "model.attention_impl",
    "train.steps", "train.grad_accum", "train.ce_chunk_size", "train.log_every", "train.eval_every", "train.ckpt_every",
    "train.keep_ckpts", "train.nan_policy", "train.max_skipped_steps",
    "data.path", "data.cache_dir", "mesh.*", "distributed.*", "flops.*",
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _resumable(field: str) -> bool:
    return any(field == r or (r.endswith(".*") and field.startswith(r[:-1])) for r in RESUMABLE_CHANGES)


def config_diff(saved: dict, cfg) -> list[tuple[str, Any, Any]]:
    """Fields whose change makes ``cfg`` a different experiment from the ``saved`` config.

    Args:
      saved: a finalized config as stored with a checkpoint (JSON dict).
      cfg: the finalized config of this run (ConfigDict).
    Returns:
      ``[(dotted field, saved value, current value), ...]`` sorted by field, ignoring
      :data:`RESUMABLE_CHANGES`. A field absent from ``saved`` (added to the schema since) counts
      as its default; a field only in ``saved`` (removed since) is ignored.
    """
    from efficient_arch.config import default_config

    now, old = _flat(cfg.to_dict()), _flat(saved)
    defaults = _flat(default_config().to_dict())
    diff = []
    for k in sorted(now):
        if _resumable(k):
            continue
        was = old[k] if k in old else defaults.get(k)
        if _norm(was) != _norm(now[k]):
            diff.append((k, was, now[k]))
    return diff


def _check_compatible(saved: dict | None, cfg, workdir: str = "the workdir") -> None:
    """Refuse to resume when the workdir's checkpoint belongs to a different experiment.

    Raises:
      ConfigError: naming each differing field (``config_diff``) with its checkpoint and current
        value, and the ways out: the original config, a new --workdir, or --overwrite.
    """
    from efficient_arch.config import ConfigError

    if not saved:
        return
    diff = config_diff(saved, cfg)
    if diff:
        detail = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in diff)
        raise ConfigError(
            f"{workdir} holds a different experiment ({detail}). Resume it with its original config, use "
            f"a new --workdir, or pass --overwrite to move it aside to {workdir}.old-<timestamp> and start "
            "fresh (nothing is deleted)")


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def move_aside(workdir: str) -> str | None:
    """Rename an existing, non-empty ``workdir`` to ``<workdir>.old-<YYYYmmdd-HHMMSS>`` (``-2``,
    ``-3``, ... appended if taken) so a fresh run can start there. Nothing is deleted.

    Returns:
      The new path, or None when ``workdir`` does not exist or is empty (nothing to move).
    Raises:
      OSError: the rename failed (e.g. permissions); the workdir is then untouched.
    """
    import time

    workdir = os.path.normpath(workdir)
    if not os.path.isdir(workdir) or not os.listdir(workdir):
        return None
    base = f"{workdir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = base, 1
    while os.path.exists(target):
        n += 1
        target = f"{base}-{n}"
    os.rename(workdir, target)
    return target


def _finished_step(workdir: str) -> int | None:
    """Latest committed checkpoint step of ``workdir`` (None if there is none)."""
    from efficient_arch.checkpoint import committed_steps

    steps = committed_steps(os.path.join(workdir, "checkpoints")) if os.path.isdir(workdir) else []
    return steps[-1] if steps else None


def _data_state(it, info: dict, loop: dict | None = None) -> dict:
    """What the checkpoint stores besides arrays: the data iterator position, the corpus
    identity, and the loop's counters (``skipped_steps``, ``consecutive_skips``)."""
    return {"iterator": it.get_state(), "fingerprint": info.get("fingerprint"), "source": info.get("source"),
            "loop": dict(loop or {})}


def _restore_data(it, data_state: dict, info: dict) -> None:
    """Put the iterator where the checkpoint left it; refuse if the corpus is not the same one.

    Raises:
      ConfigError: the data source or its contents (fingerprint) changed since the checkpoint.
    """
    from efficient_arch.config import ConfigError

    if data_state.get("fingerprint") != info.get("fingerprint"):
        raise ConfigError(
            f"data: the workdir's checkpoint was trained on {data_state.get('source')!r} with fingerprint "
            f"{data_state.get('fingerprint')}, but the configured data is {info.get('source')!r} with "
            f"fingerprint {info.get('fingerprint')}; restore the original data.source/data.path or use "
            "a new --workdir")
    try:
        it.set_state(data_state["iterator"])
    except ValueError as e:
        raise ConfigError(f"data: cannot resume the data iterator ({e}); the data pipeline settings "
                          "(seq_len, batch_size, seed) differ from the checkpoint's: use a new --workdir") from e


def _kept(ckpt) -> str:
    """What the NaN messages say about the checkpoint left to resume from."""
    latest = ckpt.latest_step()
    if latest is None:
        return "no checkpoint was written yet"
    return f"the last committed checkpoint (step {latest}) is kept"


def _nan_fix(*, skip: bool = False, data: bool = False) -> str:
    """The fix a NaN message names: a changed lr / warmup is a different experiment for the workdir."""
    return ("Lower train.lr or raise train.warmup_steps" + (", or check the data" if data else "")
            + ", and rerun with --overwrite (it moves this workdir aside: the workdir refuses a changed lr or "
            "warmup as a different experiment) or with a new --workdir"
            + ("; or set train.nan_policy=skip to skip such steps" if skip else ""))


def _after_resume_note(start_step: int, step: int, verified: bool) -> str:
    """Said when the first step after a resume is non-finite: the restored state is suspect."""
    if start_step == 0 or step != start_step + 1:
        return ""
    if verified:
        return (f". This is the first step after resuming from the step-{start_step} checkpoint, whose arrays "
                "match the checksums recorded when it was saved: the saved state itself (finite, but possibly "
                "exploded by the updates before it) or a changed setting is the likely cause")
    return (f". This is the first step after resuming from the step-{start_step} checkpoint, which has no "
            "save-time checksums (written by an older version) and may be damaged on disk: to resume from "
            "the previous committed step instead, move its folder aside (a non-integer name is ignored)")


def _steps_change_warning(saved: dict, cfg, step: int) -> str | None:
    """Warning when a resumed run changed ``train.steps``: the lr schedule is stretched (or shrunk)."""
    import types

    old = (saved.get("train") or {}).get("steps") if isinstance(saved, dict) else None
    new = int(cfg.train.steps)
    if old is None or int(old) == new:
        return None
    old = int(old)
    t_new = cfg.train
    t_old = types.SimpleNamespace(**{**t_new.to_dict(), "steps": old})
    lr_old, lr_new = float(make_schedule(t_old)(step)), float(make_schedule(t_new)(step))
    end = t_new.lr * t_new.min_lr_ratio
    return (f"warning: train.steps changed from {old} (the checkpoint's) to {new}: the warmup-cosine "
            f"learning-rate schedule is recomputed over {new} steps, so step {step + 1} trains at lr "
            f"{lr_new:.3g} where the original schedule was at {lr_old:.3g}, and the lr then decays to {end:.3g} "
            f"at step {new}. Steps 1-{step} followed the {old}-step schedule, so this is not the run a "
            f"{new}-step schedule from step 0 gives; for that, train from scratch in a new --workdir (or "
            "with --overwrite).")


def evaluate(run: Run, params, batches: list[dict]) -> dict[str, float]:
    """Validation loss (nats/token) and bits per byte over ``batches`` (host numpy batches).

    Bits per byte counts only target tokens that are bytes (id < 256) as bytes, so it is defined
    for byte-level sources; for other tokenizations ``val_bpb`` is None. ``val_accuracy`` (argmax
    == target, a fraction of the masked positions) is reported when the batches carry a
    ``loss_mask`` (the synthetic tasks: accuracy on the answer positions), else None.
    """
    loss_sum, count, correct, n_bytes = 0.0, 0.0, 0.0, 0
    for b in batches:
        gb = parallel.global_batch(b, run.mesh, run.cfg.train.batch_size)
        s, c, k = run.eval_step(params, gb)
        loss_sum += float(s)
        count += float(c)
        correct += float(k)
        n_bytes += int(np.sum(b["targets"] < 256))
    loss = loss_sum / max(count, 1.0)
    byte_level = run.cfg.data.source in ("stdlib", "text")
    n_bytes_global = n_bytes * jax.process_count()
    bpb = loss_sum / math.log(2) / n_bytes_global if byte_level and n_bytes_global else None
    masked = bool(batches) and all("loss_mask" in b for b in batches)
    return {"val_loss": loss, "val_bpb": bpb, "val_accuracy": correct / max(count, 1.0) if masked else None}


def run_training(cfg, workdir: str, *, progress: bool = True, console=None,
                 devices: list | None = None, overwrite: bool = False) -> dict:
    """Train ``cfg`` in ``workdir``, resuming from its latest checkpoint; returns the summary dict.

    Writes ``workdir/metrics.jsonl``, TensorBoard events under ``workdir/tb``, checkpoints under
    ``workdir/checkpoints`` and ``workdir/summary.json``. A checkpoint written on another mesh or
    device count restores onto this one (arrays are resharded on restore).

    Args:
      devices: the devices of the mesh (default: all of ``jax.devices()``); e.g.
        ``jax.devices()[:4]`` to train on a part of the machine.
      overwrite: move an existing workdir aside (:func:`move_aside`, never deleted) and start
        fresh. Without it, a workdir whose checkpoint holds a different experiment
        (:func:`config_diff`) is refused.

    Raises:
      ConfigError: invalid config, data or workdir (before anything compiles, and before
        ``overwrite`` moves anything).
      WorkdirBusyError: another training process holds the workdir's lock (``train.lock``).
      ValueError: incompatible checkpoint config; bad data.
      FloatingPointError: non-finite loss or gradient norm under ``train.nan_policy="stop"``, or
        ``train.max_skipped_steps`` consecutive skipped steps under ``"skip"``, or (``"skip"``)
        every step of this invocation skipped up to ``train.steps``; the message names the step,
        and the last committed checkpoint (never one with non-finite params) is kept.
      CorruptCheckpointError: the latest committed checkpoint cannot be read or its arrays do not
        match their save-time checksums; the message names its folder and the fix (move it aside
        to resume from the previous step). Nothing is deleted and no earlier step is restored
        without being asked.
      SystemExit(128 + N): stopped by signal N (SIGTERM / SIGINT) after writing a checkpoint; with
        several processes, all of them stop at the same step when any one was signalled.
    """
    import signal
    import statistics
    import time

    from efficient_arch import flops as flops_lib
    from efficient_arch import hardware
    from efficient_arch.checkpoint import Checkpointer, read_config, uncommitted_steps
    from efficient_arch.config import ConfigError, finalize
    from efficient_arch.data import make_eval_batches, make_train_iterator, load_source
    from efficient_arch.metrics import MetricsWriter
    from efficient_arch.models.lm import count_params

    finalize(cfg)  # validate before joining a multi-process run (no device needed)
    dist = parallel.init_distributed(cfg)  # before anything touches a device; no-op on one process
    devices = list(jax.devices() if devices is None else devices)
    cfg = finalize(cfg, len(devices))
    t = cfg.train
    is_main = jax.process_index() == 0
    say = (console.print if console is not None else print) if is_main else (lambda *a, **k: None)
    if dist is not None:
        say(f"distributed: process {dist['process_id']} of {dist['num_processes']} ({dist['source']}), "
            f"{jax.local_device_count()} local / {jax.device_count()} global devices")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir!r} is an existing file, not a directory; choose another --workdir")
    saved_cfg = None
    if not overwrite:  # (with --overwrite the old workdir is moved aside below, once all is validated)
        saved_cfg = read_config(workdir)
        _check_compatible(saved_cfg, cfg, workdir)
        done = _finished_step(workdir)
        if done is not None and done >= t.steps:
            say(f"{workdir} is already trained to step {done} (train.steps={t.steps}); nothing to do. "
                "Raise --config.train.steps to continue, or use a new --workdir.")
            summary_path = os.path.join(workdir, "summary.json")
            return json.load(open(summary_path)) if os.path.exists(summary_path) else {"steps": done}

    try:  # bad data path / contents / a corpus too short for one sequence: config-level errors
        source = load_source(cfg)
        it = make_train_iterator(cfg, source, process_index=jax.process_index(),
                                 process_count=jax.process_count())
        eval_batches = make_eval_batches(cfg, source, t.eval_batches, process_index=jax.process_index(),
                                         process_count=jax.process_count())
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data: {e}") from e
    info = source.info
    say(f"data: {info.get('source', cfg.data.source)} {info.get('n_train_tokens', 0):,} train / "
        f"{info.get('n_val_tokens', 0):,} val tokens, fingerprint {info.get('fingerprint')}")
    # the peak is measured before a mesh is in context (the calibration matmul runs on one device)
    peak, peak_src = hardware.peak_flops_for_policy(cfg.model.dtype, cfg.model.quant, override=cfg.flops.peak_flops)
    mesh = parallel.make_mesh(cfg, devices)
    run = build(cfg, mesh)

    # Everything is validated: now (process 0) move an old workdir aside if asked, create the
    # workdir and take its lock, so that no two trainers ever share it.
    lock, problem = None, None
    if is_main:
        try:
            if overwrite and os.path.isdir(workdir) and os.listdir(workdir):
                old = _lock_workdir(workdir, record=False)  # never move a workdir another trainer uses
                try:
                    moved = move_aside(workdir)
                except OSError as e:
                    raise ConfigError(f"--overwrite: could not move {workdir} aside ({e}); nothing was changed. "
                                      "Move or rename it yourself, or choose another --workdir") from e
                finally:
                    if old is not None:
                        old.close()
                say(f"--overwrite: moved the old {workdir} to {moved} (nothing deleted); starting fresh")
            try:
                os.makedirs(workdir, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--workdir={workdir!r} cannot be created ({e}); choose another --workdir") from e
            lock = _lock_workdir(workdir)
        except (ConfigError, WorkdirBusyError) as e:
            problem = e
    if jax.process_count() > 1:  # the others wait for the workdir (and learn if process 0 refused)
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(problem is None)))
        if not ok and problem is None:
            problem = WorkdirBusyError(f"process 0 could not prepare --workdir={workdir!r}; its output says why")
        if problem is None and not is_main:
            os.makedirs(workdir, exist_ok=True)
    if problem is not None:
        raise problem

    try:
        stale = uncommitted_steps(os.path.join(workdir, "checkpoints"))  # orbax removes them on open
        ckpt = Checkpointer(workdir, keep=t.keep_ckpts, save_every=t.ckpt_every)
    except BaseException:
        if lock is not None:  # release the workdir now, not when the file object is collected
            lock.close()
        raise
    stop = _StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    writer = MetricsWriter(workdir, enabled=False)  # the real one once the checkpoint restored
    try:
        with jax.set_mesh(mesh):
            latest = ckpt.latest_step()
            if stale:
                say(f"ignoring never-committed checkpoint folder(s) {', '.join(stale)} in "
                    f"{os.path.join(workdir, 'checkpoints')} (a save cut short, e.g. by kill -9); "
                    + (f"resuming from the last committed step {latest}" if latest is not None
                       else "no committed checkpoint: starting from step 0"))
            loop = {"skipped_steps": 0, "consecutive_skips": 0}
            verified = False
            if latest is not None:
                state, data_state, ckpt_cfg = ckpt.restore(latest, run.abstract_state)
                verified = ckpt.verified
                _restore_data(it, data_state, info)
                loop.update({k: int(v) for k, v in (data_state.get("loop") or {}).items() if k in loop})
                say(f"resumed from step {latest} in {workdir}")
                warning = _steps_change_warning(ckpt_cfg, cfg, latest)
                if warning:
                    say(warning)
            else:
                state = run.init_state()
            writer = MetricsWriter(workdir, enabled=is_main)  # nothing written before the restore worked
            moved = writer.rewind(latest if latest is not None else -1)
            if moved:
                say(f"moved {moved} metrics row(s) logged after step {latest if latest is not None else 0} "
                    "(recomputed now) to metrics.abandoned.jsonl")
            t0 = time.perf_counter()
            lowered = run.train_step.lower(run.abstract_state, run.abstract_batch())
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t0
            xla = flops_lib.xla_flops_per_step(cfg, mesh, lowered)
            ana = flops_lib.analytic_flops(cfg)
            n_dev = len(devices)
            tokens_per_step = t.batch_size * cfg.model.seq_len
            say(f"compiled train step in {compile_s:.1f} s; model FLOPs/step {ana['model_flops_per_step']:.3e} "
                f"({ana['attention_convention']} attention), XLA {xla['xla_flops_per_step']:.3e}; "
                f"peak {peak:.3e} FLOP/s/device ({peak_src})")

            step = int(jax.device_get(state["step"]))
            start_step = step
            run_skips = 0  # skipped steps of this invocation
            if step == 0:  # the starting point of the validation curve
                writer.write(0, evaluate(run, state["params"], eval_batches))
            step_times: list[float] = []
            interval_t, interval_steps = time.perf_counter(), 0
            last_metrics: dict = {}
            val: dict = {}
            bar = _progress(progress and is_main, t.steps, step, console)
            while step < t.steps:
                batch = parallel.global_batch(next(it), mesh, t.batch_size)
                ts = time.perf_counter()
                state, metrics = compiled(state, batch)
                loss, gnorm = (float(metrics[k]) for k in ("loss", "grad_norm"))  # blocks: step done
                step_times.append(time.perf_counter() - ts)
                step += 1
                interval_steps += 1
                bar.update(step)
                if not (math.isfinite(loss) and math.isfinite(gnorm)):
                    what = (f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                            f"(loss {loss}, grad_norm {gnorm}) at step {step}")
                    after_resume = _after_resume_note(start_step, step, verified)
                    if t.nan_policy == "stop":  # never checkpoint NaN params
                        ckpt.wait()
                        bar.close()
                        raise FloatingPointError(
                            f"{what}; nothing from this step was saved and {_kept(ckpt)}. {_nan_fix(skip=True)}"
                            f"{after_resume}")
                    loop["skipped_steps"] += 1  # the jitted step kept the old params and moments
                    loop["consecutive_skips"] += 1
                    run_skips += 1
                    say(f"{what}: update skipped ({loop['consecutive_skips']} in a row, "
                        f"{loop['skipped_steps']} in total; train.nan_policy=skip)")
                    if loop["consecutive_skips"] >= t.max_skipped_steps:
                        ckpt.wait()
                        bar.close()
                        raise FloatingPointError(
                            f"{what}: {loop['consecutive_skips']} consecutive steps skipped "
                            f"(train.max_skipped_steps={t.max_skipped_steps}); stopping. Nothing from the "
                            f"skipped steps was saved and {_kept(ckpt)}. {_nan_fix(data=True)}{after_resume}")
                    if step == t.steps and run_skips == step - start_step:
                        ckpt.wait()
                        bar.close()
                        raise FloatingPointError(
                            f"{what}: every one of the {run_skips} steps run since step {start_step} was skipped "
                            f"(train.nan_policy=skip), so the run reached train.steps={t.steps} without a single "
                            "update; it is not marked finished (no final checkpoint, no summary.json). The "
                            f"parameters are still those of step {start_step}"
                            + (" (the restored checkpoint)" if latest is not None else " (the initialization)")
                            + ": finite, but possibly damaged by an earlier update that overflowed without "
                            "producing a NaN (a checkpoint is only checked to be finite, not healthy). "
                            + _nan_fix() + after_resume)
                else:
                    loop["consecutive_skips"] = 0
                if step % t.log_every == 0 or step == t.steps:
                    now = time.perf_counter()
                    dt = (now - interval_t) / interval_steps
                    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if t.nan_policy == "skip":  # the per-step flag -> the run's running count
                        row.pop("skipped", None)
                        row["skipped_steps"] = loop["skipped_steps"]
                    row.update(tokens_per_s=tokens_per_step / dt, step_time_s=dt,
                               mfu=ana["model_flops_per_step"] / dt / (n_dev * peak))
                    if step % t.eval_every == 0 or step == t.steps:
                        val = evaluate(run, state["params"], eval_batches)
                        row.update(val)
                    writer.write(step, row)
                    last_metrics = row
                    bar.update(step, row)
                    interval_t, interval_steps = time.perf_counter(), 0  # eval/logging excluded
                t_save = time.perf_counter()
                ckpt.save(step, state, _data_state(it, info, loop), cfg.to_dict(), force=step == t.steps)
                interval_t += time.perf_counter() - t_save  # checkpointing excluded from tokens/s
                stopping = _agree_stop(stop.signum)  # every process, every step: the same answer
                if stopping:
                    ckpt.save(step, state, _data_state(it, info, loop), cfg.to_dict(), force=True)
                    ckpt.wait()
                    bar.close()
                    signum = stopping[0][1]
                    name = signal.Signals(signum).name
                    who = "" if jax.process_count() == 1 else (
                        " (received by process " + ", ".join(str(p) for p, _ in stopping) + "; every process stopped "
                        "at this step)")
                    say(f"stopped by signal {signum} ({name}){who} at step {step}; checkpoint written. "
                        "Rerun the same command to resume.")
                    raise SystemExit(128 + signum)
            bar.close()
            ckpt.wait()
            if not val:
                val = evaluate(run, state["params"], eval_batches)
    finally:
        writer.close()
        ckpt.close()  # waits for a save in flight: still under this loop's signal handler
        if lock is not None:
            lock.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    warm = step_times[2:] or step_times
    step_time = statistics.median(warm) if warm else float("nan")
    mem = hardware.memory_analysis_bytes(compiled)
    counts = count_params(cfg.model)
    summary = {
        **counts,
        "tokens_per_step": tokens_per_step,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_step / step_time,
        "model_flops_per_step": ana["model_flops_per_step"],
        "attention_flops_convention": ana["attention_convention"],
        "hardware_flops_per_step": ana["hardware_flops_per_step"],
        "xla_flops_per_step": xla["xla_flops_per_step"],
        "xla_flops_raw": xla["xla_flops_raw"],
        "xla_flops_correction": xla["correction"],
        "xla_vs_analytic_hardware": xla["xla_flops_per_step"] / ana["hardware_flops_per_step"],
        "peak_flops_per_s": peak,
        "peak_flops_source": peak_src,
        "precision": describe_precision(cfg.model, jax.devices()[0].platform),
        "mfu": ana["model_flops_per_step"] / step_time / (n_dev * peak),
        "hfu": ana["hardware_flops_per_step"] / step_time / (n_dev * peak),
        "device_kind": jax.devices()[0].device_kind,
        "n_devices": n_dev,
        "compile_time_s": compile_s,
        "compiled_memory_bytes": mem,
        "steps": step,
        "final_train_loss": last_metrics.get("loss"),
        "final_val_loss": val.get("val_loss"),
        "val_bpb": val.get("val_bpb"),
        "val_accuracy": val.get("val_accuracy"),
        "skipped_steps": loop["skipped_steps"],
        "data": {k: v for k, v in info.items() if isinstance(v, (int, float, str, type(None)))},
    }
    if loop["consecutive_skips"]:  # the run ended inside a streak of skipped steps: say so
        n = loop["consecutive_skips"]
        summary["warning"] = (
            f"the last {n} step(s) were skipped (non-finite loss or gradient norm, train.nan_policy=skip): "
            f"the final parameters are those of step {step - n}, and the streak might have continued")
        say(f"WARNING: {summary['warning']}")
    if summary["mfu"] > 1 or summary["hfu"] > 1:  # never report >100% silently
        summary["accounting_error"] = (
            f"MFU {summary['mfu']:.1%} / HFU {summary['hfu']:.1%} exceed 100%: the peak "
            f"({peak:.3e} FLOP/s, {peak_src}) or the FLOP count is wrong; pass the right "
            "--config.flops.peak_flops")
        say(f"ACCOUNTING ERROR: {summary['accounting_error']}")
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


class _progress:
    """rich progress bar showing loss / tokens/s / MFU; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, start: int, console):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[info]}"), console=console, transient=False)
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, row: dict | None = None):
        if not self.enabled:
            return
        if row is None:
            self.p.update(self.task, completed=step)
            return
        info = f"loss {row['loss']:.3f}  {row['tokens_per_s']:,.0f} tok/s  MFU {100 * row['mfu']:.1f}%"
        if row.get("val_bpb") is not None:
            info += f"  val bpb {row['val_bpb']:.3f}"
        if row.get("val_accuracy") is not None:
            info += f"  val acc {100 * row['val_accuracy']:.1f}%"
        self.p.update(self.task, completed=step, info=info)

    def close(self):
        if self.enabled:
            self.p.stop()
            self.enabled = False
