"""Text generation from a trained run: parallel prefill, cached decoding, sampling, a speed table.

    efficient-arch generate --workdir=runs/small --prompt="def main(" --max_new_tokens=200 \\
        [--temperature=0.8] [--top_k=40] [--top_p=0.95] [--seed=0]

Steps (:func:`run_generate`):

1. :func:`load_run`: the run's config (stored with its latest committed checkpoint) builds the
   model; only the ``params`` of the train state are restored (orbax partial restore: no
   optimizer moments are read), onto one device.
2. Prefill (:func:`generate_tokens`): the prompt ``[B, T]`` goes once through
   :meth:`~efficient_arch.models.lm.LM.prefill`, every mixer in its parallel form (attention:
   causal attention with the keys/values written into a KV cache of ``T + max_new_tokens``
   slots; recurrent mixers: the chunked form's final state and the short convolutions' last
   inputs), and the first new token is sampled from the last position's logits.
3. Decode: one jitted ``jax.lax.scan`` of ``max_new_tokens - 1`` steps of
   :meth:`~efficient_arch.models.lm.LM.decode`, each sampling the next token (one compile for
   the whole loop).

Sampling (:func:`sample_logits`, applied in this order): ``temperature`` 0 is greedy (argmax);
otherwise logits are divided by the temperature, restricted to the ``top_k`` most likely tokens
(0 = all), then to the nucleus of ``top_p`` (Holtzman et al. 2020, "The Curious Case of Neural
Text Degeneration", Sec. 3.1: the smallest set of most likely tokens whose probability reaches
``top_p``; 1 = all), and a token is drawn with ``jax.random.categorical`` from ``seed``.

The length limit is the model's ``model.max_seq_len`` (RoPE positions and the caches are sized
for it): ``T + max_new_tokens`` beyond it is an error naming ``--max_new_tokens``; nothing is
truncated or wrapped silently.

Speed table (:func:`decode_traffic`): tokens/s of prefill (its second run) and decode (compile
excluded, timed separately), bytes moved per decoded token = parameters read (:func:`~efficient_arch.roofline.
touched_params` in ``param_dtype``: the step feeds the stored parameters) + decode state read
and written (:func:`~efficient_arch.roofline.decode_state_bytes` at the allocated cache length:
the decode step reads every slot of its cache, masking the unused ones, so that is what it
moves), and the bandwidth this implies relative to the chip's memory bandwidth
(``hardware.HBM_BANDWIDTH``; a CPU has no entry: give ``--hbm_bandwidth``). Activations are not
counted, so the bytes are a lower bound.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["GenerateError", "LoadedRun", "config_from_saved", "load_run", "check_sampling", "top_k_mask",
           "top_p_mask", "sample_logits", "Generation", "generate_tokens", "decode_traffic",
           "memory_bandwidth", "run_generate", "print_report"]

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class GenerateError(ValueError):
    """Bad input to generation; the message names the flag (``--workdir``, ``--prompt``, ...) and
    the fix."""


# ------------------------------------------------------------------------------------ loading

@dataclasses.dataclass
class LoadedRun:
    """A trained model ready to generate.

    Attributes:
      cfg: the run's finalized config (``ml_collections.ConfigDict``).
      model: the :class:`~efficient_arch.models.lm.LM` with the checkpoint's parameters (one device).
      step: the checkpoint's training step.
      workdir: the run folder.
    """

    cfg: Any
    model: Any
    step: int
    workdir: str


def config_from_saved(saved: dict):
    """The finalized config of a run from the JSON dict stored with its checkpoint.

    The dict is laid over :func:`~efficient_arch.config.default_config` (a field added to the
    schema since the run was saved takes its default; a field removed since is ignored; JSON lists
    become tuples), then :func:`~efficient_arch.config.finalize`\\ d (no device checks).

    Raises:
      ConfigError: the stored config no longer validates.
    """
    from ml_collections import ConfigDict

    from efficient_arch.config import default_config, finalize

    cfg = default_config()

    def overlay(node, d):
        for k, v in d.items():
            if k not in node:
                continue
            if isinstance(node[k], ConfigDict) and isinstance(v, dict):
                overlay(node[k], v)
            else:
                node[k] = tuple(v) if isinstance(v, list) else v

    overlay(cfg, saved)
    return finalize(cfg)


def _abstract_params(mcfg):
    """``(graphdef, abstract state, pure-dict abstract params)`` of the LM, nothing allocated."""
    from efficient_arch.models.lm import new_model

    abstract = nnx.eval_shape(lambda: new_model(mcfg, 0))
    graphdef, state = nnx.split(abstract)
    return graphdef, state, nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def load_run(workdir: str, *, step: int | None = None, device=None) -> LoadedRun:
    """Load the model of a training run from its latest (or a given) committed checkpoint.

    Only the ``params`` subtree of the saved train state is read (orbax partial restore), as
    float arrays in ``model.param_dtype`` on ``device`` (default ``jax.devices()[0]``). The
    checkpoint was written by ``efficient-arch train`` (``efficient_arch.checkpoint``).

    Args:
      workdir: the ``--workdir`` of ``efficient-arch train``.
      step: a committed step to load (default: the latest).
      device: a jax device.
    Returns:
      :class:`LoadedRun`.
    Raises:
      GenerateError: ``workdir`` missing or not a folder, no committed checkpoint, ``step`` not
        committed (the message lists the committed steps).
      CorruptCheckpointError: the checkpoint's config or parameters cannot be read.
    """
    import orbax.checkpoint as ocp

    from efficient_arch.checkpoint import (CHECKPOINT_SUBDIR, CorruptCheckpointError, committed_steps,
                                           read_config, uncommitted_steps)

    if not workdir:
        raise GenerateError("--workdir is required: the folder of a training run (efficient-arch train "
                            "--workdir=DIR), e.g. --workdir=runs/small")
    if not os.path.exists(workdir):
        raise GenerateError(f"--workdir={workdir!r} does not exist; pass the --workdir of a training run "
                            "(efficient-arch train ... --workdir=DIR)")
    if not os.path.isdir(workdir):
        raise GenerateError(f"--workdir={workdir!r} is a file, not a run folder; pass the --workdir of a "
                            "training run")
    ckdir = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    steps = committed_steps(ckdir)
    if not steps:
        stale = uncommitted_steps(ckdir)
        extra = (f" (only never-committed save(s) {', '.join(stale)}: a save cut short)" if stale else "")
        raise GenerateError(f"--workdir={workdir!r} has no committed checkpoint in {ckdir}{extra}; train it "
                            "first (efficient-arch train ... --workdir=DIR; the first checkpoint is written "
                            "after train.ckpt_every steps and at the last step)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise GenerateError(f"--step={step}: no committed checkpoint for that step in {ckdir}; committed "
                            f"steps: {steps} (omit --step for the latest)")
    saved = read_config(workdir) if step == steps[-1] else _read_step_config(ckdir, step, steps)
    cfg = config_from_saved(saved)
    graphdef, state, params = _abstract_params(cfg.model)
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    target = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                                     params)}
    reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        restored = reader.restore(os.path.join(ckdir, str(step), "state"),
                                  args=ocp.args.PyTreeRestore(
                                      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True))
        if jax.tree.structure(restored) != jax.tree.structure(target):
            raise ValueError("the saved params do not match the model the saved config builds")
        _verify_params(ckdir, step, restored)
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types
        raise CorruptCheckpointError(os.path.join(ckdir, str(step)), step, [s for s in steps if s < step], e) from e
    finally:
        reader.close()
    nnx.replace_by_pure_dict(state, restored["params"])
    missing = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(state)
               if isinstance(v, jax.ShapeDtypeStruct)]
    if missing:  # a model variable that is not a saved parameter: never run with placeholders
        raise GenerateError(f"the checkpoint of --workdir={workdir!r} has no values for {missing[:3]}; "
                            "generation only restores parameters (nnx.Param)")
    return LoadedRun(cfg=cfg, model=nnx.merge(graphdef, state), step=int(step), workdir=workdir)


def _verify_params(ckdir: str, step: int, restored: dict) -> None:
    """Compare the restored ``{"params": ...}`` with the per-array checksums recorded in the step's
    ``data`` item at save time (as ``Checkpointer.restore`` does for the whole state); checkpoints
    written before checksums existed are not checked.

    Raises:
      ChecksumMismatch: a parameter's bytes changed after the save.
    """
    from efficient_arch.checkpoint import CHECKSUM_KEY, check_checksums

    data = _read_json_item(ckdir, step, "data")
    recorded = data.get(CHECKSUM_KEY) if isinstance(data, dict) else None
    if isinstance(recorded, dict):
        check_checksums(recorded, restored, what="parameter array(s)")


def _read_step_config(ckdir: str, step: int, steps: list[int]) -> dict:
    from efficient_arch.checkpoint import CorruptCheckpointError

    try:
        return dict(_read_json_item(ckdir, step, "config"))
    except Exception as e:  # noqa: BLE001
        raise CorruptCheckpointError(os.path.join(ckdir, str(step)), step, [s for s in steps if s < step], e) from e


def _read_json_item(ckdir: str, step: int, item: str):
    """The JSON item ``item`` ("config", "data") of checkpoint ``step`` as saved (errors raised as
    orbax raises them)."""
    import orbax.checkpoint as ocp

    reader = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    try:
        return reader.restore(os.path.join(ckdir, str(step), item), args=ocp.args.JsonRestore())
    finally:
        reader.close()


# ----------------------------------------------------------------------------------- sampling

def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Validate sampling settings.

    Raises:
      GenerateError: ``temperature`` negative or not finite, ``top_k`` negative or not an int,
        ``top_p`` outside ``(0, 1]``; the message names the flag.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise GenerateError(f"--temperature={temperature!r}: must be a finite number >= 0 (0 = greedy, 1 = the "
                            "model's distribution; e.g. --temperature=0.8)")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise GenerateError(f"--top_k={top_k!r}: must be an integer >= 0 (0 = no top-k filter; e.g. --top_k=40)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise GenerateError(f"--top_p={top_p!r}: must lie in (0, 1] (1 = no nucleus filter; e.g. --top_p=0.95)")


def _check_new_tokens(n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise GenerateError(f"--max_new_tokens={n!r}: must be an integer >= 1")


def _sorted_order(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(order, rank)``: token ids by descending logit (ties: lower id first, as
    ``jax.lax.top_k``) and each token's position in that order; int32 ``[..., V]``."""
    order = jnp.argsort(-logits, axis=-1, stable=True)
    return order, jnp.argsort(order, axis=-1)


