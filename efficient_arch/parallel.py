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
import os
from typing import Mapping, Sequence

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


# ----------------------------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------------------------

DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    from efficient_arch.config import ConfigError

    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: must be an integer (unset it or fix it)") from None


def detect_cluster(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """A multi-process launcher JAX can auto-configure from, as ``(name, process count)``.

    Recognized from environment variables alone (no network): SLURM inside an ``srun`` step
    (``SLURM_NTASKS``), Open MPI (``OMPI_COMM_WORLD_SIZE``) and multi-host Cloud TPU / GKE
    (``TPU_WORKER_HOSTNAMES``, one host name per process). Returns None when none is present or
    it reports a single process.
    """
    environ = os.environ if environ is None else environ
    found = None
    if "SLURM_STEP_ID" in environ and environ.get("SLURM_NTASKS", "").isdigit():
        found = ("SLURM", int(environ["SLURM_NTASKS"]))
    elif environ.get("OMPI_COMM_WORLD_SIZE", "").isdigit():
        found = ("Open MPI", int(environ["OMPI_COMM_WORLD_SIZE"]))
    elif environ.get("TPU_WORKER_HOSTNAMES"):
        found = ("Cloud TPU", len([h for h in environ["TPU_WORKER_HOSTNAMES"].split(",") if h.strip()]))
    return found if found is not None and found[1] > 1 else None


def distributed_settings(cfg, environ: Mapping[str, str] | None = None) -> dict | None:
    """Resolve whether and how this process joins a multi-process (multi-host) JAX run.

    Each of coordinator address, process count and process id comes from ``cfg.distributed``,
    else from ``$JAX_COORDINATOR_ADDRESS`` / ``$JAX_NUM_PROCESSES`` / ``$JAX_PROCESS_ID``; what is
    still unset is left to ``jax.distributed.initialize``'s cluster auto-detection. With none of
    them set, a launcher found by :func:`detect_cluster` (``distributed.auto_detect``) starts a
    fully auto-detected run.

    Returns:
      ``{"coordinator_address", "num_processes", "process_id", "initialization_timeout",
      "source"}`` (values may be None = auto-detect; ``source`` says where they came from), or
      None for a single-process run (nothing set, or ``num_processes=1``).
    Raises:
      ConfigError: an environment variable that is not an integer, or a process id outside
        ``[0, num_processes)``.
    """
    from efficient_arch.config import ConfigError

    environ = os.environ if environ is None else environ
    di = cfg.distributed
    addr = di.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
    n = di.num_processes if di.num_processes is not None else _env_int(environ, "JAX_NUM_PROCESSES")
    pid = di.process_id if di.process_id is not None else _env_int(environ, "JAX_PROCESS_ID")
    source = "config.distributed / JAX_* environment variables"
    if addr is None and n is None and pid is None:
        cluster = detect_cluster(environ) if di.auto_detect else None
        if cluster is None:
            return None
        source = f"{cluster[0]} environment ({cluster[1]} processes, auto-detected by JAX)"
    elif n == 1 and not pid:
        return None
    if n is not None and n < 1:
        raise ConfigError(f"distributed.num_processes / JAX_NUM_PROCESSES={n}: must be a positive integer")
    if pid is not None and (pid < 0 or (n is not None and pid >= n)):
        raise ConfigError(f"distributed.process_id / JAX_PROCESS_ID={pid}: must lie in [0, num_processes"
                          + (f"={n})" if n is not None else ")") + "; give each process its own id 0 .. N-1")
    return {"coordinator_address": addr, "num_processes": n, "process_id": pid,
            "initialization_timeout": int(di.timeout_s), "source": source}


def init_distributed(cfg, environ: Mapping[str, str] | None = None) -> dict | None:
    """Join the multi-process run described by :func:`distributed_settings` (call it before
    anything touches a JAX device; a no-op for single-process runs or when already initialized).

    Afterwards ``jax.devices()`` lists every process's devices, ``jax.process_index()`` is this
    process's id; each process then loads only its rows of each global batch and process 0 alone
    writes logs and the summary (``train.run_training``); checkpoints are written and restored by
    all processes together (orbax).

    Returns:
      The settings used (with the resolved ``process_id`` / ``num_processes``), or None when
      nothing was initialized.
    Raises:
      ConfigError: bad settings, JAX's backends already started, or the processes did not all
        connect within ``distributed.timeout_s`` (the message names the coordinator and the
        variables to check).
    """
    from efficient_arch.config import ConfigError

    import sys

    settings = distributed_settings(cfg, environ)
    if settings is None or jax.distributed.is_initialized():
        return None
    addr, n, pid = settings["coordinator_address"], settings["num_processes"], settings["process_id"]
    timeout = settings["initialization_timeout"]
    if addr is None and detect_cluster(environ) is None:
        raise ConfigError(f"distributed: {n or '?'} processes requested but no coordinator: set "
                          "distributed.coordinator_address (or $JAX_COORDINATOR_ADDRESS) to 'host:port' of process 0, "
                          "the same on every process")
    if addr is not None and pid not in (None, 0):  # fail clearly instead of XLA's fatal abort
        _wait_for_coordinator(addr, timeout)
    print(f"distributed: process {pid if pid is not None else '?'} of {n or '?'} joining via coordinator {addr or '(auto)'}; "
          f"waiting up to {timeout} s for every process (an abort with DEADLINE_EXCEEDED ... RegisterTask means "
          "not all of them started or reached the coordinator)", file=sys.stderr, flush=True)
    kwargs = {k: v for k, v in settings.items() if k != "source"}
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - JAX raises ValueError / RuntimeError / XlaRuntimeError
        text = (str(e).strip().splitlines() or [""])[0][:400].rstrip(".")
        raise ConfigError(
            f"distributed: could not join the multi-process run from the {settings['source']} "
            f"(coordinator {settings['coordinator_address']}, {settings['num_processes']} processes, this is "
            f"process {settings['process_id']}): {type(e).__name__}: {text}. Check that every process got "
            "the same coordinator address and process count and its own process id, that process 0 is "
            f"reachable, and that all started within distributed.timeout_s={settings['initialization_timeout']} s; "
            "JAX must not have touched a device before (run through `efficient-arch train`)") from e
    return {**settings, "process_id": jax.process_index(), "num_processes": jax.process_count()}


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Block until ``host:port`` accepts TCP connections (process 0 is up), at most ``timeout_s``.

    Raises:
      ConfigError: not reachable in time, naming the address.
    """
    import socket
    import time

    from efficient_arch.config import ConfigError

    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"distributed: the coordinator {address} (process 0) was not reachable within "
                    f"distributed.timeout_s={timeout_s} s ({e}); start process 0, check the address and port "
                    "(distributed.coordinator_address / $JAX_COORDINATOR_ADDRESS) and the network") from None
            time.sleep(0.5)


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
