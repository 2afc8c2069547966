"""grain pipelines turning a token stream into fixed-length LM batches.

Examples are windows of ``seq_len + 1`` tokens taken at stride ``seq_len`` over a split's stream::

    window i = stream[i * seq_len : i * seq_len + seq_len + 1]      i = 0 .. n_windows - 1
    inputs   = window[:-1],  targets = window[1:]                    (int32[seq_len] each)

so consecutive windows share one token (the last target of window i is the first input of window
i + 1) and every token of the stream is predicted at most once per epoch.

Training order: the window indices ``0..n_windows-1`` are shuffled with ``train.seed`` (grain's
``MapDataset.shuffle``), repeated forever with a different shuffle each epoch (grain folds the epoch
into the seed), and cut into *global* batches of ``train.batch_size`` consecutive indices (a batch may
straddle an epoch boundary). Global batch ``k`` is therefore a function of (stream, seq_len,
batch_size, seed, k) only; process ``p`` of ``P`` loads rows ``[p * B/P, (p+1) * B/P)`` of it. The
iterator state is the next global batch index, so a state saved under one process count restores
under another.
"""

from __future__ import annotations

import grain
import numpy as np

from efficient_arch.data.sources import Source


def n_windows(stream: np.ndarray, seq_len: int) -> int:
    """Number of complete ``seq_len + 1`` windows at stride ``seq_len`` in a 1-D stream."""
    return max((len(stream) - 1) // seq_len, 0)


def window(stream: np.ndarray, index: int, seq_len: int) -> np.ndarray:
    """Window ``index`` of ``stream``: ``int32[seq_len + 1]`` = ``stream[i*T : i*T + T + 1]``.

    Raises:
      IndexError: if the window is not complete.
    """
    if not 0 <= index < n_windows(stream, seq_len):
        raise IndexError(f"window {index} out of range [0, {n_windows(stream, seq_len)})")
    start = index * seq_len
    return np.asarray(stream[start:start + seq_len + 1], dtype=np.int32)


def gather_batch(stream: np.ndarray, indices, seq_len: int) -> dict[str, np.ndarray]:
    """Load windows ``indices`` (int[n]) into ``{"inputs": int32[n, T], "targets": int32[n, T]}``."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    out = np.empty((len(idx), seq_len + 1), dtype=np.int32)
    for r, i in enumerate(idx):
        start = int(i) * seq_len
        out[r] = stream[start:start + seq_len + 1]  # contiguous read from the memmap
    return {"inputs": np.ascontiguousarray(out[:, :-1]), "targets": np.ascontiguousarray(out[:, 1:])}


def _local_rows(cfg, process_index: int, process_count: int) -> tuple[int, int, int]:
    """(global_batch, lo, hi): this process's row range of each global batch."""
    gb = cfg.train.batch_size
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    if gb < 1:
        raise ValueError(f"config.train.batch_size={gb}: must be a positive number of sequences")
    if gb % process_count:
        raise ValueError(f"config.train.batch_size={gb}: the global batch must be divisible by the "
                         f"process count {process_count}; change train.batch_size")
    local = gb // process_count
    return gb, process_index * local, (process_index + 1) * local


def _require_windows(stream: np.ndarray, seq_len: int, split: str) -> int:
    if seq_len < 1:
        raise ValueError(f"config.model.seq_len={seq_len}: must be positive")
    n = n_windows(stream, seq_len)
    if n == 0:
        raise ValueError(
            f"config.model.seq_len={seq_len}: the {split} split has {len(stream)} tokens, fewer than the "
            f"{seq_len + 1} one window needs; shorten model.seq_len, change data.val_fraction "
            f"(now sets the split sizes) or use a bigger corpus (data.path)")
    return n


class _LoadRows:
    """grain map: a global batch of window indices -> this process's rows, loaded."""

    def __init__(self, stream: np.ndarray, seq_len: int, lo: int, hi: int):
        self.stream, self.seq_len, self.lo, self.hi = stream, seq_len, lo, hi

    def __call__(self, global_indices: np.ndarray) -> dict[str, np.ndarray]:
        return gather_batch(self.stream, np.asarray(global_indices)[self.lo:self.hi], self.seq_len)


class TrainIterator:
    """Infinite iterator of local training batches with a JSON-serializable, restorable state.

    Yields ``{"inputs": int32[local_B, T], "targets": int32[local_B, T]}`` with
    ``local_B = train.batch_size // process_count`` and ``T = model.seq_len``. (Gradient
    accumulation splits this batch into ``train.grad_accum`` microbatches downstream.)
    """

    def __init__(self, stream: np.ndarray, *, seq_len: int, global_batch: int, seed: int, lo: int,
                 hi: int, read_options: grain.ReadOptions | None = None):
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.n_windows = _require_windows(stream, seq_len, "train")
        ds = (grain.MapDataset.range(self.n_windows)
              .shuffle(seed=seed % 2**32)
              .repeat()
              .batch(global_batch)
              .map(_LoadRows(stream, seq_len, lo, hi)))
        if read_options is None:
            read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
        self._ds = ds.to_iter_dataset(read_options)
        self._it = iter(self._ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def _identity(self) -> dict:
        return {"n_windows": self.n_windows, "seq_len": self.seq_len, "global_batch": self.global_batch,
                "seed": self.seed}

    def get_state(self) -> dict:
        """Current position: ``{"grain": <grain iterator state>, "n_windows", "seq_len",
        "global_batch", "seed"}`` (JSON-serializable; ``grain.next_index`` = next global batch)."""
        return {"grain": self._it.get_state(), **self._identity()}

    def set_state(self, state: dict) -> None:
        """Restore a position saved by :meth:`get_state` (any process count).

        Raises:
          ValueError: if the state was saved for another stream length, seq_len, global batch size or
            seed (the same batch index would then mean different data).
        """
        mine = self._identity()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"data iterator state does not match this pipeline (saved, now): {diff}; "
                             "the data, model.seq_len, train.batch_size or train.seed changed since it was saved")
        self._it.set_state(state["grain"])


def make_train_iterator(cfg, source: Source, *, process_index: int = 0, process_count: int = 1,
                        read_options: grain.ReadOptions | None = None) -> TrainIterator:
    """Infinite, shuffled, restorable iterator over training batches of ``source.train_tokens``.

    Args:
      cfg: run config; reads ``model.seq_len``, ``train.batch_size`` (global), ``train.seed``.
      source: from :func:`efficient_arch.data.load_source`.
      process_index, process_count: this process's slot; it loads only rows
        ``[process_index * local_B, (process_index + 1) * local_B)`` of every global batch.
      read_options: grain prefetch settings (default: 1 thread, 4 batches ahead).

    Returns:
      A :class:`TrainIterator` yielding ``{"inputs": int32[local_B, T], "targets": int32[local_B, T]}``
      with ``targets[:, t] == inputs[:, t + 1]`` along each window, and exposing
      ``get_state() -> dict`` / ``set_state(dict)``. For a synthetic task source (``source.task``
      set) a :class:`efficient_arch.data.synthetic.TaskIterator` with the same interface whose
      batches add ``"loss_mask": int32[local_B, T]``.

    Raises:
      ValueError: ``train.batch_size`` not divisible by ``process_count``; a train split without a
        single complete window (names ``model.seq_len``).
    """
    gb, lo, hi = _local_rows(cfg, process_index, process_count)
    if source.task is not None:  # synthetic task: batches are generated, with a loss mask
        from efficient_arch.data import synthetic

        return synthetic.make_task_iterator(cfg, source, lo, hi)
    return TrainIterator(source.train_tokens, seq_len=cfg.model.seq_len, global_batch=gb,
                         seed=int(cfg.train.seed), lo=lo, hi=hi, read_options=read_options)


def make_eval_batches(cfg, source: Source, n_batches: int | None = None, *, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first ``n_batches`` validation batches, in stream order (no shuffle, deterministic).

    Global eval batch ``k`` holds windows ``k*B .. k*B + B - 1`` (modulo the number of validation
    windows, so a short split wraps around); each process gets its rows as in training.

    Args:
      cfg: run config; reads ``model.seq_len``, ``train.batch_size``, ``train.eval_batches`` (when
        ``n_batches`` is None).
      source: from :func:`efficient_arch.data.load_source`.
      n_batches: number of batches (None -> ``train.eval_batches``).

    Returns:
      ``[{"inputs": int32[local_B, T], "targets": int32[local_B, T]}, ...]`` of length ``n_batches``
      (synthetic tasks: validation examples of the task, plus ``"loss_mask"``).

    Raises:
      ValueError: the validation split has no complete window of ``model.seq_len + 1`` tokens (names
        ``model.seq_len`` and ``data.val_fraction``); bad batch / process arguments.
    """
    if n_batches is None:
        n_batches = cfg.train.eval_batches
    if n_batches < 0:
        raise ValueError(f"n_batches={n_batches} must be non-negative")
    gb, lo, hi = _local_rows(cfg, process_index, process_count)
    if source.task is not None:  # synthetic task: the first validation examples of its stream
        from efficient_arch.data import synthetic

        return synthetic.make_task_eval_batches(cfg, source, n_batches, lo, hi)
    seq_len = cfg.model.seq_len
    stream = source.val_tokens
    if seq_len >= 1 and n_windows(stream, seq_len) == 0:
        raise ValueError(
            f"config.model.seq_len={seq_len}: the validation split has {len(stream)} tokens, fewer than the "
            f"{seq_len + 1} one window needs; raise data.val_fraction (now {cfg.data.val_fraction}) or "
            "shorten model.seq_len")
    n = _require_windows(stream, seq_len, "validation")
    out = []
    for k in range(n_batches):
        idx = (np.arange(k * gb + lo, k * gb + hi, dtype=np.int64)) % n
        out.append(gather_batch(stream, idx, seq_len))
    return out