def top_k_mask(logits: jax.Array, k) -> jax.Array:
    """bool ``[..., V]``: True on the ``k`` largest logits of each row (exactly ``k``; ties go to
    the lower id, as ``jax.lax.top_k``). ``k <= 0`` keeps everything. ``k`` may be traced."""
    _, rank = _sorted_order(logits)
    k = jnp.asarray(k, jnp.int32)
    return (rank < k) | (k <= 0)


def top_p_mask(logits: jax.Array, p) -> jax.Array:
    """bool ``[..., V]``: the nucleus of each row (Holtzman et al. 2020, Sec. 3.1).

    The smallest set of most likely tokens whose total probability ``softmax(logits)`` is
    ``>= p``: token ``i`` (in descending probability) is kept iff the tokens before it sum to
    less than ``p``, so the most likely token is always kept. Entries at ``-inf`` (filtered
    before) have probability 0 and are dropped once the nucleus is complete. ``p >= 1`` keeps
    everything. ``p`` may be traced; computed in float32.
    """
    order, rank = _sorted_order(logits)
    probs = jax.nn.softmax(jnp.take_along_axis(logits.astype(jnp.float32), order, axis=-1), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    p = jnp.asarray(p, jnp.float32)
    return jnp.take_along_axis(before < p, rank, axis=-1) | (p >= 1)


def _filtered(x: jax.Array, top_k, top_p) -> jax.Array:
    """``x`` with everything outside top-k, then outside the top-p nucleus of the rest, at -inf
    (one sort: the nucleus of the renormalized top-k is a prefix of the same order)."""
    order, rank = _sorted_order(x)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    pos = jnp.arange(x.shape[-1])
    in_k = (pos < top_k) | (top_k <= 0)
    sorted_x = jnp.where(in_k, jnp.take_along_axis(x, order, axis=-1), -jnp.inf)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    keep = in_k & ((jnp.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1))
    return jnp.where(jnp.take_along_axis(keep, rank, axis=-1), x, -jnp.inf)


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature, top_k=0, top_p=1.0) -> jax.Array:
    """Next tokens from logits.

    Args:
      logits: float ``[B, V]`` (any leading shape ``[...]``).
      key: a ``jax.random`` key (unused when greedy).
      temperature: 0 = greedy argmax (ties: the lowest id); > 0 divides the logits.
      top_k: keep the ``top_k`` most likely tokens (0 = all). ``top_k=1`` equals greedy.
      top_p: then keep the nucleus of probability ``top_p`` (1 = all), renormalized.
      Each may be a Python number or a traced scalar: one compiled program serves every
      setting (``lax.cond`` runs only the branch needed: argmax, plain sampling, or the sort of
      the filtered sampling).
    Returns:
      int32 ``[B]`` (``[...]``) token ids.
    """
    logits = logits.astype(jnp.float32)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)

    def draw(_):
        x = logits / jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny)
        x = jax.lax.cond((top_k > 0) | (top_p < 1), lambda y: _filtered(y, top_k, top_p), lambda y: y, x)
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, lambda _: jnp.argmax(logits, axis=-1).astype(jnp.int32), None)


