"""Train state, the one train step shared by every architecture, the eval step and the loop.

The state is a plain pytree ``{"step": int32[], "params": dict, "opt_state": optax state,
"rng": uint32[2]}`` with every leaf sharded by the rules in ``parallel.py`` (optimizer moments
like their parameters). ``train_step(state, batch) -> (state, metrics)`` is a ``jax.jit`` with
explicit in/out shardings and the state donated; it never asks which mixer or FFN the model has:
it adds whatever ``aux["aux_loss"]`` the model reports to the cross-entropy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efficient_arch import parallel
from efficient_arch.models.lm import new_model

NO_DECAY_NAMES = ("scale", "bias")  # RMSNorm scales and biases are not weight-decayed


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
      train_step: jitted ``(state, batch) -> (state, metrics)`` with the state donated.
      eval_step: jitted ``(params, batch) -> (loss_sum, n_tokens)``.
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

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shape of one global batch: int32 ``[batch_size, seq_len]`` inputs and targets."""
        shape = (self.cfg.train.batch_size, self.cfg.model.seq_len)
        s = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
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

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        logits, aux = model(batch["inputs"], segment_ids=batch.get("segment_ids"))
        loss_sum, count = cross_entropy(logits, batch["targets"], batch.get("loss_mask"))
        ce = loss_sum / jnp.maximum(count, 1.0)
        total = ce + aux.get("aux_loss", 0.0)
        return total, {"loss": ce, **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def microbatches(batch):
        # microbatch j = rows j, j+accum, ...: each device keeps its own rows (no resharding)
        def split(x):
            x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
            return parallel.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
        return jax.tree.map(split, batch)

    def step_fn(state, batch):
        params = state["params"]
        if accum == 1:
            (_, metrics), grads = grad_fn(params, batch)
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)

            def body(carry, mb):
                g_acc, m_acc = carry
                (_, m), g = grad_fn(params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

            _, m0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], microbatches(batch)))[0]
            m_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
            (grads, msum), _ = jax.lax.scan(body, (zeros, m_zero), microbatches(batch))
            grads = jax.tree.map(lambda g: g / accum, grads)
            metrics = jax.tree.map(lambda m: m / accum, msum)  # means over microbatches
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state["step"])}
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}
        return new_state, metrics

    def eval_fn(params, batch):
        model = nnx.merge(graphdef, params)
        logits, _ = model(batch["inputs"], segment_ids=batch.get("segment_ids"))
        return cross_entropy(logits, batch["targets"], batch.get("loss_mask"))

    replicated = NamedSharding(mesh, P())
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_step = jax.jit(eval_fn, in_shardings=(state_shardings["params"], batch_sharding),
                        out_shardings=(replicated, replicated))
    init_state = jax.jit(init_fn, out_shardings=state_shardings)
    loss_and_grad = jax.jit(grad_fn, in_shardings=(state_shardings["params"], batch_sharding))
    return Run(cfg=cfg, mesh=mesh, graphdef=graphdef, tx=tx, schedule=schedule,
               abstract_state=abstract_state, state_shardings=state_shardings,
               batch_sharding=batch_sharding, train_step=train_step, eval_step=eval_step,
               init_state=init_state, loss_and_grad=loss_and_grad)
