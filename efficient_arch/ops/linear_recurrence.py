"""Gated linear attention: one recurrence, three executable forms, and feature maps.

The recurrence (state ``S_t`` ``[K, V]`` per batch row and head)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          o_t = q_t S_t            (1)

covers causal linear attention (``g = 0``; Katharopoulos et al. 2020, eq. 9-10), RetNet
retention (``g_t = log gamma_h``, a scalar per head; Sun et al. 2023, eq. 1-6), Mamba-2's SSD
(scalar data-dependent ``g_t = dt_t A``; Dao & Gu 2024, eq. 16) and GLA (``g_t`` a vector over the
key dimension, ``diag(alpha_t)`` with ``alpha_t = exp(g_t)``; Yang et al. 2023, eq. 3).

Forms (all equal up to float rounding; tests check outputs, final states and gradients):

* ``recurrent``: ``jax.lax.scan`` over time of (1): the oracle. ``O(T K V)``.
* ``chunked``: Yang et al. 2023 sec. 3-4 / Sun et al. 2023 eq. 7. The sequence is cut into chunks
  of ``C`` tokens; within a chunk the output is a masked quadratic form, across chunks a state
  ``S`` ``[K, V]`` is passed by a ``scan`` over chunks::

      b_i = sum_{l <= i} g_l                       (chunk-local inclusive cumsum, float32, <= 0)
      o_i = sum_{j <= i} (q_i * exp(b_i - b_j)) . k_j  v_j   +   (q_i * exp(b_i)) S_prev
      S_next = diag(exp(b_last)) S_prev + sum_j (k_j * exp(b_last - b_j))^T v_j

  Only differences ``b_i - b_j`` with ``i >= j`` are exponentiated (all ``<= 0``), never
  ``exp(+b)``, so a per-step log decay of -5 or a total of -1e4 stays finite. For a per-key-dim
  (vector) decay the intra-chunk scores cannot be one matmul without ``exp(+b)``; we take the
  secondary chunking of Yang et al. 2023 sec. 4.2 down to single tokens: the chunk is halved
  recursively, and at every level the block of the second half's queries against the first half's
  keys is one matmul of ``q_i exp(b_i - m)`` and ``k_j exp(m - b_j)``, ``m`` the cumulative decay
  at the end of the first half (both exponents ``<= 0``); a token's own score is ``q_i . k_i``.
  ``ceil(log2 C)`` levels (a chunk length that is not a power of two is padded inside the chunk),
  each materialising two half-size copies of ``q`` / ``k`` (no ``[c, c, K]`` pairwise tensor;
  scalar or no decay: ``[C, C]`` per head).
* ``quadratic``: the masked ``T x T`` form ``o = ((Q K^T) * D) V`` with ``D_ij = exp(b_i - b_j)``,
  ``b`` the cumsum of ``g`` over the sequence (vector decay: per key dimension, a ``[T, T, K]``
  tensor). ``O(T^2)`` memory: a test reference and short-sequence form.

Segments (packed documents): where ``segment_ids[t] != segment_ids[t-1]`` the state is reset
(``S_{t-1} := 0``) in every form; the chunked and quadratic forms mask pairs from different
segments and drop the carried state across a reset (no ``-inf`` arithmetic).

Precision: log decays are cast to float32 (float64 for float64 inputs) before any cumsum; the state
and all matmul accumulations are float32 (``preferred_element_type``) whatever the input dtype;
matmul *operands* are in the compute dtype (``q.dtype``), e.g. bfloat16, except the vector-decay
score levels with halves under ``SUB_CHUNK`` tokens, which stay in float32. Output in ``q.dtype``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from efficient_arch.ops import dots
from efficient_arch.ops import scan as _scan

FORMS = ("chunked", "recurrent", "quadratic")
SUB_CHUNK = 16  # vector decay, chunked form: halving levels with halves >= this many tokens use the compute dtype


# ----------------------------------------------------------------------------- helpers


_acc_dtype = dots.acc_dtype
_mm = dots.dot_canonical


def _cumsum(x: jax.Array, axis: int) -> jax.Array:
    """Inclusive cumsum by a parallel prefix (``lax.associative_scan``): ``O(log n)`` adds per
    element, where ``jnp.cumsum`` lowers to a ``reduce_window`` of ``n`` adds per element on
    CPU (and XLA's cost analysis counts it so)."""
    return jax.lax.associative_scan(jnp.add, x, axis=axis)


def _ones_column(v: jax.Array) -> jax.Array:
    """``[..., V] -> [..., V + 1]``: normalised attention's definition, a ones column whose output
    column is the denominator ``q . z``."""
    return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _divide_by_last(o: jax.Array, eps: float) -> jax.Array:
    """``[..., V + 1] -> [..., V]``: the output columns over the last (denominator) column + eps."""
    return o[..., :-1] / (o[..., -1:] + eps)


def _masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``exp(x)`` where ``mask`` else 0, with no inf/NaN in values or gradients (double where)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _segment_counter(segment_ids: jax.Array | None, b: int, t: int) -> jax.Array:
    """int32 ``[B, T]`` running count of resets: tokens may interact iff their counters are equal.

    A reset happens at ``t >= 1`` where ``segment_ids[t] != segment_ids[t-1]`` (so ids that
    come back, e.g. ``0 0 1 0``, still start a new segment); the counter of token 0 is 0.
    """
    if segment_ids is None:
        return jnp.zeros((b, t), jnp.int32)
    reset = jnp.concatenate([jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return _cumsum(reset.astype(jnp.int32), axis=1)


def _check_eps(eps) -> None:
    """``eps`` of the normalised forms: a number >= 0 (a traced value is not checked)."""
    if isinstance(eps, (int, float)) and not eps >= 0:
        raise ValueError(f"eps={eps!r}: the denominator offset must be >= 0 (0: none)")


def _check(q, k, v, log_decay, segment_ids, initial_state, form, chunk_size, normalize=False, eps=0.0):
    if form not in FORMS:
        raise ValueError(f"form={form!r}: choose one of {FORMS}")
    _check_eps(eps)
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, T, H, K] and v [B, T, H, V]; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    b, t, h, kd = q.shape
    if log_decay is not None and log_decay.shape not in ((b, t, h), (b, t, h, kd)):
        raise ValueError(f"log_decay must be [B, T, H] or [B, T, H, K] = {(b, t, h)} or {(b, t, h, kd)}; "
                         f"got {log_decay.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = {(b, t)}; got {segment_ids.shape}")
    vs = v.shape[-1] + bool(normalize)
    if initial_state is not None and initial_state.shape != (b, h, kd, vs):
        what = "[B, H, K, V + 1] (normalize=True: the last column is z)" if normalize else "[B, H, K, V]"
        raise ValueError(f"initial_state must be {what} = {(b, h, kd, vs)}; got {initial_state.shape}")
    if form == "quadratic" and initial_state is not None:
        raise ValueError("form='quadratic' does not take an initial_state; use 'chunked' or 'recurrent'")
    if form == "chunked" and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


# ----------------------------------------------------------------------------- public API


def gated_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array | None = None, *,
                           segment_ids: jax.Array | None = None, initial_state: jax.Array | None = None,
                           form: str = "chunked", chunk_size: int = 64, normalize: bool = False,
                           eps: float = 0.0, feature_map: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Causal gated linear attention, recurrence (1) of the module docstring, optionally normalised.

    Args:
      q, k: ``[B, T, H, K]``, any float dtype (the compute dtype of the matmul operands).
      v: ``[B, T, H, V]``.
      log_decay: None (no decay: plain linear attention), ``[B, T, H]`` (scalar per head and
        step: RetNet, Mamba-2) or ``[B, T, H, K]`` (per key dimension: GLA). Values ``<= 0``
        (log of the decay factor ``alpha_t in (0, 1]``); any float dtype, used in float32.
      segment_ids: optional int ``[B, T]``; ``S_{t-1} := 0`` where ``segment_ids[t] !=
        segment_ids[t-1]``.
      initial_state: optional ``[B, H, K, V]`` (float32), the state before token 0.
      form: ``"chunked"`` | ``"recurrent"`` | ``"quadratic"`` (see the module docstring). The
        chunked form with a per-key ``log_decay`` (``[..., K]``, GLA) is reverse-mode
        differentiable only (its chunk loop stores its residuals through a custom VJP:
        ``ops.scan.scan(store_residuals=True)``; no second derivatives in bfloat16).
      chunk_size: ``C`` of the chunked form; ``T`` need not be a multiple (padding with
        ``k = v = 0, g = 0``, which leaves outputs and the final state unchanged).
      normalize: normalised (kernel) linear attention, Katharopoulos et al. 2020 eq. 2 / 9:
        ``o_t = q_t S_t / (q_t z_t + eps)`` with ``z_t = diag(exp(g_t)) z_{t-1} + k_t`` ``[K]``,
        i.e. recurrence (1) run on ``v`` with a ones column appended, whose output column is the
        denominator. The chunked form computes ``z`` apart (intra-chunk: row sums of the masked
        scores; inter-chunk: ``q z_prev``), so its matmuls keep the width ``V`` (a ``V + 1`` = 65
        wide operand ran XLA:CPU's batched dots up to 2.4x slower than 64: benchmarks/NOTES.md);
        the recurrent and quadratic forms append the column. The state carries ``z`` as its last
        column: ``initial_state`` / ``final_state`` ``[B, H, K, V + 1]``.
      eps: added to the denominator when ``normalize`` (0: none; the caller's feature map must
        keep ``q_t z_t`` away from 0).
      feature_map: None (``q``, ``k`` are the features), or a name of :func:`feature_map`
        (``"identity"``, ``"elu"``, ``"taylor"``): ``q``, ``k`` are then the raw ``[B, T, H, F]``
        vectors, the op applies the map, and the state's key width is ``K = feature_dim(name, F)``
        (``initial_state`` / ``final_state`` and a vector ``log_decay`` use that ``K``). With
        ``"taylor"`` the chunked form's intra-chunk scores use the kernel itself,
        ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q . k / sqrt(F)`` (an ``F``-wide product
        instead of a ``1 + F + F^2``-wide one: Arora et al. 2024, sec. 3.1), when the decay is
        none or scalar; the state still carries the ``1 + F + F^2`` features.

    Returns:
      ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in ``q.dtype`` with ``o_t = q_t S_t`` (the
      current token included; divided by ``q_t z_t + eps`` in float32 when ``normalize``);
      ``final_state`` ``S_T`` ``[B, H, K, V]`` (``[B, H, K, V + 1]``, ``z_T`` last, when
      ``normalize``) float32 (float64 for float64 inputs).

    FLOPs: see :func:`flops_gated_linear_attention`.

    Raises:
      ValueError: unknown form, inconsistent shapes, ``initial_state`` with ``form="quadratic"``,
        a non-positive ``chunk_size``, a negative (or NaN) ``eps``, an unknown ``feature_map``, or
        non-float ``q``, ``k``, ``v``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):  # a feature map would round ints back to ints
            raise ValueError(f"{name} must be a float array; got dtype {x.dtype}")
    raw, f_raw = None, q.shape[-1]
    if feature_map is not None:
        if q.shape != k.shape:
            raise ValueError(f"expected raw q, k [B, T, H, F] of one shape; got q {q.shape}, k {k.shape}")
        if feature_map == "taylor" and form == "chunked" and (log_decay is None or log_decay.ndim == 3):
            raw = (q, k)  # intra-chunk scores from the kernel 1 + s + s^2 / 2 (docstring)
        q, k = _apply_feature_map(feature_map, q), _apply_feature_map(feature_map, k)
    try:
        _check(q, k, v, log_decay, segment_ids, initial_state, form, chunk_size, normalize, eps)
    except ValueError as e:
        if feature_map is None:
            raise
        # the shapes it names are the mapped ones: say where K comes from
        raise ValueError(f"{e} [with feature_map={feature_map!r}: q, k are the raw [B, T, H, F = {f_raw}] "
                         f"and the state's key width is K = feature_dim({feature_map!r}, {f_raw}) = "
                         f"{q.shape[-1]}]") from None
    if normalize and form != "chunked":
        v = _ones_column(v)
    bsz, t, h, kd = q.shape
    vd = v.shape[-1] + (normalize and form == "chunked")
    acc = _acc_dtype(q.dtype)
    g = None
    if log_decay is not None:
        g = log_decay.astype(acc)
        if g.ndim == 3:
            g = g[..., None]  # [B, T, H, 1]: scalar decay broadcasts over K
    cnt = _segment_counter(segment_ids, bsz, t)
    s0 = (jnp.zeros((bsz, h, kd, vd), acc) if initial_state is None else initial_state.astype(acc))
    if form == "recurrent":
        o, s = _recurrent(q, k, v, g, cnt, s0, acc)
    elif form == "quadratic":
        o, s = _quadratic(q, k, v, g, cnt, acc)
    else:
        o, s = _chunked(q, k, v, g, cnt, s0, chunk_size, acc, normalize, eps, raw)
    if normalize and form != "chunked":
        o = _divide_by_last(o, eps)
    return o.astype(q.dtype), s


def gla_step(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array | None,
             state: jax.Array, *, normalize: bool = False, eps: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """One decode token of recurrence (1): ``S = diag(exp(g)) S + k^T v``; ``o = q S``.

    Args:
      q, k: ``[B, H, K]``; v: ``[B, H, V]``; log_decay: None, ``[B, H]`` or ``[B, H, K]``.
      state: ``[B, H, K, V]`` float32 (the state after the previous token); ``[B, H, K, V + 1]``
        with ``normalize`` (``z`` last, as :func:`gated_linear_attention` returns it).
      normalize, eps: ``o = q S / (q z + eps)`` as in :func:`gated_linear_attention`.
    Returns:
      ``(o [B, H, V] in q.dtype, state float32 of the input state's shape)``. FLOPs per head:
      ``(5 + decay) K V`` (``V + 1`` with ``normalize``) as in :func:`flops_gated_linear_attention`
      ``form="recurrent"``.
    Raises:
      ValueError: inconsistent shapes of q / k / v / log_decay, a state that is not
        ``[B, H, K, V]`` (``[B, H, K, V + 1]`` with ``normalize``), or a negative ``eps``.
    """
    _check_eps(eps)
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"gla_step: expected q, k [B, H, K] and v [B, H, V]; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    if log_decay is not None and log_decay.shape not in (q.shape[:2], q.shape):
        raise ValueError(f"gla_step: log_decay must be [B, H] or [B, H, K] = {q.shape[:2]} or {q.shape}; got "
                         f"{log_decay.shape}")
    want = q.shape + (v.shape[-1] + bool(normalize),)
    if state.shape != want:
        what = "[B, H, K, V + 1] (normalize=True: the last column is z)" if normalize else "[B, H, K, V]"
        raise ValueError(f"gla_step: state must be {what} = {want}; got {state.shape}")
    if normalize:
        v = _ones_column(v)
    acc = _acc_dtype(q.dtype)
    s = state.astype(acc)
    if log_decay is not None:
        gg = log_decay.astype(acc)
        gg = gg[..., None, None] if gg.ndim == 2 else gg[..., None]
        s = jnp.exp(gg) * s
    s = s + jnp.einsum("bhk,bhv->bhkv", k.astype(acc), v.astype(acc))
    o = jnp.einsum("bhk,bhkv->bhv", q.astype(acc), s)
    if normalize:
        o = _divide_by_last(o, eps)
    return o.astype(q.dtype), s


def flops_gated_linear_attention(seq_len: int, n_heads: int, k_dim: int, v_dim: int, *, form: str,
                                 chunk_size: int = 64, vector_decay: bool = False,
                                 has_decay: bool = True, normalize: bool = False,
                                 score_dim: int | None = None) -> float:
    """Forward FLOPs per token of :func:`gated_linear_attention` as executed.

    With ``H`` heads, key dim ``K``, value dim ``V``, chunk ``C`` (the op uses ``C_eff = min(C, T)``
    and pads ``T`` up to ``n C_eff``, ``n = ceil(T / C_eff)``; padding factor ``p = n C_eff / T``):

    * ``recurrent``: ``H * (5 + has_decay) K V``: the rank-1 update ``k^T v`` (a dot with
      contraction size 1, ``2 K V`` as XLA counts it), the state add (``K V``), the decay scaling
      (``K V``, if any) and the read-out ``q S`` (``2 K V``).
    * ``chunked``: ``H * p * [2 C_eff (K + V) + 4 K V]``: the full ``C x C`` score block
      (``Q K^T``, masked entries included) and ``A V``; ``q S_prev`` and the chunk's state
      contribution ``K~^T V``. Vector decay replaces the ``2 C_eff K`` of the score block by what
      the recursive halving executes: with ``C_p`` = ``C_eff`` rounded up to a power of two, the
      blocks of every level (``C_p K (C_p - 1)`` per chunk) and the diagonal ``q_i . k_i``
      (``2 C_p K``), i.e. ``C_p (C_p + 1) K / C_eff`` per token.
    * ``quadratic``: ``H * 2 T (K + V)`` (the full ``T x T`` square is executed; with a vector
      decay the ``T x T x K`` scores are elementwise and XLA counts ~3x this for them).
    * ``score_dim``: the chunked form's score block contracts ``score_dim`` instead of ``K``
      (``2 C_eff score_dim``): ``F`` for ``feature_map="taylor"`` with no / scalar decay, whose
      scores come from the raw ``F``-wide ``q . k`` (the kernel ``1 + s + s^2 / 2`` is elementwise).
    * ``normalize``: the recurrent and quadratic forms run ``V + 1`` columns (the ones column);
      the chunked form adds ``2 K`` per head for the inter-chunk denominator ``q~ . z_prev`` (its
      intra-chunk part, row sums of the scores, and the ``z`` update are elementwise).

    Not counted in the chunked / quadratic forms: decay exponentials, masks, cumsums and the
    elementwise decay scaling (``O(C)`` per token and head for a scalar decay, ``O(K log C)`` for a
    vector decay; XLA counts them: at ``K = V = 32, C = 64`` about ``+3%`` of the core for scalar
    decay and ``+13%`` for vector decay).

    Raises:
      ValueError: unknown form.
    """
    if form not in FORMS:
        raise ValueError(f"form={form!r}: choose one of {FORMS}")
    if normalize and form != "chunked":
        v_dim += 1
    if form == "recurrent":
        per_head = (5.0 + bool(has_decay)) * k_dim * v_dim
    elif form == "quadratic":
        per_head = 2.0 * seq_len * (k_dim + v_dim)
    else:
        c = min(chunk_size, seq_len)
        pad = math.ceil(seq_len / c) * c / seq_len
        if vector_decay:
            cp = 1 << (c - 1).bit_length()
            per_head = 2.0 * c * v_dim + cp * (cp + 1) * k_dim / c + 4.0 * k_dim * v_dim
        else:
            per_head = 2.0 * c * ((k_dim if score_dim is None else score_dim) + v_dim) + 4.0 * k_dim * v_dim
        per_head += 2.0 * k_dim * bool(normalize)
        per_head *= pad
    return n_heads * per_head


# ----------------------------------------------------------------------------- forms


def _recurrent(q, k, v, g, cnt, s0, acc):
    """``lax.scan`` over time of (1); returns (o [B, T, H, V] acc, S_T)."""
    bsz, t, h, kd = q.shape
    reset = jnp.concatenate([jnp.zeros((bsz, 1), bool), cnt[:, 1:] != cnt[:, :-1]], axis=1)
    tm = lambda x: jnp.moveaxis(x, 1, 0)  # time-major
    xs = (tm(q.astype(acc)), tm(k.astype(acc)), tm(v.astype(acc)), tm(reset),
          tm(g) if g is not None else None)

    def step(s, x):
        qt, kt, vt, rt, gt = x
        if gt is not None:
            s = jnp.exp(gt)[..., None] * s  # gt [B, H, 1|K]
        s = jnp.where(rt[:, None, None, None], 0.0, s)
        s = s + jnp.einsum("bhk,bhv->bhkv", kt, vt)
        return s, jnp.einsum("bhk,bhkv->bhv", qt, s)

    s, o = _scan.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s


def _quadratic(q, k, v, g, cnt, acc):
    """Masked ``T x T`` form; the decay between ``j <= i`` is ``exp(b_i - b_j)`` with ``b`` the
    inclusive cumsum over the whole sequence. The exponent is ``<= 0`` (masked before ``exp``), but
    the subtraction of two cumulative sums loses ``~|b_T| * 2^-24`` absolute in float32: a relative
    error of ~6e-4 in the decay factors at a total log decay of -1e4 (the chunked form, with
    chunk-local cumsums, does not have this loss). An exact per-pair segment sum would cost
    ``O(T^3)`` (XLA's cumsum over a ``[T, T]`` mask)."""
    dt = q.dtype
    t = q.shape[1]
    ii = jnp.arange(t)[:, None]
    jj = jnp.arange(t)[None, :]
    mask = (ii >= jj)[None] & (cnt[:, :, None] == cnt[:, None, :])  # [B, Ti, Tj]
    mask_h = mask[:, None]  # [B, 1, Ti, Tj]
    if g is None:
        a = _mm("bihk,bjhk->bhij", q, k, dt, acc) * mask_h
        w_last = mask[:, -1, :, None, None].astype(acc)  # [B, Tj, 1, 1]
    else:
        b = _cumsum(g, axis=1)  # [B, T, H, 1|K]
        dec = _masked_exp(b[:, :, None] - b[:, None, :], mask[..., None, None])  # [B, Ti, Tj, H, 1|K]
        if g.shape[-1] == 1:
            a = _mm("bihk,bjhk->bhij", q, k, dt, acc) * jnp.moveaxis(dec[..., 0], 3, 1)
        else:
            a = jnp.einsum("bihk,bjhk,bijhk->bhij", q.astype(acc), k.astype(acc), dec)
        w_last = dec[:, -1]  # [B, Tj, H, 1|K]
    o = _mm("bhij,bjhv->bihv", a, v, dt, acc)
    s = jnp.einsum("bjhk,bjhv->bhkv", k.astype(acc) * w_last, v.astype(acc))
    return o, s


def _chunked(q, k, v, g, cnt, s0, chunk, acc, normalize=False, eps=0.0, raw=None):
    """Intra-chunk quadratic + inter-chunk state passing (module docstring). ``normalize``:
    ``s0`` is ``[B, H, K, V + 1]`` (``z`` last), the output is divided by the denominator ``q z``
    (intra-chunk: row sums of the masked, decayed scores; inter-chunk: ``q~ z_prev``, with ``z``
    passed by the same scan as the state), and the final state carries ``z`` last. ``raw``: the
    raw ``(q, k)`` ``[B, T, H, F]`` whose Taylor features are ``q``, ``k``; the intra-chunk scores are then
    ``1 + s + s^2 / 2``, ``s = q_raw . k_raw / sqrt(F)`` (no or scalar decay only)."""
    dt = q.dtype
    bsz, t, h, kd = q.shape
    vd = v.shape[-1]
    if normalize:
        s0, z0 = s0[..., :-1], s0[..., -1]
    c = min(chunk, t)  # a chunk longer than the sequence would only add padding
    n = -(-t // c)
    pad = n * c - t
    if pad:
        zpad = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v = zpad(q), zpad(k), zpad(v)
        g = zpad(g) if g is not None else None
        raw = tuple(zpad(x) for x in raw) if raw is not None else None
        cnt = jnp.pad(cnt, [(0, 0), (0, pad)], mode="edge")
    # head-major chunks [B, N, H, C, *]: every product below is a batched matmul over (B, N, H)
    # with contiguous [C, *] operands (one transpose of the inputs here and of the output at the end)
    ch = lambda x: jnp.moveaxis(x.reshape((bsz, n, c) + x.shape[2:]), 3, 2)
    q, k, v = ch(q), ch(k), ch(v)

    def scores():  # [B, N, H, Ci, Cj]: q_i . k_j, by the Taylor kernel from the raw vectors
        if raw is None:
            return _mm("bnhik,bnhjk->bnhij", q, k, dt, acc)
        sc = _mm("bnhik,bnhjk->bnhij", ch(raw[0]), ch(raw[1]), dt, acc) * _taylor_scale(raw[0].shape[-1]) ** 2
        return 1.0 + sc * (1.0 + 0.5 * sc)
    cnt = cnt.reshape(bsz, n, c)
    cnt_prev = jnp.concatenate([jnp.zeros((bsz, 1), jnp.int32), cnt[:, :-1, -1]], axis=1)  # [B, N]
    cnt_last = cnt[:, :, -1]
    ii = jnp.arange(c)[:, None]
    jj = jnp.arange(c)[None, :]
    same = ((ii >= jj) & (cnt[:, :, :, None] == cnt[:, :, None, :]))[:, :, None]  # [B, N, 1, Ci, Cj]
    from_prev = (cnt == cnt_prev[:, :, None])[:, :, None, :, None]  # [B, N, 1, C, 1]
    to_last = (cnt == cnt_last[:, :, None])[:, :, None, :, None]
    keep = (cnt_last == cnt_prev)[:, :, None, None]  # [B, N, 1, 1]: no reset inside the chunk

    if g is None:
        a = scores() * same
        qd = jnp.where(from_prev, q, 0)
        kd = jnp.where(to_last, k, 0)
        a_tot = jnp.ones((bsz, n, h, 1), acc)
    else:
        b = _cumsum(ch(g), axis=3)  # [B, N, H, C, 1|K], chunk-local, <= 0
        if pad:  # padded steps (g = 0) repeat the last real b exactly: the prefix sum's rounding
            # differs by position, and b_last would carry that ulp into every exp(b_last - b_j)
            r = c - pad
            b = b.at[:, -1:, :, r:].set(jnp.broadcast_to(b[:, -1:, :, r - 1:r], b[:, -1:, :, r:].shape))
        b_last = b[:, :, :, -1:]  # [B, N, H, 1, 1|K]
        qd = _masked_exp(b, from_prev) * q.astype(acc)
        kd = _masked_exp(b_last - b, to_last) * k.astype(acc)
        a_tot = jnp.exp(b_last[:, :, :, 0])  # [B, N, H, 1|K]
        if g.shape[-1] == 1:
            diff = b[..., :, None, 0] - b[..., None, :, 0]  # [B, N, H, Ci, Cj]
            a = scores() * _masked_exp(diff, same)
        else:
            a = _vector_scores(q, k, b, same, dt, acc)
    o = _mm("bnhij,bnhjv->bnhiv", a, v, dt, acc)

    # Inter-chunk: state contribution of each chunk, then a scan over chunks.
    u = _mm("bnhjk,bnhjv->bnhkv", kd, v, dt, acc)  # [B, N, H, K, V]
    decay = jnp.where(keep, a_tot, 0.0)[..., None]  # [B, N, H, 1|K, 1]

    def step(s, x):
        d, un = x
        return d * s + un, s

    def step_z(sz, x):  # normalize: z follows the same recurrence on the chunk sums of kd
        (s, z), (d, un, uz) = sz, x
        return (d * s + un, d[..., 0] * z + uz), sz

    # GLA's per-key decay: its backward reads each chunk's residuals stored once (ops/scan.py;
    # GLA layer at T = 2048 1.04-1.08x in separate processes; scalar decays measured 0.8-1.0x)
    vector_decay = g is not None and g.shape[-1] > 1
    xs = (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(u, 1, 0))
    if normalize:
        xs = xs + (jnp.moveaxis(jnp.sum(kd.astype(acc), axis=3), 1, 0),)  # [N, B, H, K]
        (s, z), (s_prev, z_prev) = _scan.scan(step_z, (s0, z0), xs, store_residuals=vector_decay)
    else:
        s, s_prev = _scan.scan(step, s0, xs, store_residuals=vector_decay)
    s_prev = jnp.moveaxis(s_prev, 0, 1)  # [B, N, H, K, V]: state before each chunk
    o = o + _mm("bnhik,bnhkv->bnhiv", qd, s_prev, dt, acc)
    o = jnp.moveaxis(o, 2, 3).reshape(bsz, n * c, h, vd)[:, :t]
    if normalize:
        den = jnp.sum(a, axis=-1)  # [B, N, H, Ci]: intra-chunk q_i . z
        den = den + jnp.einsum("bnhik,bnhk->bnhi", qd.astype(acc), jnp.moveaxis(z_prev, 0, 1))
        den = jnp.moveaxis(den, 2, 3).reshape(bsz, n * c, h)[:, :t, :, None]  # padded rows dropped (0 / 0)
        o = o / (den + eps)
        s = jnp.concatenate([s, z[..., None]], axis=-1)
    return o, s


def _vector_scores(q, k, b, same, dt, acc):
    """Intra-chunk scores ``A_ij = sum_d q_id k_jd exp(b_id - b_jd)`` (i >= j, same segment) for a
    per-key-dim decay, by recursive halving of the chunk (secondary chunking, Yang et al. 2023
    sec. 4.2, applied at every scale down to single tokens).

    A block of ``s`` tokens is split into halves; the scores of the second half's queries against
    the first half's keys are one matmul of ``q_i exp(b_i - m)`` and ``k_j exp(m - b_j)``, with
    ``m`` the cumulative decay at the end of the first half (``b`` is non-increasing, so both
    exponents are ``<= 0``: exact and finite for any log decay ``<= 0``); the halves recurse, and a
    single token's score is ``q_i . k_i``. ``K`` exponentials per token and level (``K log2 C_p``
    in all, ``C_p`` the chunk length padded to a power of two) and no ``[c, c, K]`` pairwise
    tensor. A chunk length that is not a power of two is padded inside the chunk (zero ``q`` /
    ``k``, repeated ``b``).

    q, k: ``[B, N, H, C, K]``; b: chunk-local cumsum ``[B, N, H, C, K]``; same: ``[B, N, 1, C, C]``.
    Operands of the levels with halves of ``>= SUB_CHUNK`` tokens are cast to ``dt`` (e.g.
    bfloat16), the finer levels stay in ``acc``. Returns ``[B, N, H, C, C]`` in ``acc``.
    """
    bsz, n, h, c, kd = q.shape
    cp = 1 << (c - 1).bit_length()  # chunk length padded to a power of two
    q, k = q.astype(acc), k.astype(acc)
    if cp != c:
        pc = [(0, 0)] * 3 + [(0, cp - c), (0, 0)]
        q, k, b = jnp.pad(q, pc), jnp.pad(k, pc), jnp.pad(b, pc, mode="edge")
    a = jnp.sum(q * k, axis=-1)[..., None, None]  # [B, N, H, Cp, 1, 1]: the diagonal
    s = 2
    while s <= cp:
        hs = s // 2
        blocks = lambda x: x.reshape(x.shape[:3] + (cp // s, 2, hs, x.shape[-1]))
        qb, kb, bb = blocks(q), blocks(k), blocks(b)  # [B, N, H, G, 2, hs, K]
        m = bb[..., 0, hs - 1:, :]  # [B, N, H, G, 1, K]: end of the first half
        q_hat = qb[..., 1, :, :] * jnp.exp(bb[..., 1, :, :] - m)
        k_hat = kb[..., 0, :, :] * jnp.exp(m - bb[..., 0, :, :])
        low = _mm("bnhgik,bnhgjk->bnhgij", q_hat, k_hat, dt if hs >= SUB_CHUNK else acc, acc)
        a = dots.join_block_pairs(a, low)  # [B, N, H, G, s, s]
        s *= 2
    a = a.reshape(bsz, n, h, cp, cp)[..., :c, :c]
    return a * same


# ----------------------------------------------------------------------------- feature maps


def _taylor_scale(d: int) -> float:
    """The Taylor map's default input scale ``d^(-1/4)`` (so ``phi(q) . phi(k)`` is a function of
    ``q . k / sqrt(d)``); shared with the chunked form's kernel scores."""
    return d ** -0.25


def taylor_feature_map(x: jax.Array, *, scale: float | None = None) -> jax.Array:
    """2nd-order Taylor feature map of Based (Arora et al. 2024, sec. 3.1 / eq. 3).

    ``phi(x) = [1, x', vec(x' x'^T) / sqrt(2)]`` with ``x' = scale * x`` (default
    ``scale = d^(-1/4)``), so ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q . k / sqrt(d)``:
    the 2nd-order Taylor expansion of ``exp(q . k / sqrt(d))``.

    Args:
      x: ``[..., d]`` any float dtype.
    Returns:
      ``[..., 1 + d + d^2]`` in ``x.dtype`` (computed in float32). Elementwise: ``d^2``
      multiplies per vector.
    """
    d = x.shape[-1]
    s = _taylor_scale(d) if scale is None else scale
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32)) * s
    outer = (xf[..., :, None] * xf[..., None, :]).reshape(x.shape[:-1] + (d * d,)) / math.sqrt(2.0)
    ones = jnp.ones(x.shape[:-1] + (1,), xf.dtype)
    return jnp.concatenate([ones, xf, outer], axis=-1).astype(x.dtype)


def feature_map(name: str, x: jax.Array) -> jax.Array:
    """Apply a linear-attention feature map by name.

    ``identity``: ``x``; ``elu``: ``elu(x) + 1`` (Katharopoulos et al. 2020, eq. 7; positive);
    ``taylor``: :func:`taylor_feature_map` (last dim ``d -> 1 + d + d^2``).

    Raises:
      ValueError: unknown name.
    """
    if name == "identity":
        return x
    if name == "elu":
        return (jax.nn.elu(x.astype(jnp.promote_types(x.dtype, jnp.float32))) + 1.0).astype(x.dtype)
    if name == "taylor":
        return taylor_feature_map(x)
    raise ValueError(f"feature map {name!r}: choose 'identity', 'elu' or 'taylor'")


_apply_feature_map = feature_map  # gated_linear_attention's ``feature_map`` argument shadows the name


def feature_dim(name: str, d: int) -> int:
    """Output width of :func:`feature_map` ``name`` for input width ``d``."""
    return 1 + d + d * d if name == "taylor" else d