# ---------------------------------------------------------------------------------- the loops

class _Graph:
    """A GraphDef as a jit static argument: the LM's GraphDef holds its ConfigDict, which is not
    hashable; hash its (deterministic) repr, compare with GraphDef equality. Equal models share
    compiled programs."""

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self._hash = hash(repr(graphdef))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _Graph) and self._hash == other._hash and self.graphdef == other.graphdef


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "return_logits"))
def _prefill(graphdef, state, prompt, key, sampling, *, max_len, return_logits):
    model = nnx.merge(graphdef.graphdef, state)
    cache = model.init_cache(prompt.shape[0], max_len)
    logits, cache = model.prefill(prompt, cache, all_logits=return_logits)
    temperature, top_k, top_p = sampling
    tok = sample_logits(logits[:, -1], key, temperature=temperature, top_k=top_k, top_p=top_p)
    return tok, cache, (logits if return_logits else None)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_steps", "return_logits"), donate_argnames=("cache",))
def _decode(graphdef, state, cache, token, start, key, sampling, *, n_steps, return_logits):
    temperature, top_k, top_p = sampling

    def body(carry, i):
        cache, tok = carry
        logits, cache = nnx.merge(graphdef.graphdef, state).decode(tok[:, None], cache, position=start + i)
        nxt = sample_logits(logits[:, 0], jax.random.fold_in(key, i), temperature=temperature, top_k=top_k,
                            top_p=top_p)
        return (cache, nxt), (nxt, logits[:, 0] if return_logits else None)

    (cache, _), (toks, logits) = jax.lax.scan(body, (cache, token), jnp.arange(n_steps, dtype=jnp.int32))
    return jnp.swapaxes(toks, 0, 1), cache, (None if logits is None else jnp.swapaxes(logits, 0, 1))


