"""Roofline of the train step and of one decode step, per architecture, on a given chip.

A step that performs ``F`` FLOPs and moves ``M`` bytes through HBM runs no faster than
``max(F / peak, M / bandwidth)`` seconds (Williams, Waterman & Patterson 2009, "Roofline"). With
the arithmetic intensity ``I = F / M`` (FLOPs per byte) and the chip's ridge point
``R = peak / bandwidth`` (FLOPs per byte), the fraction of peak FLOP/s the step can reach is::

    ceiling = min(1, I / R)

Everything is per device for one device holding the whole model and batch (no parallelism), in
FLOPs, bytes, seconds. What is counted:

**FLOPs** (analytic, model FLOPs, one multiply-add = 2):

* train: :func:`efficient_arch.flops.analytic_flops` at ``seq_len = context`` and the given
  batch (``model_flops_per_step``; ``hardware_flops_per_step`` is reported beside it).
* decode, one new token per sequence with ``context`` tokens cached: each layer's mixer by
  :func:`mixer_decode_flops_per_token` (attention: projections + ``4 H D (context + 1)``; a
  recurrent mixer: its ``recurrent`` form, which *is* its decode step), the FFN's
  ``flops_per_token`` and the LM head ``2 V d``; times the batch.

**Bytes** (a lower bound on HBM traffic: every tensor below moves once per use):

* ``weights``: parameters read. Train: ``n_params`` in ``param_dtype``, read by the forward and
  by the backward pass (and once more for ``remat="full"``). Decode: the parameters the batch
  touches (:func:`touched_params`: ``n_active_params``, plus the extra experts an MoE batch
  routes to; an untied embedding table is only gathered, ``batch`` rows) in ``weight_dtype``
  (default: the compute dtype, as weights are served).
* ``gradients`` and ``optimizer`` (train): float gradients written by the backward pass and read
  by clipping and by AdamW; AdamW's two moments read and written; parameters read and written
  by the update (all in ``param_dtype``).
* ``activations``: every matmul output written once and read once (elementwise work, and
  contraction-free products, assumed fused into their neighbours), at the compute dtype's
  width: ``2 x`` the bytes of all ``dot_general`` outputs of the traced program (train: value-and-grad of the loss; decode: one
  ``LM.decode`` step), loops counted times their trip counts, batch-independent dots (weight
  gradients) excluded. As executed by this implementation: the XLA form of softmax attention
  materialises the ``[B, H, T, T]`` scores (a fused flash kernel would not).
* ``state_read`` / ``state_written`` (decode): derived from ``jax.eval_shape`` of the model's
  ``init_cache(batch, max_len)``, so every registered mixer is covered without a per-mixer
  table. Cache leaves whose size grows with ``max_len`` (the attention KV cache, the
  sliding-window ring buffer up to its window) are read for the ``context`` cached positions
  only (``init_cache(batch, context)``; ``min(window, context)`` for the ring buffer) and written
  for one position; constant-size leaves (recurrent states, conv tails) are read and written
  whole.

Sources of the chip figures: ``hardware.PEAK_FLOPS`` (dense peak per dtype) and
``hardware.HBM_BANDWIDTH`` (datasheet bandwidth).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efficient_arch import hardware

__all__ = [
    "chip_figures", "ceiling", "touched_params", "mixer_decode_flops_per_token",
    "decode_flops_per_token", "decode_state_bytes", "dot_output_elements", "train_roofline",
    "decode_roofline", "roofline",
]

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ----------------------------------------------------------------------------------------- chip

def chip_figures(chip: str, dtype: str, *, peak_flops: float | None = None,
                 hbm_bandwidth: float | None = None) -> dict[str, Any]:
    """Peak FLOP/s, HBM bandwidth and ridge point of one device.

    Args:
      chip: a chip spelling (``"h100"``, ``"a100-80gb"``, ``"v5e"``) or jax ``device_kind``.
      dtype: compute dtype whose peak applies (``"bfloat16"``, ``"float32"``, ...).
      peak_flops: FLOP/s per device overriding the table (``--config.flops.peak_flops``).
      hbm_bandwidth: bytes/s per device overriding the table (``--hbm_bandwidth``).

    Returns:
      dict with ``chip`` (table key or the spelling given), ``dtype``, ``peak_flops_per_s``,
      ``peak_source``, ``hbm_bytes_per_s``, ``hbm_source`` and ``ridge_flops_per_byte``
      (peak / bandwidth, FLOPs per byte).

    Raises:
      UnknownAcceleratorError: chip (or dtype on it) not in the tables and no override given;
        the message names ``--hbm_bandwidth`` / ``--config.flops.peak_flops``.
      ValueError: a non-positive override.
    """
    for name, v in (("peak_flops", peak_flops), ("hbm_bandwidth", hbm_bandwidth)):
        if v is not None and not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"--{name} must be a positive number per device, got {v!r}")
    key = None
    if hbm_bandwidth is not None:
        bw, bw_src = float(hbm_bandwidth), "user-given"
        try:
            key = hardware.hbm_chip_name(chip)
        except hardware.UnknownAcceleratorError:
            key = None
    else:
        bw, bw_src, key = hardware.lookup_hbm_bandwidth(chip)
    if peak_flops is not None:
        peak, peak_src = float(peak_flops), "user-given"
    else:
        peak_chip = hardware.HBM_BANDWIDTH[key]["peak_chip"] if key else hardware.normalize_chip(chip)
        peak, peak_src = hardware.lookup_matmul_peak(peak_chip, dtype)
    return {"chip": key or chip, "dtype": dtype, "peak_flops_per_s": peak, "peak_source": peak_src,
            "hbm_bytes_per_s": bw, "hbm_source": bw_src, "ridge_flops_per_byte": peak / bw}


def ceiling(intensity: float, ridge: float) -> float:
    """Utilization ceiling ``min(1, intensity / ridge)`` (fraction of peak FLOP/s).

    Args:
      intensity: FLOPs per byte of the step; ridge: the chip's peak / bandwidth (FLOPs per byte).
    Raises:
      ValueError: non-positive ridge or negative intensity.
    """
    if not ridge > 0 or intensity < 0:
        raise ValueError(f"need ridge > 0 and intensity >= 0, got {ridge!r}, {intensity!r}")
    return min(1.0, intensity / ridge)


# ---------------------------------------------------------------------------------- model parts

def _dtype_bytes(name: str) -> int:
    if name not in _BYTES:
        raise ValueError(f"dtype {name!r}: choose one of {sorted(_BYTES)}")
    return _BYTES[name]


def _layer_kinds(mcfg) -> list[tuple[str, str]]:
    """``(mixer, ffn)`` of every layer, in order."""
    from efficient_arch.models.lm import layer_kinds

    return list(layer_kinds(mcfg))


def _with_model(mcfg, **fields):
    c = copy.deepcopy(mcfg)
    c.unlock()
    for k, v in fields.items():
        c[k] = v
    c.lock()
    return c


def touched_params(mcfg, counts: dict[str, int], tokens: int) -> float:
    """Parameters a step over ``tokens`` tokens reads.

    Dense models: ``n_active_params`` (= ``n_params``). An MoE (``ffn="moe"``, ``E`` routed
    experts, ``top_k = k``) reads the ``k`` experts of each token, and a batch reads up to
    ``min(E, tokens k)`` distinct experts per MoE layer (the worst case: no two tokens share an
    expert). With ``n_params - n_active_params = (E - k) P_e`` summed over MoE layers (``P_e``
    the parameters of one routed expert)::

        touched = n_active + (n_params - n_active) (min(E, tokens k) - k) / (E - k)

    Args:
      mcfg: finalized ``config.model``; counts: ``count_params`` output; tokens: tokens in the step.
    Returns:
      parameter count (float).
    """
    n, active = counts["n_params"], counts.get("n_active_params")
    if active is None:  # TODO: count_params without n_active_params: treat as dense
        return float(n)
    if active == n or mcfg.ffn != "moe":
        return float(active)
    e, k = mcfg.moe.n_experts, mcfg.moe.top_k
    if e <= k:
        return float(n)
    return active + (n - active) * (min(e, tokens * k) - k) / (e - k)


def mixer_decode_flops_per_token(name: str, mcfg, context: int) -> float:
    """Forward FLOPs of one layer of mixer ``name`` for one new token after ``context`` cached.

    A mixer whose decode cost depends on the context defines
    ``decode_flops_per_token(cfg, context)`` beside its ``flops_per_token`` (attention,
    sliding-window attention). For every other (constant-state) mixer the decode step *is* one
    step of its ``recurrent`` form, so its ``flops_per_token`` with ``mixer_form="recurrent"`` is
    used (independent of the sequence length).

    Raises:
      NotImplementedError: the mixer has no ``decode_flops_per_token`` but its cache grows with
        the sequence (the recurrent-form rule would not hold).
    """
    from efficient_arch.models import registry

    cls = registry.get_mixer(name)
    if hasattr(cls, "decode_flops_per_token"):
        return float(cls.decode_flops_per_token(mcfg, context))
    if _mixer_cache_grows(name, mcfg):
        raise NotImplementedError(f"mixer {name!r}: its decode cache grows with the sequence, so its decode "
                                  "FLOPs depend on the context; define decode_flops_per_token(cfg, context) "
                                  "beside its flops_per_token")
    return float(cls.flops_per_token(_with_model(mcfg, mixer_form="recurrent"), 1))


def _mixer_cache_grows(name: str, mcfg) -> bool:
    from flax import nnx

    from efficient_arch.models import registry

    def sizes(max_len):
        def make():
            with nnx.use_eager_sharding(False):
                m = registry.get_mixer(name)(mcfg, rngs=nnx.Rngs(0))
            return m.init_cache(1, max_len)
        return [int(np.prod(a.shape)) for a in jax.tree.leaves(jax.eval_shape(make))]

    return sizes(1) != sizes(2)


def decode_flops_per_token(mcfg, context: int, *, executed: bool = False,
                           platform: str | None = None) -> dict[str, float]:
    """Analytic forward FLOPs for one new token per sequence with ``context`` tokens cached.

    Args:
      executed: count each FFN as this implementation executes it on a 1-token sequence
        (``flops_per_token(..., executed=True)`` at ``seq_len=1``: an MoE with capacity dispatch
        then runs every expert's single slot) instead of its model FLOPs (active experts).
      platform: "cpu" | "gpu" | "tpu" the executed count is for (None: the running backend).
    Returns:
      dict ``mixers`` (all layers, :func:`mixer_decode_flops_per_token`), ``ffn`` (all layers,
      each FFN's ``flops_per_token``: active experts for an MoE), ``lm_head`` (``2 V d``) and
      ``total``, in FLOPs per token (per sequence).
    """
    from efficient_arch.models import registry

    kinds = _layer_kinds(mcfg)
    per_mixer = {n: mixer_decode_flops_per_token(n, mcfg, context) for n in dict.fromkeys(k[0] for k in kinds)}
    mixers = sum(per_mixer[m] for m, _ in kinds)
    kw = {"executed": True, "platform": platform} if executed else {}
    ffn = sum(registry.get_ffn(f).flops_per_token(mcfg, 1, **kw) for _, f in kinds)
    head = 2.0 * mcfg.vocab_size * mcfg.d_model
    return {"mixers": mixers, "ffn": ffn, "lm_head": head, "total": mixers + ffn + head}


# ------------------------------------------------------------------------------- abstract traces

def _abstract_model(mcfg):
    from flax import nnx

    from efficient_arch.models.lm import new_model

    graphdef, state = nnx.split(nnx.eval_shape(lambda: new_model(mcfg, 0)))
    return graphdef, state


def _cache_shapes(graphdef, state, batch: int, max_len: int):
    from flax import nnx

    return jax.eval_shape(lambda s: nnx.merge(graphdef, s).init_cache(batch, max_len), state)


def _nbytes(leaf) -> int:
    return int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize


def decode_state_bytes(mcfg, batch: int, context: int, *, _model=None) -> dict[str, float]:
    """Decode-state bytes read and written by one decode step, from ``init_cache`` shapes.

    ``jax.eval_shape`` of ``LM.init_cache(batch, max_len)`` at ``max_len`` 1 and 2 tells which
    cache leaves grow with the sequence (their growth is the bytes of one position) and which are
    constant-size; at ``max_len = context`` the growing leaves hold exactly the cached positions
    a step reads (attention: ``context``; a ring buffer: ``min(window, context)``).

    Args:
      mcfg: finalized ``config.model``; batch: sequences; context: tokens already cached (>= 1).
    Returns:
      dict (bytes): ``state_read`` (all leaves at ``max_len = context``), ``state_written``
      (one position of each growing leaf + every constant leaf), ``growing_bytes_per_position``
      (all sequences), ``constant_bytes`` and ``allocated_bytes_at_context``.
    Raises:
      ValueError: context < 1.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1 cached token, got {context}")
    graphdef, state = _model or _abstract_model(mcfg)
    one = jax.tree.leaves(_cache_shapes(graphdef, state, batch, 1))
    two = jax.tree.leaves(_cache_shapes(graphdef, state, batch, 2))
    ctx = jax.tree.leaves(_cache_shapes(graphdef, state, batch, context))
    per_pos = const = 0
    for a, b in zip(one, two):
        if a.shape != b.shape:
            per_pos += _nbytes(b) - _nbytes(a)
        else:
            const += _nbytes(a)
    read = sum(_nbytes(a) for a in ctx)
    return {"state_read": float(read), "state_written": float(per_pos + const),
            "growing_bytes_per_position": float(per_pos), "constant_bytes": float(const),
            "allocated_bytes_at_context": float(read)}


def dot_output_elements(jaxpr) -> float:
    """Elements of every ``dot_general`` output in a (closed) jaxpr, loops times trip counts.

    A dot without contraction (contracted size 1: an outer product such as a recurrent state's
    rank-1 update ``k^T v``) is an elementwise product, which XLA rewrites as a multiply and
    fuses with its neighbours: it is not counted. Sub-jaxprs are walked recursively: a ``scan`` body counts ``length`` times, a ``cond`` its
    largest branch, everything else (``pjit``, ``remat``, custom derivatives) once. A
    ``while`` loop's trip count is unknown statically and counts once.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            if np.prod([eqn.invars[0].aval.shape[i] for i in lhs_contract]) > 1:
                total += float(np.prod(eqn.outvars[0].aval.shape))
        subs = []
        for v in eqn.params.values():
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(x, "eqns") or hasattr(getattr(x, "jaxpr", None), "eqns"):
                    subs.append(x)
        if not subs:
            continue
        counts = [dot_output_elements(s) for s in subs]
        if eqn.primitive.name == "cond":
            total += max(counts)
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(counts)
        else:
            total += sum(counts)
    return total


def _batch_dot_elements(make_jaxpr, batch: int) -> float:
    """Batch-proportional ``dot_general`` output elements: ``D(2B) - D(B)`` (D is affine in B)."""
    return dot_output_elements(make_jaxpr(2 * batch)) - dot_output_elements(make_jaxpr(batch))


# ------------------------------------------------------------------------------------- rooflines

def chip_platform(chip: dict) -> str:
    """"tpu" or "gpu" for :func:`chip_figures` output (the executed-FLOP count of an MoE's
    ``ragged_dot`` differs on CPU, where JAX lowers it densely, from accelerators)."""
    return "tpu" if str(chip["chip"]).upper().startswith("TPU") else "gpu"


def _finish(out: dict, chip: dict, tokens: int) -> dict:
    total = sum(out["bytes"].values())
    out["bytes_total"] = total
    out["tokens_per_step"] = tokens
    out["flops_per_token"] = out["flops"] / tokens
    out["bytes_per_token"] = total / tokens
    out["intensity_flops_per_byte"] = out["flops"] / total
    out["ridge_flops_per_byte"] = chip["ridge_flops_per_byte"]
    out["ceiling"] = ceiling(out["intensity_flops_per_byte"], chip["ridge_flops_per_byte"])
    t_compute = out["flops"] / chip["peak_flops_per_s"]
    t_memory = total / chip["hbm_bytes_per_s"]
    out["bound"] = "memory" if t_memory > t_compute else "compute"
    out["time_s"] = max(t_compute, t_memory)
    out["tokens_per_s"] = tokens / out["time_s"]
    return out


def _roofline_cfg(cfg, batch: int, context: int):
    from efficient_arch.config import finalize

    if batch < 1 or context < 1:
        raise ValueError(f"need batch >= 1 and context >= 1, got batch={batch}, context={context}")
    c = copy.deepcopy(cfg)
    c.unlock()
    c.model.seq_len = context
    c.model.max_seq_len = max(context + 1, c.model.max_seq_len or 0)
    c.train.batch_size, c.train.grad_accum = batch, 1
    c.lock()
    return finalize(c)


def train_roofline(cfg, chip: dict, batch: int, context: int, *, _model=None) -> dict:
    """Roofline of one train step on ``batch`` sequences of ``context`` tokens (grad_accum 1).

    Args:
      cfg: a config (finalized or not); chip: :func:`chip_figures` output.
    Returns:
      dict: ``flops`` (model FLOPs per step), ``hardware_flops``, ``bytes`` by term (``weights``,
      ``gradients``, ``optimizer``, ``activations``), ``bytes_total``, per-token figures,
      ``intensity_flops_per_byte``, ``ridge_flops_per_byte``, ``ceiling``, ``bound``
      (``"memory"``/``"compute"``), ``time_s`` (lower bound per step) and ``tokens_per_s``.
    """
    from flax import nnx

    from efficient_arch import flops as flops_lib
    from efficient_arch.models.lm import count_params
    from efficient_arch.train import cross_entropy

    cfg = _roofline_cfg(cfg, batch, context)
    m = cfg.model
    graphdef, state = _model or _abstract_model(m)
    graphdef, params, rest = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
    ana = flops_lib.analytic_flops(cfg, platform=chip_platform(chip))
    tokens = batch * context
    pb = _dtype_bytes(m.param_dtype)
    n_read = touched_params(m, count_params(m), tokens)
    weight_reads = 2 + (m.remat == "full")  # forward, backward (dX = dY W^T), remat recompute

    def make_jaxpr(b):
        def loss(p, tok):
            model = nnx.merge(graphdef, p, rest)
            logits, aux = model(tok)
            return cross_entropy(logits, tok)[0] + aux.get("aux_loss", 0.0)

        return jax.make_jaxpr(jax.grad(loss))(params, jax.ShapeDtypeStruct((b, context), jnp.int32))

    act = 2.0 * _batch_dot_elements(make_jaxpr, batch) * _dtype_bytes(m.dtype)
    clip = cfg.train.clip_norm > 0
    out = {"flops": ana["model_flops_per_step"], "hardware_flops": ana["hardware_flops_per_step"],
           "bytes": {"weights": weight_reads * n_read * pb,
                     # written by the backward pass, read by the clip norm and by AdamW
                     "gradients": (2 + clip) * n_read * pb,
                     # AdamW moments read + written, parameters read + written by the update
                     "optimizer": (4 + 2) * n_read * pb,
                     "activations": act}}
    return _finish(out, chip, tokens)


def decode_roofline(cfg, chip: dict, batch: int, context: int, *, weight_dtype: str | None = None,
                    _model=None) -> dict:
    """Roofline of one decode step: one new token for each of ``batch`` sequences whose
    ``context`` previous tokens are cached.

    Args:
      cfg: a config; chip: :func:`chip_figures` output; weight_dtype: dtype weights are read in
        (default: the compute dtype ``model.dtype``).
    Returns:
      dict: ``flops`` per step, ``flops_by_term`` (per token: mixers, ffn, lm_head), ``bytes`` by
      term (``weights``, ``activations``, ``state_read``, ``state_written``), ``bytes_total``,
      ``state`` (:func:`decode_state_bytes`), per-token figures, intensity, ridge, ceiling,
      bound, ``time_s`` (per step = per generated token of each sequence) and ``tokens_per_s``.
    """
    from flax import nnx

    from efficient_arch.models.lm import count_params

    cfg = _roofline_cfg(cfg, batch, context)
    m = cfg.model
    graphdef, state = _model or _abstract_model(m)
    wdt = weight_dtype or m.dtype
    fl = decode_flops_per_token(m, context)
    n_read = touched_params(m, count_params(m), batch)
    if not m.tie_embeddings:  # an untied embedding table is gathered: only `batch` rows are read
        n_read -= m.vocab_size * m.d_model - min(batch, m.vocab_size) * m.d_model
    st = decode_state_bytes(m, batch, context, _model=(graphdef, state))

    def make_jaxpr(b):
        cache = _cache_shapes(graphdef, state, b, context + 1)

        def step(s, tok, c):
            return nnx.merge(graphdef, s).decode(tok, c, position=context)

        return jax.make_jaxpr(step)(state, jax.ShapeDtypeStruct((b, 1), jnp.int32), cache)

    act = 2.0 * _batch_dot_elements(make_jaxpr, batch) * _dtype_bytes(m.dtype)
    out = {"flops": fl["total"] * batch, "flops_by_term": fl,
           "bytes": {"weights": n_read * _dtype_bytes(wdt), "activations": act,
                     "state_read": st["state_read"], "state_written": st["state_written"]},
           "state": st, "weight_dtype": wdt}
    return _finish(out, chip, batch)


def roofline(cfg, *, chip: str, batch: int, context: int, weight_dtype: str | None = None,
             hbm_bandwidth: float | None = None, train: bool = True) -> dict:
    """Train-step and decode-step rooflines of one config on one chip.

    Args:
      cfg: a config (``--config`` with overrides); its ``flops.peak_flops`` overrides the peak.
      chip: chip spelling or device kind (see :func:`chip_figures`).
      batch: sequences per step; context: training sequence length and decode cache length.
      weight_dtype: decode weight dtype (default compute dtype); hbm_bandwidth: bytes/s override.
      train: also compute the train-step roofline (the slower trace).
    Returns:
      ``{"chip": chip figures, "config": {...}, "n_params", "n_active_params", "train": ...,
      "decode": ...}``.
    Raises:
      UnknownAcceleratorError, ValueError: see :func:`chip_figures`; ConfigError from finalize.
    """
    from efficient_arch.models.lm import count_params

    fcfg = _roofline_cfg(cfg, batch, context)
    m = fcfg.model
    chip_fig = chip_figures(chip, m.dtype, peak_flops=fcfg.flops.peak_flops, hbm_bandwidth=hbm_bandwidth)
    model = _abstract_model(m)
    counts = count_params(m)
    kinds = _layer_kinds(m)
    out = {"chip": chip_fig, "batch": batch, "context": context,
           "mixers": list(dict.fromkeys(k[0] for k in kinds)), "ffns": list(dict.fromkeys(k[1] for k in kinds)),
           "n_layers": m.n_layers, "d_model": m.d_model, "dtype": m.dtype, "param_dtype": m.param_dtype,
           "n_params": counts["n_params"], "n_active_params": counts.get("n_active_params", counts["n_params"])}
    out["decode"] = decode_roofline(fcfg, chip_fig, batch, context, weight_dtype=weight_dtype, _model=model)
    if train:
        out["train"] = train_roofline(fcfg, chip_fig, batch, context, _model=model)
    return out


# ------------------------------------------------------------------------------------- printing

def config_files(directory: str) -> list[str]:
    """Experiment config files (``*.py`` not starting with ``_``) in ``directory``, sorted."""
    import os

    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.endswith(".py") and not f.startswith("_"))


def _si(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if v == 0:
        return f"0 {unit}"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""),
                          (1e-3, "m"), (1e-6, "µ")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v * 1e9:.3g} n{unit}"


def _pct(v: float) -> str:
    return f"{100 * v:.3g}%"


def _chip_caption(chip: dict) -> str:
    return (f"{chip['chip']}: peak {_si(chip['peak_flops_per_s'], 'FLOP/s')} {chip['dtype']} "
            f"({chip['peak_source']}); HBM {_si(chip['hbm_bytes_per_s'], 'B/s')} ({chip['hbm_source']}); "
            f"ridge {chip['ridge_flops_per_byte']:.3g} FLOP/B")


def print_one(result: dict, console=None) -> None:
    """Print :func:`roofline` output as a rich table (rows: quantities; columns: train, decode)."""
    from rich.console import Console
    from rich.table import Table

    steps = [(k, result[k]) for k in ("train", "decode") if k in result]
    table = Table(title=f"Roofline: {'+'.join(result['mixers'])} ({_si(result['n_params'], '')} params, "
                        f"{result['dtype']}) on {result['chip']['chip']}, batch {result['batch']}, "
                        f"context {result['context']}",
                  caption=_chip_caption(result["chip"]))
    table.add_column("per step", style="bold")
    for name, _ in steps:
        table.add_column("train step" if name == "train" else "decode step (1 token/seq)", justify="right")

    def row(label, fn):
        table.add_row(label, *[fn(s) for _, s in steps])

    row("model FLOPs", lambda s: _si(s["flops"], "FLOP"))
    row("FLOPs / token", lambda s: _si(s["flops_per_token"], "FLOP"))
    for term in ("weights", "gradients", "optimizer", "activations", "state_read", "state_written"):
        row(f"bytes: {term.replace('_', ' ')}", lambda s, t=term: _si(s["bytes"].get(t), "B") if t in s["bytes"] else "-")
    row("bytes total", lambda s: _si(s["bytes_total"], "B"))
    row("bytes / token", lambda s: _si(s["bytes_per_token"], "B"))
    row("intensity (FLOP/B)", lambda s: f"{s['intensity_flops_per_byte']:.3g}")
    row("ridge point (FLOP/B)", lambda s: f"{s['ridge_flops_per_byte']:.3g}")
    row("utilization ceiling", lambda s: _pct(s["ceiling"]))
    row("bound", lambda s: s["bound"])
    row("time / step (>=)", lambda s: _si(s["time_s"], "s"))
    row("tokens/s (<=)", lambda s: _si(s["tokens_per_s"], ""))
    (console or Console()).print(table)


def print_all(rows: list[dict], console=None) -> None:
    """Print one row per config (``rows``: :func:`roofline` outputs with a ``config`` key):
    decode bytes per token (and the state's share), FLOPs per token, intensity, ceiling and the
    tokens/s bound, bytes per token relative to ``transformer.py``, and the train-step ceiling."""
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    first = rows[0]
    ref = next((r for r in rows if r["config"] == "transformer.py"), None)
    table = Table(title=f"Decode roofline per architecture: batch {first['batch']}, context {first['context']} "
                        f"on {first['chip']['chip']} ({first['chip']['dtype']})",
                  caption=_chip_caption(first["chip"]))
    for col in ("config", "mixers / ffn", "params", "decode B/token", "state B/token", "FLOPs/token",
                "FLOP/B", "ceiling", "tokens/s (<=)", "B/token vs transformer", "train ceiling"):
        table.add_column(col, justify="left" if col in ("config", "mixers / ffn") else "right",
                         no_wrap=col in ("config", "mixers / ffn"))
    for r in rows:
        d = r["decode"]
        state = (d["bytes"]["state_read"] + d["bytes"]["state_written"]) / d["tokens_per_step"]
        rel = f"{d['bytes_per_token'] / ref['decode']['bytes_per_token']:.3g}x" if ref else "-"
        params = _si(r["n_params"], "")
        if r["n_active_params"] != r["n_params"]:
            params += f" ({_si(r['n_active_params'], '')} active)"
        arch = "+".join(r["mixers"]) + ("" if r["ffns"] == ["mlp"] else " / " + "+".join(r["ffns"]))
        table.add_row(r["config"], arch, params, _si(d["bytes_per_token"], "B"),
                      _si(state, "B"), _si(d["flops_per_token"], "FLOP"), f"{d['intensity_flops_per_byte']:.3g}",
                      _pct(d["ceiling"]), _si(d["tokens_per_s"], ""), rel,
                      _pct(r["train"]["ceiling"]) if "train" in r else "-")
    if console is None:  # eleven columns: never squeeze them into an 80-column pipe
        console = Console(width=max(Console().width, 200))
    console.print(table)
