"""The (gated) delta rule: recurrent oracle, chunked UT-transform form, and one decode step.

Recurrence per batch row and head (state ``S_t`` is ``[K, V]``, row-vector convention)::

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ,     o_t = q_t S_t

DeltaNet is ``alpha_t = 1`` (Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight
Programmers", eq. 23-24; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule
over Sequence Length", eq. 1); Gated DeltaNet is ``alpha_t = exp(log_decay_t)`` with a scalar
per head (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks", eq. 10).

Chunked form (Yang et al. 2024 DeltaNet Sec. 3 / eq. 7-11, the WY/UT representation; gating as in
Gated Delta Networks Sec. 3.3). Write the step as ``S_t = alpha_t S_{t-1} + k_t u_t^T`` with the
"pseudo value" ``u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t)``. In a chunk of ``C`` tokens with
state ``S_0`` at its start and within-chunk cumulative log decays ``g_r = sum_{i<=r} log alpha_i``
(``gamma_r = exp(g_r)``), unrolling gives, for rows ``r`` of the chunk::

    (I + A) U = diag(beta) V - diag(beta gamma) K S_0,   A_ri = beta_r e^{g_r - g_i} k_r.k_i  (i < r)
    => U = Ubar - W S_0,   Ubar = T diag(beta) V,   W = T diag(beta gamma) K,   T = (I + A)^{-1}
    O    = diag(gamma) Q S_0 + (Q K^T * Gamma) U,          Gamma_ri = e^{g_r - g_i}  (i <= r)
    S_C  = gamma_C S_0 + (K * e^{g_C - g})^T U

``T`` (unit lower triangular inverse, the "UT transform") is built by recursive 2x2 block
inversion, ``[[L11, 0], [L21, L22]]^{-1} = [[T11, 0], [-T22 L21 T11, T22]]``, doubling the block
size each level: only batched matmuls (counted by XLA's cost analysis and tensor-core friendly),
unlike a LAPACK/cuBLAS triangular-solve custom call. Everything within a chunk is computed for
all chunks at once; only ``U = Ubar - W S`` and the state update run sequentially over chunks.

Numerics: every exponent is a difference of within-chunk cumulative log decays that is ``<= 0``
(masked before ``exp``), so decays of any size never overflow; states, decays, ``T``, ``W``,
``U`` are float32 (float64 when the inputs are float64) whatever the input dtype; ``QK^T``,
``KK^T`` use the input dtype with float32 accumulation (``preferred_element_type``).

Packed documents (``segment_ids``): at a token whose segment differs from the previous token's,
the state is reset to zero before the update (equivalent to ``alpha_t = 0``); in the chunked form
this is a mask on the intra-chunk matrices and on the carried state, never an infinite log decay.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from efficient_arch.ops import dots
from efficient_arch.ops import scan as _scan

FORMS = ("chunked", "recurrent")


_acc_dtype = dots.acc_dtype


def _check(q, k, v, beta, log_decay, segment_ids, initial_state):
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got q {q.shape}, k {k.shape}")
    b, t, h, dk = q.shape
    if v.ndim != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [B, T, H, V] = [{b}, {t}, {h}, V]; got {v.shape}")
    if beta.shape != (b, t, h):
        raise ValueError(f"beta must be [B, T, H] = {(b, t, h)}; got {beta.shape}")
    if log_decay is not None and log_decay.shape != (b, t, h):
        raise ValueError(f"log_decay must be None or [B, T, H] = {(b, t, h)}; got {log_decay.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = {(b, t)}; got {segment_ids.shape}")
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, K, V] = {(b, h, dk, v.shape[-1])}; "
                         f"got {initial_state.shape}")


def _resets(segment_ids, b, t):
    """bool ``[B, T]``: True where token t starts a new segment (t > 0): the state is zeroed."""
    if segment_ids is None:
        return jnp.zeros((b, t), bool)
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((b, 1), bool), change], axis=1)


def _step(q, k, v, beta, log_decay, state):
    """One recurrence step in the accumulation dtype. q, k [B,H,K]; v [B,H,V]; beta [B,H]."""
    if log_decay is not None:
        state = state * jnp.exp(log_decay)[..., None, None]
    ks = jnp.einsum("bhk,bhkv->bhv", k, state)
    u = beta[..., None] * (v - ks)
    state = state + k[..., :, None] * u[..., None, :]
    return jnp.einsum("bhk,bhkv->bhv", q, state), state


def delta_rule_step(q, k, v, beta, log_decay, state):
    """One decoding step of the (gated) delta rule.

    Args:
      q, k: ``[B, H, K]`` (k L2-normalised by the caller); v: ``[B, H, V]``; beta: ``[B, H]`` in
        (0, 1); log_decay: None (DeltaNet) or ``[B, H]`` ``<= 0``; state: ``[B, H, K, V]``.
    Returns:
      ``(o [B, H, V] in q.dtype, new state [B, H, K, V] float32 (float64 for float64 inputs))``.
    FLOPs:
      ``6 K V`` per head (``k^T S``, the rank-1 update, ``q^T S``) plus ``K V`` when gated.
    Paper: Yang et al. 2024 (Gated Delta Networks) eq. 10 / Schlag et al. 2021 eq. 23-24.
    Raises:
      ValueError: on shape mismatches.
    """
    if q.ndim != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2] or beta.shape != q.shape[:2]:
        raise ValueError(f"expected q, k [B, H, K], v [B, H, V], beta [B, H]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}, beta {beta.shape}")
    if state.shape != q.shape + v.shape[-1:]:
        raise ValueError(f"state must be [B, H, K, V] = {q.shape + v.shape[-1:]}; got {state.shape}")
    acc = _acc_dtype(jnp.result_type(q.dtype, state.dtype))
    ld = None if log_decay is None else log_decay.astype(acc)
    o, state = _step(q.astype(acc), k.astype(acc), v.astype(acc), beta.astype(acc), ld,
                     state.astype(acc))
    return o.astype(q.dtype), state


def _recurrent(q, k, v, beta, log_decay, reset, state):
    acc = state.dtype
    tm = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731  time-major for the scan
    xs = (tm(q.astype(acc)), tm(k.astype(acc)), tm(v.astype(acc)), tm(beta.astype(acc)),
          None if log_decay is None else tm(log_decay.astype(acc)), tm(reset))

    def body(s, x):
        qt, kt, vt, bt, gt, rt = x
        s = jnp.where(rt[:, None, None, None], jnp.zeros_like(s), s)
        o, s = _step(qt, kt, vt, bt, gt, s)
        return s, o

    state, o = _scan.scan(body, state, xs)
    return jnp.moveaxis(o, 0, 1), state


def unit_lower_inverse(a):
    """``(I + A)^{-1}`` for strictly lower-triangular ``A`` ``[..., C, C]`` by block doubling.

    Level ``n = 1, 2, 4, ...``: the block-diagonal inverse with ``n x n`` blocks becomes one with
    ``2n x 2n`` blocks via ``T21 = -T22 L21 T11`` (2 matmuls of ``n^3`` multiply-adds per block
    pair). ``C`` is padded with identity rows to the next power of two ``P``.
    FLOPs per matrix: ``sum_n (P / 2n) 2 (2 n^3) = 2 P (P^2 - 1) / 3``.
    Returns the inverse ``[..., C, C]`` in ``a.dtype`` (unit lower triangular).
    """
    c = a.shape[-1]
    p = 1 << max(c - 1, 0).bit_length()
    if p != c:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, p - c), (0, p - c)])
    batch = a.shape[:-2]
    inv = jnp.ones(batch + (p, 1, 1), a.dtype)  # p diagonal blocks of size 1
    n = 1
    while n < p:
        m = p // (2 * n)
        # lower-left n x n block L21 of each diagonal 2n x 2n block: [.., m, n, n]. The blocks
        # (row a, column a') are laid out [m * m]; the diagonal ones are every (m + 1)-th.
        l21 = a.reshape(batch + (m, 2, n, m, 2, n))[..., :, 1, :, :, 0, :]
        l21 = jnp.swapaxes(l21, -3, -2).reshape(batch + (m * m, n, n))[..., :: m + 1, :, :]
        pairs = inv.reshape(batch + (m, 2, n, n))
        t11, t22 = pairs[..., 0, :, :], pairs[..., 1, :, :]
        t21 = -jnp.einsum("...ij,...jk,...kl->...il", t22, l21, t11)
        inv = dots.join_block_pairs(inv, t21)
        n *= 2
    return inv.reshape(batch + (p, p))[..., :c, :c]


@jax.custom_jvp
def unit_lower_solve(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """``X = (I + A)^{-1} R`` for strictly lower-triangular ``A`` ``[..., C, C]`` and ``R``
    ``[..., C, D]``: the UT transform of the chunked form (module docstring; Yang et al. 2024
    DeltaNet Sec. 3).

    Forward: :func:`unit_lower_inverse` (block doubling) and one product; only the strictly lower
    part of ``A`` is read. Derivative (a custom JVP, so forward and reverse mode both work): from
    ``(I + A) X = R``, ``dX = (I + A)^{-1} (dR - tril(dA, -1) X)``; its transpose, reverse mode,
    is ``R_bar = (I + A)^{-T} X_bar`` and ``A_bar = -tril(R_bar X^T, -1)``: two products instead of
    autodiff through the doubling levels (deltanet layer at T = 2048 on one core: 1.17x).
    Returns ``X`` ``[..., C, D]`` in the dtype of the inputs.
    """
    return jnp.einsum("...ij,...jd->...id", unit_lower_inverse(a), rhs)


@unit_lower_solve.defjvp
def _unit_lower_solve_jvp(primals, tangents):
    a, rhs = primals
    da, drhs = tangents
    tinv = unit_lower_inverse(a)
    x = jnp.einsum("...ij,...jd->...id", tinv, rhs)
    dx = jnp.einsum("...ij,...jd->...id", tinv, drhs - jnp.einsum("...ij,...jd->...id", jnp.tril(da, -1), x))
    return x, dx


def _chunked(q, k, v, beta, log_decay, reset, state, chunk_size, unroll):
    acc = state.dtype
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    if log_decay is None:
        log_decay = jnp.zeros(beta.shape, acc)
    if pad:  # padded steps: k = v = beta = 0, alpha = 1: the state passes through unchanged
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, beta, log_decay, reset = map(padt, (q, k, v, beta, log_decay, reset))

    def chunks(x):  # [B, T, H, ...] -> [B, H, N, C, ...]
        x = x.reshape((b, n, c) + x.shape[2:])
        return jnp.moveaxis(x, 3, 1)

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    bc = chunks(beta.astype(acc))
    g = jnp.cumsum(chunks(log_decay.astype(acc)), axis=-1)  # [B,H,N,C] within-chunk, <= 0
    runs = jnp.cumsum(reset.reshape(b, 1, n, c).astype(jnp.int32), axis=-1)  # resets so far
    idx = jnp.arange(c)
    same = runs[..., :, None] == runs[..., None, :]  # [B,1,N,C,C] no reset between i and r
    incl = same & (idx[:, None] >= idx[None, :])
    strict = same & (idx[:, None] > idx[None, :])
    diff = g[..., :, None] - g[..., None, :]

    def masked_exp(mask, x):  # exp(x) where mask (x <= 0 there), 0 elsewhere; NaN-free gradients
        return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)

    from_start = runs == 0  # rows that still see the chunk's initial state
    gamma = masked_exp(from_start, g)  # [B,H,N,C]
    gamma_end = gamma[..., -1]  # [B,H,N]
    to_end = masked_exp(runs == runs[..., -1:], g[..., -1:] - g)  # [B,H,N,C]

    kk = jnp.einsum("...ik,...jk->...ij", kc, kc, preferred_element_type=acc)
    a = kk * masked_exp(strict, diff) * bc[..., :, None]
    kf, vf = kc.astype(acc), vc.astype(acc)
    rhs = jnp.concatenate([kf * (bc * gamma)[..., None], vf * bc[..., None]], axis=-1)
    wu = unit_lower_solve(a, rhs)
    w, ubar = wu[..., :dk], wu[..., dk:]
    qk = jnp.einsum("...ik,...jk->...ij", qc, kc, preferred_element_type=acc)
    p = qk * masked_exp(incl, diff)
    kdec = kf * to_end[..., None]

    def body(s, x):  # s [B,H,K,V]: the state at this chunk's start
        w_n, ubar_n, kdec_n, gend_n = x
        u = ubar_n - jnp.einsum("bhck,bhkv->bhcv", w_n, s)
        s_next = gend_n[..., None, None] * s + jnp.einsum("bhck,bhcv->bhkv", kdec_n, u)
        return s_next, (s, u)

    nm = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731  chunk-major for the scan
    state, (starts, u) = _scan.scan(body, state, (nm(w), nm(ubar), nm(kdec), nm(gamma_end)),
                                      unroll=unroll)
    starts, u = jnp.moveaxis(starts, 0, 2), jnp.moveaxis(u, 0, 2)  # [B,H,N,K,V], [B,H,N,C,V]
    o = (jnp.einsum("bhnck,bhnkv->bhncv", qc.astype(acc) * gamma[..., None], starts)
         + jnp.einsum("bhnij,bhnjv->bhniv", p, u))
    o = jnp.moveaxis(o, 1, 3).reshape(b, n * c, h, dv)[:, :t]
    return o, state


def delta_rule(q, k, v, beta, log_decay=None, *, segment_ids=None, initial_state=None,
               form: str = "chunked", chunk_size: int = 64, unroll: bool | int = 1):
    """The (gated) delta rule over a sequence (recurrence in the module docstring).

    Args:
      q, k: ``[B, T, H, K]``, any float dtype (k L2-normalised by the caller).
      v: ``[B, T, H, V]``.
      beta: ``[B, T, H]`` writing strengths in (0, 1).
      log_decay: None (DeltaNet, ``alpha = 1``) or ``[B, T, H]`` with values ``<= 0`` (Gated
        DeltaNet, ``alpha_t = exp(log_decay_t)``).
      segment_ids: optional int ``[B, T]``; the state is reset to zero at every token whose id
        differs from the previous token's (packed documents).
      initial_state: optional ``[B, H, K, V]`` state before token 0 (default zeros).
      form: ``"chunked"`` (UT transform + inter-chunk scan) or ``"recurrent"`` (scan over time:
        the oracle).
      chunk_size: chunk length ``C`` of the chunked form; ``min(C, T)`` is used and ``T`` is
        padded up to a multiple of it.
      unroll: ``lax.scan`` unroll of the inter-chunk loop (chunked form). Default 1 (a rolled
        loop). XLA's cost analysis counts a loop body once, so a rolled lowering under-counts
        the loop's ``4 K V C`` FLOPs per head and chunk by ``(n_chunks - 1)`` times that;
        ``unroll=True`` gives a loop-free lowering whose count is exact (cheap to *lower* for a
        FLOP audit, but on CPU ~3-12x slower to compile and ~3x slower to run: measured fwd+bwd,
        T = 1024, 16 chunks: compile 18.6 s vs 5.6 s, run 38 ms vs 13 ms).
    Returns:
      ``(o [B, T, H, V] in q.dtype, final_state [B, H, K, V])``; the state is float32 (float64
      when the inputs are float64).
    FLOPs:
      :func:`flops_delta_rule` (per token, the executed form).
    Raises:
      ValueError: unknown ``form``, non-positive ``chunk_size`` or mismatched shapes.
    """
    _check(q, k, v, beta, log_decay, segment_ids, initial_state)
    if form not in FORMS:
        raise ValueError(f"form={form!r}: choose one of {FORMS}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, t, h, dk = q.shape
    acc = _acc_dtype(q.dtype)
    if initial_state is None:
        state = jnp.zeros((b, h, dk, v.shape[-1]), acc)
    else:
        state = initial_state.astype(acc)
    reset = _resets(segment_ids, b, t)
    if form == "recurrent":
        o, state = _recurrent(q, k, v, beta, log_decay, reset, state)
    else:
        o, state = _chunked(q, k, v, beta, log_decay, reset, state, chunk_size, unroll)
    return o.astype(q.dtype), state


def flops_delta_rule(seq_len: int, n_heads: int, k_dim: int, v_dim: int, *, form: str,
                     chunk_size: int, gated: bool) -> float:
    """Forward FLOPs per token (all heads) of :func:`delta_rule` as executed.

    recurrent, per head: ``6 K V`` (``k^T S``: 2KV, rank-1 update ``k u^T`` add: 2KV, ``q^T S``:
    2KV) ``+ K V`` when gated (scaling ``S`` by ``alpha``).

    chunked, per head, with ``C = min(chunk_size, T)``, ``P`` = next power of two >= C, and the
    padding factor ``ceil(T / C) C / T``:

        2 C K        K K^T (full C x C block)
      + 2 (P^2-1)/3  UT transform ``(I + A)^{-1}`` by block doubling
      + 2 C (K + V)  W = T diag(beta gamma) K,  Ubar = T diag(beta) V
      + 2 C K        Q K^T
      + 2 C V        (Q K^T * Gamma) U
      + 6 K V        W S, Q S, (K e^{g_C - g})^T U

    i.e. ``C (6 K + 4 V) + 2 (P^2 - 1) / 3 + 6 K V``. Elementwise work (decay masks, exp, the
    ``gamma_C S`` scaling) is not counted. Of the ``6 K V``, ``4 K V`` (``W S`` and the state
    update) run inside the sequential loop over chunks (see ``unroll`` in :func:`delta_rule`).

    Raises:
      ValueError: unknown ``form``.
    """
    kd, vd = float(k_dim), float(v_dim)
    if form == "recurrent":
        per_head = 6 * kd * vd + (kd * vd if gated else 0.0)
    elif form == "chunked":
        c = min(chunk_size, seq_len)
        p = 1 << max(c - 1, 0).bit_length()
        padded = math.ceil(seq_len / c) * c / seq_len
        per_head = padded * (c * (6 * kd + 4 * vd) + 2 * (p * p - 1) / 3 + 6 * kd * vd)
    else:
        raise ValueError(f"form={form!r}: the delta rule has forms {FORMS}")
    return n_heads * per_head