@dataclasses.dataclass
class Generation:
    """Output of :func:`generate_tokens`.

    Attributes:
      tokens: int32 ``[B, max_new_tokens]`` generated ids (numpy).
      prompt_len: ``T``; max_len: cache length (``T + max_new_tokens``).
      prefill_s / decode_s: seconds of the prefill (``B T`` tokens, first token sampled; its second
        run: the first run of a program carries one-time costs) and of the decode loop
        (``max_new_tokens - 1`` steps, one run), compile excluded, outputs waited for.
      prefill_compile_s / decode_compile_s: compile seconds (0 when the program was cached).
      cache: the caches after the last decode step (a pytree of device arrays).
      logits: with ``return_logits``, float32 ``[B, max_new_tokens, V]`` numpy: the logits each
        new token was sampled from (position ``T - 1 + i`` for token ``i``, before temperature and
        filtering); else None.
      prompt_logits: with ``return_logits``, float32 ``[B, T, V]``: the prefill's logits at every
        prompt position; else None.
    """

    tokens: np.ndarray
    prompt_len: int
    max_len: int
    prefill_s: float
    decode_s: float
    prefill_compile_s: float
    decode_compile_s: float
    cache: Any = None
    logits: np.ndarray | None = None
    prompt_logits: np.ndarray | None = None

    @property
    def decode_steps(self) -> int:
        return int(self.tokens.shape[1]) - 1


