"""LM head + cross-entropy fused and chunked along the sequence: the ``[B, T, vocab]`` logits are
never materialized, and nothing vocab-sized is kept for the backward pass.

For hidden states ``h [B, T, d]``, head ``W [d, V]`` (or the tied embedding ``[V, d]``), targets
``y`` and weights ``m`` (the loss mask), the loss is ``sum_{b,t} m_bt (logsumexp(z_bt) - z_bt[y_bt])``
with ``z = h W``. Its gradients are, with ``p = softmax(z)``::

    dz = m (p - onehot(y))          dh = dz W^T          dW = h^T dz

The forward pass walks the sequence in chunks of ``chunk_size`` positions (all batch rows at
once, so a batch-sharded ``h`` stays sharded; the ``dW`` carry is then a sum over batch shards,
which GSPMD may reduce across devices once per chunk instead of once per step: prefer large
chunks on multi-device runs) and, per chunk, computes the logits, the loss and
immediately ``dz``, ``dh`` and its contribution to ``dW``; only ``dh [B, T, d]`` and ``dW [d, V]``
are kept as residuals, and the backward pass scales them by the incoming cotangent. This is the
"fused linear cross-entropy" of Liger-Kernel (Hsu et al. 2024, Sec. 3.3) and of Wijmans et al.
2024 ("Cut Your Losses in Large-Vocabulary Language Models"), written for XLA with a scan.

FLOPs (XLA count, as autodiff of the unfused form): ``2 d V`` per token for the logits plus
``4 d V`` for ``dh`` and ``dW``; the work of the backward pass happens in the forward. Memory:
one chunk's ``[B, chunk, V]`` float32 logits and probabilities instead of the whole sequence's
(autodiff keeps the ``[B, T, V]`` float32 ``exp`` of the shifted logits, 134 MB at the bench
config, plus its transients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from efficient_arch.ops import dots
from efficient_arch.ops import scan as _scan



_acc = dots.acc_dtype
_dot = dots.dot


def _specs(tied: bool) -> tuple[str, str, str]:
    """(logits, d hidden, d weight) einsum specs for the head layout."""
    if tied:  # w = embedding [V, d]
        return "btd,vd->btv", "btv,vd->btd", "btd,btv->vd"
    return "btd,dv->btv", "btv,dv->btd", "btd,btv->dv"


def _chunks(x, n, c):
    """``[B, n*c, ...]`` -> ``[n, B, c, ...]`` (scan over chunks of the sequence)."""
    return jnp.moveaxis(x.reshape(x.shape[0], n, c, *x.shape[2:]), 1, 0)


def _unchunk(x):
    """``[n, B, c, ...]`` -> ``[B, n*c, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _pad_to_chunks(h, targets, mask, chunk_size):
    """Pad the sequence to a multiple of the chunk (padded positions weigh 0): ``(h, targets,
    mask, n chunks, chunk length)``."""
    t = h.shape[1]
    c = min(chunk_size, t)
    pad = (-t) % c
    if pad:  # padded positions have weight 0: no loss, no gradient
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    return h, targets, mask, (t + pad) // c, c


def _chunk_loss(hc, yc, mc, w, s_logits, dtype):
    """One chunk's logits ``z`` ``[B, c, V]`` (float32), ``logsumexp(z)``, the targets' one-hot and
    the chunk's summed weighted loss ``sum mc * (lse - z[target])``."""
    z = _dot(s_logits, hc, w, dtype)
    lse = jax.nn.logsumexp(z, axis=-1)
    onehot = jax.nn.one_hot(yc, z.shape[-1], dtype=z.dtype)
    zy = jnp.sum(z * onehot, axis=-1)  # no gather over a (possibly vocab-sharded) axis
    return z, lse, onehot, jnp.sum(mc.astype(z.dtype) * (lse - zy))


def linear_cross_entropy_eval(h: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array,
                              chunk_size: int, tied: bool, dtype) -> tuple[jax.Array, jax.Array]:
    """Evaluation form of :func:`linear_cross_entropy`: ``(summed weighted loss, weighted count of
    argmax hits)``, chunk by chunk, without ``[B, T, V]`` logits and without gradients.

    Args: as :func:`linear_cross_entropy`. Returns: two float32 (float64 for float64 inputs)
    scalars: ``sum mask * (logsumexp(z) - z[target])`` in nats and ``sum mask * [argmax z ==
    target]``, equal to the full-logits computation (ties in the argmax resolve to the first
    index, as ``jnp.argmax``).
    """
    h, targets, mask, n, c = _pad_to_chunks(h, targets, mask, chunk_size)
    s_logits = _specs(tied)[0]
    w = w.astype(dtype)

    def body(carry, xs):
        loss, hits = carry
        hc, yc, mc = xs
        z, _, _, chunk_loss = _chunk_loss(hc, yc, mc, w, s_logits, dtype)
        hits = hits + jnp.sum(mc.astype(z.dtype) * (jnp.argmax(z, axis=-1) == yc).astype(z.dtype))
        return (loss + chunk_loss, hits), None

    init = (jnp.zeros((), _acc(dtype)), jnp.zeros((), _acc(dtype)))
    (loss, hits), _ = _scan.scan(body, init, (_chunks(h, n, c), _chunks(targets, n, c), _chunks(mask, n, c)))
    return loss, hits


def _loss_and_grads(h, w, targets, mask, chunk_size, tied, dtype):
    t = h.shape[1]
    h, targets, mask, n, c = _pad_to_chunks(h, targets, mask, chunk_size)
    s_logits, s_dh, s_dw = _specs(tied)
    w = w.astype(dtype)  # once, not per chunk

    def body(carry, xs):
        loss, dw = carry
        hc, yc, mc = xs
        z, lse, onehot, chunk_loss = _chunk_loss(hc, yc, mc, w, s_logits, dtype)
        dz = (jnp.exp(z - lse[..., None]) - onehot) * mc[..., None].astype(z.dtype)
        dh = _dot(s_dh, dz, w, dtype)
        dw = dw + _dot(s_dw, hc, dz, dtype)
        return (loss + chunk_loss, dw), dh

    init = (jnp.zeros((), _acc(dtype)), jnp.zeros(w.shape, _acc(dtype)))
    (loss, dw), dh = _scan.scan(body, init, (_chunks(h, n, c), _chunks(targets, n, c), _chunks(mask, n, c)))
    return loss, _unchunk(dh)[:, :t], dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def linear_cross_entropy(h: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array,
                         chunk_size: int, tied: bool, dtype) -> jax.Array:
    """Summed, weighted token cross-entropy of the LM head ``h W`` without materializing logits.

    Args:
      h: ``[B, T, d_model]`` final-normed hidden states (any float dtype).
      w: the head: ``[d_model, V]``, or the tied embedding ``[V, d_model]`` (``tied=True``).
      targets: int32 ``[B, T]`` in ``[0, V)``.
      mask: float32 ``[B, T]`` loss weights (1 where a position carries a loss).
      chunk_size: sequence positions per chunk (a chunk holds ``[B, chunk_size, V]`` float32
        logits); ``T`` need not be a multiple.
      tied: ``w`` is ``[V, d_model]``.
      dtype: matmul input dtype (float32 accumulation); logsumexp and softmax in float32.
    Returns:
      float32 (float64 for float64 inputs) scalar ``sum_bt mask_bt * (logsumexp(z_bt) -
      z_bt[targets_bt])`` in nats, equal (to
      float rounding) to ``optax.softmax_cross_entropy_with_integer_labels`` on the full logits.
      Differentiable in ``h`` and ``w`` (gradients in their dtypes); not in targets / mask.
    """
    return _loss_and_grads(h, w, targets, mask, chunk_size, tied, dtype)[0]


def _fwd(h, w, targets, mask, chunk_size, tied, dtype):
    loss, dh, dw = _loss_and_grads(h, w, targets, mask, chunk_size, tied, dtype)
    return loss, (dh.astype(h.dtype), dw.astype(w.dtype))


def _bwd(chunk_size, tied, dtype, res, g):
    dh, dw = res
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None


linear_cross_entropy.defvjp(_fwd, _bwd)
