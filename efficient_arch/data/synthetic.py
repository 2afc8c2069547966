"""Synthetic recall tasks as data sources: MQAR, induction heads and selective copying.

``data.source`` = ``"mqar"`` | ``"induction"`` | ``"selective_copy"`` selects a task; the batches
carry a loss mask so that the loss (train step) and the accuracy (eval) count only the positions
whose target is an answer::

    {"inputs": int32[B, T], "targets": int32[B, T], "loss_mask": int32[B, T]}   # T = model.seq_len

Every example is a function of ``(data.seed, split, index)`` alone. Token ids lie in
``[0, V)`` with ``V = data.task_vocab`` (None -> ``model.vocab_size``); the byte tokenizer is not used.

Layouts (positions are input positions ``t``; the model at ``t`` predicts ``targets[t]``):

* **MQAR**, multi-query associative recall (Arora et al. 2023, "Zoology", Sec. 3 and App. E). With
  ``n = data.n_kv_pairs``: keys are ``n`` distinct ids from ``[1, V // 2)``, values ``n`` distinct
  ids from ``[V // 2, V)``. The ``T + 1`` token stream starts with the context ``k_1 v_1 ... k_n v_n``
  (positions ``0 .. 2n - 1``); the rest is ``S = (T + 1 - 2n) // 2`` two-token slots, slot ``g`` at
  positions ``(2n + 2g, 2n + 2g + 1)``. Key ``j`` is queried once, at slot ``g_j``: the stream holds
  ``k_j v_j`` there, so ``targets[2n + 2 g_j] = v_j`` is an answer and ``loss_mask`` is 1 exactly at
  the ``n`` positions ``2n + 2 g_j``. The gaps ``g_j`` are distinct, drawn without replacement with
  ``P(g) ~ (g + 1) ** (a - 1)``, ``a = data.power_a`` (Zoology's power law, ``a = 0.01``: queries
  mostly close to the context). Every other token (unqueried slots, and an odd leftover at the
  end) is uniform in ``[0, V)`` (Zoology's random non-query tokens). ``inputs = stream[:-1]``,
  ``targets = stream[1:]``. Chance accuracy ``1 / (V - V // 2)``; guessing among the context's
  values ``1 / n``.
* **Induction heads** (Olsson et al. 2022; the Mamba paper's protocol, Gu & Dao 2023 Sec. 4.1.2):
  token 0 is the trigger, content tokens are uniform in ``[1, V)``. The trigger sits once at a
  position ``p`` uniform in ``[0, T - 3]``, followed by the answer ``stream[p + 1]``; the stream
  ends with the trigger at ``T - 1`` and the answer at ``T``. ``loss_mask`` is 1 only at
  ``T - 1``. Chance ``1 / (V - 1)``.
* **Selective copying** (Gu & Dao 2023, "Mamba", Sec. 3.1 and 4.1.1, Figure 2): token 0 is noise,
  1 the marker, data tokens are uniform in ``[2, V)``. With ``m = data.n_copy_tokens``, the inputs are
  ``T - m`` tokens of noise holding ``m`` data tokens at sorted random positions, then ``m`` markers;
  ``targets[T - m + i]`` is the ``i``-th data token (in order) and ``loss_mask`` is 1 exactly on the
  marker positions. As in the paper the answers are not fed back (inputs there are markers); other
  targets are the next input (masked out). Chance ``1 / (V - 2)``.

Splits: an example is a *validation* example iff the SHA-256 of its ``(inputs, targets)`` bytes,
read as a number in ``[0, 1)``, is below ``data.val_fraction`` (:func:`is_val`). The train stream
keeps only train examples and the validation stream only validation ones, so the two sets are
disjoint by construction, not just with high probability. Train global batch ``k`` is drawn from
``numpy.random.default_rng([seed, 0, k])``; validation block ``j`` (``VAL_BLOCK`` candidates) from
``default_rng([seed, 1, j])``: batch ``k`` of either split depends on nothing else, so the iterator
state is one integer and resuming is O(1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np

from efficient_arch.data.sources import Source, register_source

TRAIN, VAL = 0, 1  # seed-stream ids of the two splits
VAL_BLOCK = 256  # candidates per validation block
MAX_EMPTY_DRAWS = 64  # consecutive draws without one example of the wanted split -> ValueError
BATCH_KEYS = ("inputs", "targets", "loss_mask")
TASK_NAMES = ("mqar", "induction", "selective_copy")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ----------------------------------------------------------------------------- generators


def _sample_distinct(rng: np.random.Generator, n_rows: int, pool: int, k: int) -> np.ndarray:
    """``k`` distinct ids of ``[0, pool)`` per row in random order: ``int64[n_rows, k]``."""
    r = rng.random((n_rows, pool))
    idx = np.argpartition(r, k - 1, axis=1)[:, :k] if k < pool else np.tile(np.arange(pool), (n_rows, 1))
    order = np.argsort(np.take_along_axis(r, idx, axis=1), axis=1)  # random order among the chosen
    return np.take_along_axis(idx, order, axis=1)


def mqar_gap_probs(n_slots: int, power_a: float) -> np.ndarray:
    """Zoology's query-gap distribution: ``P(g) = (g + 1) ** (a - 1) / Z`` for ``g = 0 .. n_slots - 1``.

    Returns ``float64[n_slots]`` summing to 1 (decreasing for ``a < 1``, uniform for ``a = 1``).
    Source: Arora et al. 2023 ("Zoology"), App. E (power-law query spacing).
    """
    p = np.arange(1, n_slots + 1, dtype=np.float64) ** (power_a - 1.0)
    return p / p.sum()


def mqar(rng: np.random.Generator, n: int, *, vocab: int, seq_len: int, n_kv_pairs: int,
         power_a: float = 0.01) -> dict[str, np.ndarray]:
    """``n`` multi-query associative recall examples (layout in the module docstring).

    Source: Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
    Models", Sec. 3 (MQAR) and App. E (generation, power-law gaps).

    Args:
      rng: numpy Generator (the only source of randomness).
      n: number of examples.
      vocab: ids used, ``V >= 2 * n_kv_pairs + 2``.
      seq_len: ``T``, with ``4 * n_kv_pairs <= T + 1``.
      n_kv_pairs: key-value pairs per example; each key is queried once.
      power_a: gap exponent ``a > 0`` of ``P(g) ~ (g + 1) ** (a - 1)``.

    Returns:
      ``inputs``, ``targets``, ``loss_mask``: ``int32[n, T]``; and for checks ``keys``, ``values``
      (``int32[n, n_kv_pairs]``, context order), ``query_pos`` (``int32[n, n_kv_pairs]``: the input
      position where key ``j`` is queried, ``2 n_kv_pairs + 2 g_j``).

    Raises:
      ValueError: sizes that do not fit (names the constraint).
    """
    kv, T = n_kv_pairs, seq_len
    _check(kv >= 1 and 4 * kv <= T + 1, f"mqar: need 1 <= n_kv_pairs and 4 * n_kv_pairs <= seq_len + 1 "
                                        f"(n_kv_pairs={kv}, seq_len={T})")
    half = vocab // 2
    _check(vocab >= 2 * kv + 2, f"mqar: vocab={vocab} < 2 * n_kv_pairs + 2 = {2 * kv + 2}")
    _check(power_a > 0, f"mqar: power_a={power_a} must be positive")
    keys = 1 + _sample_distinct(rng, n, half - 1, kv)
    values = half + _sample_distinct(rng, n, vocab - half, kv)
    n_slots = (T + 1 - 2 * kv) // 2
    # weighted sampling without replacement (Gumbel top-k == sequential draws without replacement)
    scores = np.log(mqar_gap_probs(n_slots, power_a))[None, :] + rng.gumbel(size=(n, n_slots))
    gaps = np.argsort(-scores, axis=1, kind="stable")[:, :kv]
    stream = rng.integers(0, vocab, size=(n, T + 1))
    rows = np.arange(n)[:, None]
    stream[rows, 2 * np.arange(kv)[None, :]] = keys
    stream[rows, 2 * np.arange(kv)[None, :] + 1] = values
    qpos = 2 * kv + 2 * gaps
    stream[rows, qpos] = keys
    stream[rows, qpos + 1] = values
    mask = np.zeros((n, T), np.int32)
    mask[rows, qpos] = 1
    return {"inputs": stream[:, :-1].astype(np.int32), "targets": stream[:, 1:].astype(np.int32),
            "loss_mask": mask, "keys": keys.astype(np.int32), "values": values.astype(np.int32),
            "query_pos": qpos.astype(np.int32)}


def induction(rng: np.random.Generator, n: int, *, vocab: int, seq_len: int) -> dict[str, np.ndarray]:
    """``n`` induction-heads examples (layout in the module docstring).

    Source: Olsson et al. 2022, "In-context Learning and Induction Heads"; the synthetic protocol of
    Gu & Dao 2023, "Mamba", Sec. 4.1.2 (one trigger, answer predicted at the final trigger).

    Args:
      rng: numpy Generator; n: number of examples; vocab: ``V >= 3`` (0 = trigger);
      seq_len: ``T >= 4``.

    Returns:
      ``inputs``, ``targets``, ``loss_mask``: ``int32[n, T]`` (mask 1 only at ``T - 1``); and
      ``trigger_pos`` (``int32[n]``: ``p``) and ``answer`` (``int32[n]``: ``stream[p + 1]``).

    Raises:
      ValueError: ``vocab < 3`` or ``seq_len < 4``.
    """
    T = seq_len
    _check(vocab >= 3 and T >= 4, f"induction: need vocab >= 3 and seq_len >= 4 (vocab={vocab}, seq_len={T})")
    stream = rng.integers(1, vocab, size=(n, T + 1))
    p = rng.integers(0, T - 2, size=n)  # uniform in [0, T - 3]
    rows = np.arange(n)
    stream[rows, p] = 0
    stream[:, T - 1] = 0
    stream[:, T] = stream[rows, p + 1]
    mask = np.zeros((n, T), np.int32)
    mask[:, T - 1] = 1
    return {"inputs": stream[:, :-1].astype(np.int32), "targets": stream[:, 1:].astype(np.int32),
            "loss_mask": mask, "trigger_pos": p.astype(np.int32), "answer": stream[:, T].astype(np.int32)}


def selective_copy(rng: np.random.Generator, n: int, *, vocab: int, seq_len: int,
                   n_copy_tokens: int) -> dict[str, np.ndarray]:
    """``n`` selective-copying examples (layout in the module docstring).

    Source: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
    Sec. 3.1 (Figure 2) and Sec. 4.1.1: data tokens at random positions among noise, reproduced in
    order after the markers.

    Args:
      rng: numpy Generator; n: number of examples; vocab: ``V >= 3`` (0 noise, 1 marker);
      seq_len: ``T >= 2 * n_copy_tokens``; n_copy_tokens: ``m >= 1``.

    Returns:
      ``inputs``, ``targets``, ``loss_mask``: ``int32[n, T]`` (mask 1 on positions ``T - m .. T - 1``);
      ``data_pos`` (``int32[n, m]``, sorted input positions of the data tokens) and ``data``
      (``int32[n, m]``, the tokens to copy, in order).

    Raises:
      ValueError: sizes that do not fit.
    """
    T, m = seq_len, n_copy_tokens
    _check(vocab >= 3 and m >= 1 and 2 * m <= T,
           f"selective_copy: need vocab >= 3, n_copy_tokens >= 1, 2 * n_copy_tokens <= seq_len "
           f"(vocab={vocab}, n_copy_tokens={m}, seq_len={T})")
    pos = np.sort(_sample_distinct(rng, n, T - m, m), axis=1)
    data = rng.integers(2, vocab, size=(n, m))
    inputs = np.zeros((n, T), np.int64)
    rows = np.arange(n)[:, None]
    inputs[rows, pos] = data
    inputs[:, T - m:] = 1
    targets = np.empty_like(inputs)
    targets[:, :-1] = inputs[:, 1:]
    targets[:, T - m:] = data
    mask = np.zeros((n, T), np.int32)
    mask[:, T - m:] = 1
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32), "loss_mask": mask,
            "data_pos": pos.astype(np.int32), "data": data.astype(np.int32)}


# ----------------------------------------------------------------------------- tasks and splits


@dataclasses.dataclass(frozen=True)
class Task:
    """One synthetic task with its sizes: ``generate(rng, n)`` -> batch dict (``int32[n, T]`` each).

    Attributes:
      name: ``"mqar"`` | ``"induction"`` | ``"selective_copy"``.
      vocab: ids used, ``[0, vocab)``.
      seq_len: ``T``.
      params: task parameters (``n_kv_pairs`` and ``power_a`` for MQAR, ``n_copy_tokens`` for
        selective copying), as a sorted tuple of ``(name, value)``.
    """

    name: str
    vocab: int
    seq_len: int
    params: tuple = ()

    def generate(self, rng: np.random.Generator, n: int, *, meta: bool = False) -> dict[str, np.ndarray]:
        """``n`` examples; only ``inputs``/``targets``/``loss_mask`` unless ``meta`` (then also the
        generator's extra arrays: ``query_pos``, ``trigger_pos``, ...)."""
        fn = {"mqar": mqar, "induction": induction, "selective_copy": selective_copy}[self.name]
        out = fn(rng, n, vocab=self.vocab, seq_len=self.seq_len, **dict(self.params))
        return out if meta else {k: out[k] for k in BATCH_KEYS}

    def describe(self) -> dict:
        """JSON-serializable description (what the fingerprint hashes)."""
        return {"task": self.name, "task_vocab": self.vocab, "seq_len": self.seq_len, **dict(self.params)}


def task_from_config(cfg) -> Task:
    """The :class:`Task` of ``cfg.data.source`` with ``cfg.model.seq_len`` and the ``data.*`` fields.

    Raises:
      ValueError: ``data.source`` is not a synthetic task.
    """
    d, name = cfg.data, cfg.data.source
    _check(name in TASK_NAMES, f"config.data.source={name!r} is not a synthetic task {TASK_NAMES}")
    vocab = cfg.model.vocab_size if d.task_vocab is None else int(d.task_vocab)
    params = {"mqar": {"n_kv_pairs": int(d.n_kv_pairs), "power_a": float(d.power_a)},
              "induction": {},
              "selective_copy": {"n_copy_tokens": int(d.n_copy_tokens)}}[name]
    return Task(name=name, vocab=vocab, seq_len=int(cfg.model.seq_len), params=tuple(sorted(params.items())))


def example_uniform(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Per example, SHA-256 of its ``inputs`` and ``targets`` (int32 bytes) read as a number in ``[0, 1)``.

    Returns ``float64[n]``; identical examples get identical numbers.
    """
    inp = np.ascontiguousarray(batch["inputs"], dtype=np.int32)
    tgt = np.ascontiguousarray(batch["targets"], dtype=np.int32)
    out = np.empty(len(inp), np.float64)
    for i in range(len(inp)):
        h = hashlib.sha256(inp[i].tobytes() + b"|" + tgt[i].tobytes()).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2.0**64
    return out


def is_val(batch: dict[str, np.ndarray], val_fraction: float) -> np.ndarray:
    """``bool[n]``: which examples belong to the validation split (hash below ``val_fraction``)."""
    return example_uniform(batch) < val_fraction


def _take(batch: dict, keep: np.ndarray) -> dict:
    return {k: v[keep] for k, v in batch.items()}


def _concat(parts: list[dict], n: int) -> dict:
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}


def _starved(empty: int, task: Task, split: str, val_fraction: float) -> None:
    if empty >= MAX_EMPTY_DRAWS:
        raise ValueError(
            f"{task.name}: {empty} draws in a row produced no {split} example: the task's example space "
            f"(task_vocab={task.vocab}, seq_len={task.seq_len}) is so small that no example hashes into the "
            f"{split} split at data.val_fraction={val_fraction}; enlarge the task or change data.val_fraction")


def train_batch(task: Task, seed: int, index: int, batch_size: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Global training batch ``index``: ``batch_size`` train-split examples (``int32[B, T]`` each).

    Drawn from ``default_rng([seed, 0, index])`` in blocks; examples that hash into the
    validation split are dropped (:func:`is_val`).

    Raises:
      ValueError: ``MAX_EMPTY_DRAWS`` blocks in a row hold no train example (a degenerate example
        space: every possible example hashes into validation).
    """
    rng = np.random.default_rng([seed, TRAIN, index])
    per = int(math.ceil(batch_size / max(1.0 - val_fraction, 1e-3) * 1.1)) + 2
    parts, have, empty = [], 0, 0
    while have < batch_size:
        b = task.generate(rng, per)
        b = _take(b, ~is_val(b, val_fraction))
        parts.append(b)
        have += len(b["inputs"])
        empty = 0 if len(b["inputs"]) else empty + 1
        _starved(empty, task, "train", val_fraction)
    return _concat(parts, batch_size)


def val_examples(task: Task, seed: int, n: int, val_fraction: float) -> dict[str, np.ndarray]:
    """The first ``n`` validation examples: blocks ``j = 0, 1, ...`` of ``VAL_BLOCK`` candidates
    from ``default_rng([seed, 1, j])``, keeping those that hash into the validation split.

    A prefix of the same stream for every ``n`` (more eval batches extend the set).

    Raises:
      ValueError: ``MAX_EMPTY_DRAWS`` blocks in a row hold no validation example.
    """
    parts, have, j, empty = [], 0, 0, 0
    while have < n:
        b = task.generate(np.random.default_rng([seed, VAL, j]), VAL_BLOCK)
        b = _take(b, is_val(b, val_fraction))
        parts.append(b)
        have += len(b["inputs"])
        j += 1
        empty = 0 if len(b["inputs"]) else empty + 1
        _starved(empty, task, "validation", val_fraction)
    return _concat(parts, n) if n else {k: np.zeros((0, task.seq_len), np.int32) for k in BATCH_KEYS}


class TaskIterator:
    """Infinite iterator of local training batches of a synthetic task, restorable like
    :class:`efficient_arch.data.TrainIterator`.

    Yields ``{"inputs", "targets", "loss_mask"}``, each ``int32[local_B, T]``: rows ``[lo, hi)`` of
    :func:`train_batch` ``k`` for ``k = 0, 1, ...``. The state is ``{"next_batch": k}`` plus the
    task identity.
    """

    def __init__(self, task: Task, *, seed: int, global_batch: int, val_fraction: float, lo: int, hi: int):
        self.task, self.seed, self.global_batch, self.val_fraction = task, seed, global_batch, val_fraction
        self.lo, self.hi = lo, hi
        self.next_batch = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = train_batch(self.task, self.seed, self.next_batch, self.global_batch, self.val_fraction)
        self.next_batch += 1
        return {k: np.ascontiguousarray(v[self.lo:self.hi]) for k, v in b.items()}

    def _identity(self) -> dict:
        return {"task": self.task.describe(), "seed": self.seed, "global_batch": self.global_batch,
                "val_fraction": self.val_fraction}

    def get_state(self) -> dict:
        """``{"next_batch": int, "task": {...}, "seed", "global_batch", "val_fraction"}`` (JSON)."""
        return {"next_batch": self.next_batch, **self._identity()}

    def set_state(self, state: dict) -> None:
        """Continue from a :meth:`get_state` dict.

        Raises:
          ValueError: the state belongs to another task, size, seed, batch size or split fraction.
        """
        mine = json.loads(json.dumps(self._identity()))
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff or "next_batch" not in state:
            raise ValueError(f"data iterator state does not match this task pipeline (saved, now): {diff}; "
                             "the task, model.seq_len, train.batch_size, data.seed or data.val_fraction changed")
        self.next_batch = int(state["next_batch"])


def fingerprint(task: Task, seed: int, val_fraction: float) -> str:
    """16 hex chars identifying the example streams (task, sizes, seed, split fraction)."""
    blob = json.dumps({**task.describe(), "seed": seed, "val_fraction": val_fraction}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_task(cfg) -> Source:
    task = task_from_config(cfg)
    vf = float(cfg.data.val_fraction)
    _check(0 < vf < 1, f"config.data.val_fraction={vf!r}: must lie strictly between 0 and 1")
    _check(task.vocab <= cfg.model.vocab_size,
           f"config.data.task_vocab={task.vocab}: exceeds model.vocab_size={cfg.model.vocab_size}")
    val_examples(task, int(cfg.data.seed), 1, vf)  # fail now if no example can be a validation one
    T, B = task.seq_len, cfg.train.batch_size
    info = {"source": task.name, "path": None, "fingerprint": fingerprint(task, int(cfg.data.seed), vf),
            "seed": int(cfg.data.seed), "val_fraction": vf, "tokenizer": "synthetic",
            **{k: v for k, v in task.describe().items() if k != "task"},
            # examples are generated on the fly: the tokens this run draws / evaluates on
            "n_train_tokens": int(cfg.train.steps) * B * T, "n_val_tokens": int(cfg.train.eval_batches) * B * T}
    empty = np.zeros(0, np.uint16)
    return Source(name=task.name, train_tokens=empty, val_tokens=empty, info=info, task=task)


for _name in TASK_NAMES:
    register_source(_name)(_load_task)


def make_task_iterator(cfg, source: Source, lo: int, hi: int) -> TaskIterator:
    """:class:`TaskIterator` over ``source.task``'s training stream, rows ``[lo, hi)`` of each global batch."""
    return TaskIterator(source.task, seed=int(cfg.data.seed), global_batch=cfg.train.batch_size,
                        val_fraction=float(cfg.data.val_fraction), lo=lo, hi=hi)


def make_task_eval_batches(cfg, source: Source, n_batches: int, lo: int, hi: int) -> list[dict[str, np.ndarray]]:
    """``n_batches`` validation batches: global batch ``k`` = validation examples ``[kB, (k+1)B)``,
    rows ``[lo, hi)``; ``int32[hi - lo, T]`` each of ``inputs``/``targets``/``loss_mask``."""
    B = cfg.train.batch_size
    ex = val_examples(source.task, int(cfg.data.seed), n_batches * B, float(cfg.data.val_fraction))
    return [{k: np.ascontiguousarray(v[k0 * B + lo:k0 * B + hi]) for k, v in ex.items()} for k0 in range(n_batches)]
