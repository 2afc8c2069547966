"""Device mesh, logical-axis rules and shardings: the only module that names mesh axes.

The mesh has four axes, ``("data", "fsdp", "tensor", "expert")``, all ``AxisType.Auto`` so that
``jax.jit`` with ``NamedSharding`` in/out shardings lets GSPMD propagate the rest. Parameters
and activations carry *logical* axis names; :data:`RULES` maps each logical name to mesh axes:

    batch  -> (data, fsdp, expert)   data parallelism (fsdp and expert also split the batch)
    embed  -> fsdp                    parameters' model dimension: ZeRO-3 style sharding
    heads, kv_heads, mlp, vocab -> tensor   Megatron-style tensor parallelism
    expert -> expert                  expert parallelism (MoE)
    act_batch_exp, act_expert         MoE dispatch buffer: batch over (data, fsdp), experts over expert
    layers, head_dim, seq, act_embed -> replicated

Activations use ``act_*`` names so that their model dimension is not sharded over fsdp.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from efficient_arch.config import MESH_AXES, mesh_shape

RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
    "layers": None,
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    # MoE dispatch buffer [B, E, C, d]: batch over the data axes only, experts over "expert"
    # (the token -> expert reshuffle between the two layouts is GSPMD's all-to-all)
    "act_batch_exp": ("data", "fsdp"),
    "act_expert": ("expert",),
}


def make_mesh(cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the ``(data, fsdp, tensor, expert)`` mesh from ``cfg.mesh`` sizes (-1 = the rest).

    Raises ConfigError (from :func:`efficient_arch.config.mesh_shape`) when sizes do not match the
    device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                             devices=devices)
    except Exception:  # odd device counts where make_mesh cannot find a topology-aware layout
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                    axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None]) -> P:
    """Map logical axis names to a ``PartitionSpec`` with :data:`RULES` (unknown names raise)."""
    out = []
    for n in names:
        if n is None:
            out.append(None)
            continue
        if n not in RULES:
            raise KeyError(f"logical axis {n!r} has no rule in parallel.RULES; add one")
        axes = RULES[n]
        out.append(None if axes is None else (axes[0] if len(axes) == 1 else axes))
    return P(*out)


def _names_of(x) -> tuple:
    meta = x.get_metadata() if hasattr(x, "get_metadata") else {}
    names = meta.get("out_sharding") or ()
    return tuple(names) if names else (None,) * len(x.shape)


def state_specs(state):
    """PartitionSpecs for an ``nnx.State`` (or pure dict of Variables) from their logical names."""
    from flax import nnx

    return jax.tree.map(lambda v: logical_to_spec(_names_of(v)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def named(mesh: Mesh, spec_tree):
    """Turn a pytree of PartitionSpecs into NamedShardings on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree,
                        is_leaf=lambda x: isinstance(x, P))


def batch_spec() -> P:
    """Spec of a ``[B, T]`` token batch: batch split over data-parallel axes, sequence replicated."""
    return logical_to_spec(("batch", "seq"))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names under the current mesh; no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> dict[str, jax.Array]:
    """Assemble this process's rows into global ``[global_batch_size, ...]`` arrays on ``mesh``.

    Each process passes only its own contiguous rows (``process_index * local_B``...), as the
    data pipeline yields them; works unchanged on one host and on many.
    """
    sharding = NamedSharding(mesh, batch_spec())
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
            for k, v in local.items()}