def generate_tokens(model, prompt, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 0, max_len: int | None = None,
                    return_logits: bool = False) -> Generation:
    """Prefill ``prompt`` in the parallel form, then decode ``max_new_tokens`` tokens with the caches.

    Args:
      model: an :class:`~efficient_arch.models.lm.LM`.
      prompt: int ``[B, T]`` token ids (``T >= 1``; rows of equal length).
      max_new_tokens: ``N >= 1`` tokens to generate per row.
      temperature, top_k, top_p: see :func:`sample_logits`; seed: int seed of ``jax.random``.
      max_len: cache length (default ``T + N``); must be ``>= T + N`` and at most
        ``model.cfg.max_seq_len``.
      return_logits: also return the logits of every prompt position and those every new token
        was sampled from (tests, scoring); other programs than without.
    Returns:
      :class:`Generation`. The first token comes from the prefill's last logits; the others from
      ``N - 1`` decode steps in one jitted ``lax.scan``. Same seed, same tokens. The sampling
      settings are traced arguments: one prefill and one decode program per model, prompt length
      and ``N`` serve every setting.
    Raises:
      GenerateError: empty prompt (``--prompt``), ``N < 1`` or ``T + N`` above the model's
        ``max_seq_len`` (``--max_new_tokens``), bad sampling settings (their flags), token ids
        outside the vocabulary (``--prompt``).
    """
    prompt = np.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or prompt.shape[0] < 1:
        raise GenerateError(f"--prompt is empty (token array of shape {prompt.shape}); give at least one "
                            "character, e.g. --prompt='def '")
    vocab = model.cfg.vocab_size
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise GenerateError(f"--prompt holds token ids outside the model's vocabulary [0, {vocab}) "
                            f"(min {int(prompt.min())}, max {int(prompt.max())}); this model has "
                            f"model.vocab_size={vocab}")
    _check_new_tokens(max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    b, t = prompt.shape
    limit = model.cfg.max_seq_len
    if t + max_new_tokens > limit:
        raise GenerateError(f"--max_new_tokens={max_new_tokens}: the prompt has {t} token(s), and {t} + "
                            f"{max_new_tokens} exceeds the model's model.max_seq_len={limit} (the length its "
                            f"positions and caches are sized for); "
                            + (f"use --max_new_tokens<={limit - t}" if t < limit else
                               f"the prompt alone fills it: use a --prompt of at most {limit - 1} tokens"))
    max_len = t + max_new_tokens if max_len is None else int(max_len)
    if not t + max_new_tokens <= max_len <= limit:
        raise GenerateError(f"max_len={max_len}: must lie in [{t + max_new_tokens}, {limit}] (prompt + new "
                            "tokens .. model.max_seq_len)")
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))  # traced: one program
    graphdef, state = nnx.split(model)
    graphdef = _Graph(graphdef)
    k_prefill, k_decode = jax.random.split(jax.random.key(int(seed)))
    prompt_arr = jnp.asarray(prompt, jnp.int32)

    t0 = time.perf_counter()
    prefill = _prefill.lower(graphdef, state, prompt_arr, k_prefill, sampling, max_len=max_len,
                             return_logits=return_logits).compile()
    prefill_compile = time.perf_counter() - t0
    # untimed first run: the first execution of a program carries one-time costs (~40 ms on CPU,
    # 10x a short prompt's prefill); the prefill has no side effects, so it simply runs again
    jax.block_until_ready(prefill(state, prompt_arr, k_prefill, sampling))
    t0 = time.perf_counter()
    first, cache, prompt_logits = prefill(state, prompt_arr, k_prefill, sampling)
    jax.block_until_ready((first, cache))
    prefill_s = time.perf_counter() - t0

    decode_s = decode_compile = 0.0
    rest, logits = np.zeros((b, 0), np.int32), None
    if max_new_tokens > 1:
        start = jnp.int32(t)
        t0 = time.perf_counter()
        decode = _decode.lower(graphdef, state, cache, first, start, k_decode, sampling, n_steps=max_new_tokens - 1,
                               return_logits=return_logits).compile()
        decode_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        rest, cache, logits = decode(state, cache, first, start, k_decode, sampling)
        jax.block_until_ready((rest, cache))
        decode_s = time.perf_counter() - t0
    tokens = np.concatenate([np.asarray(first)[:, None], np.asarray(rest)], axis=1).astype(np.int32)
    if return_logits:
        prompt_logits = np.asarray(prompt_logits)
        logits = np.concatenate([prompt_logits[:, -1:]] + ([np.asarray(logits)] if logits is not None else []), axis=1)
    return Generation(tokens=tokens, prompt_len=t, max_len=max_len, prefill_s=prefill_s, decode_s=decode_s,
                      prefill_compile_s=prefill_compile, decode_compile_s=decode_compile, cache=cache,
                      logits=logits if return_logits else None,
                      prompt_logits=prompt_logits if return_logits else None)


