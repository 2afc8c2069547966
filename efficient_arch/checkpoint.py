"""Checkpoints of a run: a thin wrapper over orbax's ``CheckpointManager``.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}``, one folder per
committed step, with three items:

* ``state``  -- any pytree of jax arrays (params, optimizer state, step, RNG
  key data), possibly sharded; saved with ``ocp.args.StandardSave``;
* ``data``   -- JSON dict: the data-iterator state;
* ``config`` -- JSON dict: the run config.

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp`` (older
versions: ``<step>.orbax-checkpoint-tmp-<timestamp>``) and renames it to
``<step>`` only when every item is written (on GCS it writes the final folder
and a ``commit_success.txt`` marker instead). ``committed_steps`` and
``Checkpointer.latest_step`` list only folders whose name is a plain integer
and that orbax itself deems finalized, so a save cut short by preemption is
never picked up on resume.

Integrity: ``save`` records a checksum of every array of the state in the ``data`` item
(``state_checksums``: a position-weighted sum of the array's bit patterns modulo 2^32, computed on
the devices, independent of the sharding), and ``restore`` recomputes it on the restored arrays:
array data changed after the save (bytes flipped in place, a bad copy) is reported as a
:class:`CorruptCheckpointError` instead of being trained on. Truncated or unreadable files,
broken metadata and missing items fail in orbax / tensorstore and are reported the same way. Not
covered: the JSON items (``data``, ``config``) are only checked to parse as JSON objects, and
checkpoints written before checksums existed are restored unchecked.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer", "CorruptCheckpointError", "WorkdirBusyError", "committed_steps", "uncommitted_steps", "read_config",
           "state_checksums", "CHECKPOINT_SUBDIR"]

CHECKPOINT_SUBDIR = "checkpoints"
_ITEMS = ("state", "data", "config")
CHECKSUM_KEY = "state_checksums"  # in the data item: leaf path -> {"dtype", "shape", "sum"}


class WorkdirBusyError(RuntimeError):
    """Another training process holds the workdir's lock (``train.lock``, taken by
    ``efficient_arch.train.run_training``); the message names its pid."""


class CorruptCheckpointError(RuntimeError):
    """A committed checkpoint folder cannot be read (corrupt, truncated or missing items).

    The message names the step folder, the underlying error and the fix (move the folder aside
    to resume from the previous committed step). The folder is never deleted or moved by this
    code, and no earlier step is restored silently.

    Attributes:
      path: the step folder (str); step: its step (int); earlier: committed steps before it.
    """

    def __init__(self, path: str, step: int, earlier: list[int], cause: BaseException):
        self.path, self.step, self.earlier = str(path), int(step), list(earlier)
        root, seen = cause, set()  # the innermost error says what is wrong (orbax wraps tensorstore's)
        while root.__cause__ is not None and id(root) not in seen:
            seen.add(id(root))
            root = root.__cause__
        text = (str(root).strip().splitlines() or [""])[0]
        why = f"{type(root).__name__}: {text[:400]}"
        aside = f"mv {self.path} {self.path}.corrupt"
        if self.earlier:
            fix = (f"to resume from the previous committed step {self.earlier[-1]}, move the folder aside "
                   f"({aside}; a non-integer name is ignored, and it is kept for inspection)")
        else:
            fix = (f"there is no earlier committed checkpoint: move the folder aside ({aside}) to start "
                   "from step 0, or use a new --workdir")
        super().__init__(
            f"checkpoint {self.path} (step {self.step}) is corrupt or truncated and cannot be read ({why}). "
            f"Nothing was deleted, and no earlier step is restored automatically; {fix}, or put back an "
            "intact copy of that folder.")


def _ckpt_dir(workdir: str | os.PathLike) -> epath.Path:
    """``<workdir>/checkpoints``; local paths made absolute (orbax refuses relative ones)."""
    path = str(workdir)
    if "://" not in path:
        path = os.path.abspath(path)
    return epath.Path(path) / CHECKPOINT_SUBDIR


def _is_finalized(path: epath.Path) -> bool:
    """Orbax's own "committed" test (tmp suffix locally, commit file on GCS)."""
    check = getattr(getattr(ocp, "step", None), "is_path_finalized", None)
    if check is None:  # very old / very new orbax without the helper
        return True
    try:
        return bool(check(path))
    except Exception:  # noqa: BLE001 - an unreadable folder is not a checkpoint
        return False


def committed_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
    """Sorted steps of the committed checkpoints directly under ``checkpoint_dir``.

    A step counts only if its folder name is a plain non-negative integer (this
    excludes orbax's uncommitted ``<step>.orbax-checkpoint-tmp[-<ts>]``
    folders) and orbax's ``step.is_path_finalized`` accepts it.

    Args:
      checkpoint_dir: the folder holding step folders (``<workdir>/checkpoints``).

    Returns:
      Ascending list of int steps; [] if the folder does not exist.
    """
    directory = epath.Path(checkpoint_dir)
    if not directory.exists():
        return []
    steps = []
    for p in directory.iterdir():
        if p.name.isdigit() and p.is_dir() and _is_finalized(p):
            steps.append(int(p.name))
    return sorted(steps)


def uncommitted_steps(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Names of step folders under ``checkpoint_dir`` that were never committed, sorted.

    These are what a save cut short leaves (``kill -9`` or a crash during an asynchronous save):
    orbax's ``<step>.orbax-checkpoint-tmp[-<ts>]`` folders, or an integer-named folder orbax does
    not deem finalized. They are never restored; orbax removes the tmp folders when the next
    ``Checkpointer`` opens the directory.

    Returns:
      Folder names (not paths); [] if the folder does not exist.
    """
    directory = epath.Path(checkpoint_dir)
    if not directory.exists():
        return []
    out = []
    for p in directory.iterdir():  # other names (e.g. a corrupt step moved to "8.corrupt") are left alone
        tmp = p.name.split(".")[0].isdigit() and ".orbax-checkpoint-tmp" in p.name
        if p.is_dir() and (tmp or (p.name.isdigit() and not _is_finalized(p))):
            out.append(p.name)
    return sorted(out, key=lambda n: (int(n.split(".")[0]), n))


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 checksum of one array: sum over elements of (bit pattern x odd position weight) mod 2^32.

    Every weight is odd (invertible modulo 2^32), so any change of a single element changes the
    sum; elements moved to other positions change it too (different weights). Integer sums are
    exact, so the value does not depend on the sharding or the reduction order.
    """
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    w = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8-byte: a trailing axis of 2
    weight = jnp.ones(w.shape, jnp.uint32)
    for d in range(w.ndim):  # no reshape: keeps the array's sharding
        i = jax.lax.broadcasted_iota(jnp.uint32, w.shape, d)
        weight = weight * (i * jnp.uint32((0x9E3779B1 * 2 * (d + 1)) & 0xFFFFFFFF) + jnp.uint32(1))
    return jnp.sum(w * weight, dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


def state_checksums(state: Any) -> dict[str, dict]:
    """Per-leaf checksums of a state pytree, as stored in a checkpoint's ``data`` item.

    One jitted pass over the arrays on their devices (a collective when they span processes, so
    every process must call it, as every process calls ``save``).

    Returns:
      ``{leaf path: {"dtype": str, "shape": list, "sum": int}}`` for every array leaf of a
      supported dtype (1, 2, 4 or 8 bytes per element).
    """
    paths, leaves = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if isinstance(leaf, (int, float, bool)):
            continue
        if not isinstance(leaf, jax.Array):
            leaf = jnp.asarray(leaf)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if leaf.dtype.itemsize not in (1, 2, 4, 8):
            continue
        paths.append(jax.tree_util.keystr(path))
        leaves.append(leaf)
    sums = _checksums_jit(leaves) if leaves else []
    return {p: {"dtype": str(x.dtype), "shape": list(x.shape), "sum": int(np.asarray(s.addressable_data(0)))}
            for p, x, s in zip(paths, leaves, sums)}


def _checksum_mismatches(recorded: Mapping[str, Any], state: Any) -> list[str]:
    """Leaves whose checksum differs from ``recorded`` (leaves whose dtype or shape changed, or
    that were not recorded, are not compared)."""
    now = state_checksums(state)
    bad = []
    for path, rec in recorded.items():
        got = now.get(path)
        if (got is None or not isinstance(rec, Mapping) or rec.get("dtype") != got["dtype"]
                or list(rec.get("shape", [])) != got["shape"]):
            continue
        if int(rec.get("sum", -1)) != got["sum"]:
            bad.append(path)
    return bad


class ChecksumMismatch(ValueError):
    """Restored array data differs from what was saved (the files changed after the save)."""


def check_checksums(recorded: Mapping[str, Any], state: Any, what: str = "array(s)") -> None:
    """Compare ``state`` (a restored pytree, or a subtree such as ``{"params": ...}``) with the
    checksums recorded at save time; leaves absent from either side are not compared.

    Raises:
      ChecksumMismatch: naming the first differing leaf and how many differ.
    """
    bad = _checksum_mismatches(recorded, state)
    if bad:
        raise ChecksumMismatch(
            f"the data of {len(bad)} {what} does not match the checksums recorded when this step was "
            "saved, so its files changed after the save (bytes flipped on disk, an in-place edit, a "
            f"bad copy): {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))


def _to_abstract(leaf: Any) -> Any:
    """A restore target leaf: ShapeDtypeStruct with a concrete sharding."""
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


def _check_abstract(abstract_state: Any) -> Any:
    abstract_state = jax.tree.map(_to_abstract, abstract_state)
    missing = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)
        if isinstance(leaf, jax.ShapeDtypeStruct) and getattr(leaf, "sharding", None) is None
    ]
    if missing:
        raise ValueError(
            "restore needs a sharding on every jax.ShapeDtypeStruct of abstract_state "
            f"(e.g. from nnx.get_abstract_model under the mesh); missing at: {missing[:5]}"
            + (" ..." if len(missing) > 5 else "")
        )
    return abstract_state


class Checkpointer:
    """Save / restore run state to ``<workdir>/checkpoints`` with orbax.

    Args:
      workdir: the run folder (local path or any path etils.epath understands,
        e.g. gs://...). Checkpoints go to ``<workdir>/checkpoints``.
      keep: number of most recent checkpoints kept (older ones are deleted);
        >= 1.
      save_every: ``save`` writes only at steps that are multiples of this
        (unless ``force``); >= 1.
      async_save: save in a background thread (default True); ``wait()`` blocks
        until it is committed.

    Raises:
      ValueError: keep or save_every < 1.

    Use as a context manager (or call ``close()``) so pending async saves are
    committed before the process exits.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int,
        save_every: int,
        async_save: bool = True,
    ):
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if int(save_every) < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.keep = int(keep)
        self.save_every = int(save_every)
        self.directory = _ckpt_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            create=True,
            # Remove leftovers of saves cut short by a previous preemption.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )
        self._closed = False
        self.verified = False  # did the last restore compare the recorded checksums

    # -- saving ---------------------------------------------------------------
    def should_save(self, step: int, *, force: bool = False) -> bool:
        """True if ``save(step, ..., force=force)`` would write a checkpoint."""
        step = int(step)
        if step in self._manager.all_steps():
            return False
        return force or step % self.save_every == 0

    def save(
        self,
        step: int,
        state: Any,
        data_state: Mapping[str, Any],
        config: Mapping[str, Any],
        *,
        force: bool = False,
    ) -> bool:
        """Start saving a checkpoint for ``step`` (async; see ``wait``).

        Args:
          step: training step (int >= 0), the folder name.
          state: pytree of jax arrays (any sharding) / numpy arrays / scalars;
            typed PRNG keys and their uint32 ``jax.random.key_data`` both work.
          data_state: JSON-serializable dict (data-iterator state).
          config: JSON-serializable dict (the run config).
          force: save even if ``step`` is not a multiple of ``save_every``
            (e.g. the final step, or on preemption).

        Returns:
          True if a save was started; False if skipped (not a multiple of
          save_every and not forced, or this step is already saved).

        Raises:
          RuntimeError: after ``close()``.
          ValueError: negative step.
        """
        if self._closed:
            raise RuntimeError("Checkpointer is closed")
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not self.should_save(step, force=force):
            return False
        data_state = {**dict(data_state), CHECKSUM_KEY: state_checksums(state)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(dict(config)),
        )
        # Our own save_every policy decided; force=True keeps orbax's interval
        # policy from second-guessing it.
        return bool(self._manager.save(step, args=args, force=True))

    def reached_preemption(self, step: int) -> bool:
        """True once a preemption notice reached all hosts (orbax's signal);
        the loop should then ``save(step, ..., force=True)``, ``wait()`` and exit."""
        return bool(self._manager.reached_preemption(int(step)))

    def wait(self) -> None:
        """Block until pending async saves are committed to disk."""
        self._manager.wait_until_finished()

    # -- reading --------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending (in-flight async saves excluded)."""
        return committed_steps(self.directory)

    def latest_step(self) -> int | None:
        """Latest committed step on disk, or None.

        Uncommitted tmp folders are never chosen. An async save still in flight
        is not counted until committed: call ``wait()`` first to include it.
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(
        self, step: int | None, abstract_state: Any, *, verify: bool = True
    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restore ``(state, data_state, config)`` of a committed checkpoint.

        Args:
          step: step to restore; None -> ``latest_step()``.
          abstract_state: pytree matching the saved state, of
            ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (concrete
            shardings, e.g. NamedSharding) or jax arrays (their shardings are
            used). Restored arrays come back with exactly these shardings and
            dtypes.
          verify: compare the restored arrays with the checksums recorded at save time
            (checkpoints written before checksums existed are not checked).

        Returns:
          (state pytree of jax arrays, data_state dict as saved, config dict).
          ``self.verified`` is then True when the checksums were compared (False: not asked, or
          a checkpoint without checksums).

        Raises:
          FileNotFoundError: no committed checkpoint (or not that step).
          ValueError: a ShapeDtypeStruct leaf without a sharding.
          CorruptCheckpointError: unreadable, truncated or missing items, or array data that
            does not match its recorded checksums.
        """
        if self._closed:
            raise RuntimeError("Checkpointer is closed")
        self.wait()  # a save of this process may still be in flight
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
            step = steps[-1]
        step = int(step)
        if step not in steps:
            raise FileNotFoundError(
                f"no committed checkpoint for step {step} in {self.directory} (have {steps})"
            )
        abstract_state = _check_abstract(abstract_state)
        self._manager.reload()  # pick up steps committed by other processes
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore(),
                ),
            )
            if not isinstance(restored["data"], Mapping) or not isinstance(restored["config"], Mapping):
                raise ValueError("the data or config item is not a JSON object")
            data = dict(restored["data"])
            recorded = data.pop(CHECKSUM_KEY, None)
            self.verified = bool(verify and isinstance(recorded, Mapping))
            if self.verified:
                check_checksums(recorded, restored["state"])
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore / json raise many types
            raise CorruptCheckpointError(self.directory / str(step), step,
                                         [s for s in steps if s < step], e) from e
        return restored["state"], data, dict(restored["config"])

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Wait for pending saves and release orbax's threads. Idempotent."""
        if self._closed:
            return
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()
            self._closed = True

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_config(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The run config stored with the latest committed checkpoint, or None.

    Reads only the JSON ``config`` item; no arrays are restored.

    Args:
      workdir: the run folder (checkpoints under ``<workdir>/checkpoints``).

    Returns:
      The config dict, or None when there is no committed checkpoint.

    Raises:
      CorruptCheckpointError: the latest step's config item is missing or not valid JSON.
    """
    directory = _ckpt_dir(workdir)
    steps = committed_steps(directory)
    if not steps:
        return None
    # Composite layout: <step>/<item>/; read the JSON item with its own handler.
    reader = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    try:
        config = reader.restore(directory / str(steps[-1]) / "config", args=ocp.args.JsonRestore())
        if not isinstance(config, Mapping):
            raise ValueError("the config item is not a JSON object")
        return dict(config)
    except Exception as e:  # noqa: BLE001
        raise CorruptCheckpointError(directory / str(steps[-1]), steps[-1], steps[:-1], e) from e
    finally:
        reader.close()