# ----------------------------------------------------------------------------- bytes and speed

def decode_traffic(mcfg, batch: int, max_len: int) -> dict[str, float]:
    """Bytes one decode step moves (lower bound: activations not counted).

    Args:
      mcfg: finalized ``config.model``; batch: sequences decoded together; max_len: the cache's
        allocated length.
    Returns:
      dict of bytes per step: ``weights`` (:func:`~efficient_arch.roofline.touched_params` for
      ``batch`` tokens, in ``param_dtype``; an untied embedding table counts only its ``batch``
      gathered rows), ``state_read`` (every cache leaf at ``max_len``: the step reads the whole
      allocated KV cache, masking unused slots, and every recurrent state), ``state_written``
      (one position of each growing leaf and every constant-size leaf), ``total``, and
      ``per_token`` (``total / batch``, bytes per decoded token).
    """
    from efficient_arch.models.lm import count_params
    from efficient_arch.roofline import decode_state_bytes, touched_params

    n_read = touched_params(mcfg, count_params(mcfg), batch)
    if not mcfg.tie_embeddings:
        n_read -= mcfg.vocab_size * mcfg.d_model - min(batch, mcfg.vocab_size) * mcfg.d_model
    st = decode_state_bytes(mcfg, batch, max_len)
    weights = n_read * _BYTES[mcfg.param_dtype]
    total = weights + st["state_read"] + st["state_written"]
    return {"weights": float(weights), "state_read": st["state_read"], "state_written": st["state_written"],
            "total": float(total), "per_token": float(total / batch)}


def memory_bandwidth(device=None, override: float | None = None) -> tuple[float | None, str]:
    """Memory bandwidth (bytes/s) of ``device`` (default ``jax.devices()[0]``) and its source.

    ``override`` (``--hbm_bandwidth``) wins; else the ``hardware.HBM_BANDWIDTH`` entry of the
    device kind. A CPU (or an accelerator missing from the table) gives ``(None, reason)``: no
    figure is guessed.

    Raises:
      GenerateError: a non-positive ``override``.
    """
    from efficient_arch import hardware

    if override is not None:
        if not (math.isfinite(float(override)) and float(override) > 0):
            raise GenerateError(f"--hbm_bandwidth={override!r}: must be a positive number of bytes/s")
        return float(override), "user-given (--hbm_bandwidth)"
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None, ("none known for a CPU (host memory bandwidth is not in hardware.HBM_BANDWIDTH); "
                      "pass --hbm_bandwidth=BYTES_PER_S for a utilization")
    try:
        bw, src, _ = hardware.lookup_hbm_bandwidth(device.device_kind)
    except hardware.UnknownAcceleratorError as e:
        return None, f"unknown: {e}"
    return bw, src


# --------------------------------------------------------------------------------- the command

def run_generate(workdir: str, prompt: str, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, step: int | None = None,
                 hbm_bandwidth: float | None = None) -> dict:
    """Load a run, generate from a text prompt and measure the speed: ``efficient-arch generate``.

    Args:
      workdir: run folder; prompt: text (UTF-8 bytes are the tokens, ``data/tokenizer.py``);
      max_new_tokens: tokens to generate; temperature, top_k, top_p, seed: :func:`sample_logits`;
      step: checkpoint step (default latest); hbm_bandwidth: bytes/s for the utilization.
    Returns:
      dict: ``text`` (prompt + completion), ``completion``, ``tokens`` (generated ids),
      ``workdir``, ``step``, ``mixers``, ``prompt_tokens``, ``new_tokens``, ``max_len``, timings
      (``prefill_s``, ``decode_s``, ``*_compile_s``), ``prefill_tokens_per_s``,
      ``decode_tokens_per_s`` (None without decode steps), ``bytes`` (:func:`decode_traffic`),
      ``implied_bytes_per_s``, ``bandwidth_bytes_per_s`` and ``bandwidth_source``
      (:func:`memory_bandwidth`), ``bandwidth_utilization`` (None when no bandwidth is known),
      ``device_kind``, ``sampling``, ``dtype`` / ``param_dtype`` / ``quant`` and ``precision``
      (the run's precision policy in words).
    Raises:
      GenerateError: bad input (message names the flag); CorruptCheckpointError: unreadable
        checkpoint.
    """
    from efficient_arch.data import tokenizer
    from efficient_arch.models.layers import describe_precision
    from efficient_arch.models.lm import layer_kinds

    if not isinstance(prompt, str) or not prompt:
        raise GenerateError("--prompt is empty; give the text to continue, e.g. --prompt='def main('")
    _check_new_tokens(max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    bw, bw_src = memory_bandwidth(override=hbm_bandwidth)
    run = load_run(workdir, step=step)
    ids = tokenizer.encode(prompt).astype(np.int32)[None]
    gen = generate_tokens(run.model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed)
    m = run.cfg.model
    traffic = decode_traffic(m, ids.shape[0], gen.max_len)
    b = ids.shape[0]
    dec_tps = b * gen.decode_steps / gen.decode_s if gen.decode_steps and gen.decode_s > 0 else None
    implied = traffic["per_token"] * dec_tps if dec_tps else None
    out = {
        "workdir": workdir, "step": run.step, "mixers": list(dict.fromkeys(k[0] for k in layer_kinds(m))),
        "ffns": list(dict.fromkeys(k[1] for k in layer_kinds(m))), "dtype": m.dtype, "param_dtype": m.param_dtype,
        "quant": m.get("quant", "none"), "precision": describe_precision(m, jax.devices()[0].platform),
        "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed},
        "prompt_tokens": gen.prompt_len, "new_tokens": int(gen.tokens.shape[1]), "max_len": gen.max_len,
        "batch": b, "tokens": gen.tokens[0].tolist(),
        "completion": tokenizer.decode(gen.tokens[0]),
        "text": tokenizer.decode(np.concatenate([ids[0], gen.tokens[0]])),
        "prefill_s": gen.prefill_s, "decode_s": gen.decode_s, "decode_steps": gen.decode_steps,
        "prefill_compile_s": gen.prefill_compile_s, "decode_compile_s": gen.decode_compile_s,
        "prefill_tokens_per_s": b * gen.prompt_len / gen.prefill_s if gen.prefill_s > 0 else None,
        "decode_tokens_per_s": dec_tps,
        "bytes": traffic, "implied_bytes_per_s": implied,
        "bandwidth_bytes_per_s": bw, "bandwidth_source": bw_src,
        "bandwidth_utilization": implied / bw if (implied and bw) else None,
        "device_kind": jax.devices()[0].device_kind,
    }
    return out


def _si(v, unit: str) -> str:
    if v is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}".rstrip()


def print_report(r: dict, console=None) -> None:
    """Print :func:`run_generate`'s text, then a table of the prefill / decode speed, bytes per
    decoded token and the implied bandwidth utilization (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    print(r["text"], flush=True)  # plain: no rich markup interpretation of the generated text
    b = r["bytes"]
    table = Table(title=f"generate: {r['workdir']} step {r['step']} ({'+'.join(r['mixers'])}"
                        f"{'' if r['ffns'] == ['mlp'] else ' / ' + '+'.join(r['ffns'])}, {r['dtype']}"
                        f"{', FP8 matmuls' if r.get('quant') == 'fp8' else ''}) on "
                        f"{r['device_kind']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("prompt tokens / new tokens", f"{r['prompt_tokens']} / {r['new_tokens']} (cache {r['max_len']})"),
        ("prefill tokens/s", _si(r["prefill_tokens_per_s"], "")),
        ("decode tokens/s", _si(r["decode_tokens_per_s"], "") + f" ({r['decode_steps']} steps)"),
        ("compile s (prefill / decode)", f"{r['prefill_compile_s']:.2f} / {r['decode_compile_s']:.2f}"),
        ("bytes / decoded token", _si(b["per_token"], "B")),
        (f"  params read ({r['param_dtype']})", _si(b["weights"] / r["batch"], "B")),
        ("  state read / written", f"{_si(b['state_read'] / r['batch'], 'B')} / "
                                   f"{_si(b['state_written'] / r['batch'], 'B')}"),
        ("implied bandwidth", _si(r["implied_bytes_per_s"], "B/s")),
        ("memory bandwidth", _si(r["bandwidth_bytes_per_s"], "B/s") if r["bandwidth_bytes_per_s"] else "unknown"),
        ("bandwidth utilization", f"{100 * r['bandwidth_utilization']:.3g}%"
         if r["bandwidth_utilization"] is not None else "-"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    table.caption = f"bandwidth: {r['bandwidth_source']}"
    console.print(table)
