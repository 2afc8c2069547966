"""Shared building blocks: parameters with logical axes, RMSNorm, RoPE, SwiGLU MLP, embeddings.

Every parameter is created through :func:`param`, which attaches *logical* axis names
(``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``, ``expert``; the layer
stack adds ``layers``). Only ``efficient_arch/parallel.py`` maps those names to mesh axes.
Parameters are stored in ``param_dtype`` (float32); matmuls cast inputs to the compute dtype and
accumulate in float32 (``preferred_element_type``).

Precision policy (``model.dtype``, ``model.quant``, ``model.attention_impl``): :func:`matmul`
runs in the compute dtype, or, under ``quant="fp8"``, through qwix's quantized-training dot
(FP8 E4M3 inputs forward, E5M2 gradients backward); :func:`dot_product_attention` picks
cuDNN's fused kernel on a GPU when the inputs qualify (:func:`attention_implementation`), else
the XLA form. The model enters :func:`precision` around its layer stack, so mixers need no
arguments for it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import numbers
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_arch.config import ATTENTION_IMPLS, QUANT_MODES  # model.attention_impl, model.quant

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# FP8 formats (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"): E4M3 (max 448) for the
# forward operands, E5M2 (max 57344) for the gradients of the backward pass.
FP8_FWD = jnp.float8_e4m3fn
FP8_BWD = jnp.float8_e5m2

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Precision:
    """How the model's matmuls and attention run (set by :func:`precision`, read at trace time).

    Attributes:
      quant: ``"none"`` (matmuls in the compute dtype) | ``"fp8"`` (projection matmuls through
        :func:`fp8_einsum`; attention products and the LM head stay in the compute dtype).
      attention: ``"auto"`` (cuDNN fused attention on a GPU when the inputs qualify, else XLA) |
        ``"xla"`` (always the XLA form) | ``"cudnn"`` (cuDNN or an error, for benchmarks).
    """

    quant: str = "none"
    attention: str = "auto"

    def __post_init__(self):
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quant={self.quant!r}: choose one of {QUANT_MODES} (config.model.quant)")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}: choose one of {ATTENTION_IMPLS} "
                             "(config.model.attention_impl)")


def describe_precision(cfg, platform: str | None = None) -> str:
    """One line naming a ``config.model`` section's precision policy, e.g. ``"params float32,
    compute bfloat16, projection/MLP matmuls FP8 (E4M3 forward, E5M2 gradients; qwix; simulated
    on cpu)"``. ``platform`` (jax backend name) adds "simulated" on a CPU, which has no FP8 units."""
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d: getattr(cfg, k, d))
    out = f"params {get('param_dtype', 'float32')}, compute {get('dtype', 'float32')}"
    if (get("quant", "none") or "none") == "fp8":
        sim = f"; simulated on {platform}: no FP8 matmul units" if platform == "cpu" else ""
        out += f", projection/MLP matmuls FP8 (E4M3 forward, E5M2 gradients; qwix{sim})"
    return out


_PRECISION: contextvars.ContextVar[Precision] = contextvars.ContextVar("efficient_arch_precision",
                                                                        default=Precision())


def current_precision() -> Precision:
    """The :class:`Precision` in effect (the default ``Precision()`` outside :func:`precision`)."""
    return _PRECISION.get()


@contextlib.contextmanager
def precision(quant: str = "none", attention: str = "auto") -> Iterator[Precision]:
    """Trace the enclosed model code under a precision policy (see :class:`Precision`).

    The policy is read while JAX *traces* (jit, scan, grad): enter it around the code being traced,
    as ``LM.hidden`` does around the layer stack. Backward passes traced later (custom VJPs) keep
    what their forward recorded.

    Raises:
      ValueError: an unknown ``quant`` or ``attention`` value.
    """
    token = _PRECISION.set(Precision(quant, attention))
    try:
        yield _PRECISION.get()
    finally:
        _PRECISION.reset(token)


def precision_of(cfg) -> contextlib.AbstractContextManager:
    """:func:`precision` for a ``config.model`` section (``quant``, ``attention_impl``; absent
    fields, as in configs saved before they existed, mean the defaults)."""
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d: getattr(cfg, k, d))
    return precision(get("quant", "none") or "none", get("attention_impl", "auto") or "auto")


def dtype_of(name: str):
    """Map a config dtype name ("float32" | "bfloat16" | "float16") to a jnp dtype."""
    return DTYPES[name]


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None], *, std: float | None,
          dtype=jnp.float32) -> nnx.Param:
    """Create an ``nnx.Param`` with logical axis names.

    Args:
      shape: parameter shape; ``len(names) == len(shape)``.
      names: one logical axis name (or None) per dimension.
      std: normal init standard deviation; None initialises to ones (norm scales), 0 to zeros.
    """
    assert len(shape) == len(names), (shape, names)
    if std is None:
        init = nnx.initializers.ones
    elif std == 0:
        init = nnx.initializers.zeros
    else:
        init = nnx.initializers.normal(std)
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), dtype))


def _grad_specs(spec: str) -> tuple[str, str] | None:
    """einsum specs of the two gradients of ``spec`` = ``"a,b->c"``: ``("c,b->a", "a,c->b")``.

    None when an index of one operand appears in neither the other operand nor the output (a
    sum over a single operand's axis, which the gradient would have to broadcast back).
    """
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    idx = lambda s: set(s.replace("...", "#"))  # noqa: E731  ("#" stands for the ellipsis dims)
    if not (idx(a) <= idx(b) | idx(out) and idx(b) <= idx(a) | idx(out)):
        return None
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


PROJECT_2D = True  # module switch for A/B timing (benchmarks/NOTES.md); see matmul


def _projection_2d(spec: str, x_shape, w_shape):
    """``((M, K, N), out_shape)`` when ``spec`` is a projection that is one 2-D matmul after
    reshapes: ``x``'s trailing axes contracted with ``w``'s leading axes (same order), the output
    ``x``'s leading axes then ``w``'s trailing axes; else None (a 2-D spec is returned as None too)."""
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    if "..." in b or out.count("...") != a.count("..."):
        return None
    if "..." in a:
        fill = "".join(chr(0x3B1 + i) for i in range(len(x_shape) - (len(a) - 3)))  # greek: unused labels
        a, out = a.replace("...", fill), out.replace("...", fill)
    if len(a) != len(x_shape) or len(b) != len(w_shape) or (len(a), len(b)) == (2, 2):
        return None
    if len(set(a)) != len(a) or len(set(b)) != len(b):  # a repeated label (a trace or diagonal)
        return None
    for kk in range(1, min(len(a), len(b)) + 1):
        if (a[-kk:] == b[:kk] and out == a[:-kk] + b[kk:] and not set(a[:-kk]) & set(b[kk:])
                and tuple(x_shape[-kk:]) == tuple(w_shape[:kk])):  # else einsum broadcasts or raises
            m = math.prod(x_shape[:-kk])
            k = math.prod(x_shape[-kk:])
            n = math.prod(w_shape[kk:])
            return (m, k, n), tuple(x_shape[:-kk]) + tuple(w_shape[kk:])
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _dot16(spec, dtype, out_dtype, x, w):
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _dot16_fwd(spec, dtype, out_dtype, x, w):
    xc, wc = x.astype(dtype), w.astype(dtype)
    y = jnp.einsum(spec, xc, wc, preferred_element_type=jnp.float32).astype(out_dtype)
    # zero-size arrays carry the primal dtypes to the backward pass (residuals must be arrays)
    return y, (xc, wc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _dot16_bwd(spec, dtype, out_dtype, res, g):
    xc, wc, x0, w0 = res
    gc = g.astype(dtype)
    sx, sw = _grad_specs(spec)
    dx = jnp.einsum(sx, gc, wc, preferred_element_type=jnp.float32).astype(x0.dtype)
    dw = jnp.einsum(sw, xc, gc, preferred_element_type=jnp.float32).astype(w0.dtype)
    return dx, dw


_dot16.defvjp(_dot16_fwd, _dot16_bwd)


@functools.cache
def _fp8_config():
    """qwix's quantized-training dot config for the FP8 policy (built once; qwix imported lazily)."""
    from qwix._src.core import dot_general_qt  # qwix 0.1.x: the dot QtProvider runs (see fp8_einsum)

    return dot_general_qt.DotGeneralQtConfig(
        lhs_qtype=FP8_FWD, rhs_qtype=FP8_FWD,  # forward operands, absmax per channel
        dlhs_grad_qtype=FP8_BWD, drhs_grad_qtype=FP8_BWD,  # incoming gradients in the backward dots
        use_original_residuals=False,  # the backward reuses the forward's FP8 operands
    )


@dataclasses.dataclass(frozen=True)
class _QtDotGeneral:
    """``jax.lax.dot_general`` replacement handed to ``jnp.einsum``: qwix's quantized-training dot.

    Hashable and equal across calls, so ``jnp.einsum``'s internal jit cache is reused.
    """

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        from qwix._src.core import dot_general_qt

        del precision, preferred_element_type, kw  # qwix picks the accumulation (operands' float dtype)
        return dot_general_qt.dot_general_qt(lhs, rhs, dimension_numbers, _fp8_config())


def fp8_einsum(spec: str, x: jax.Array, w: jax.Array, out_dtype=jnp.float32) -> jax.Array:
    """``einsum(spec, x, w)`` with FP8 operands forward and backward (quantized training, qwix).

    Forward: ``x`` and ``w`` are each scaled by their absolute maximum per channel (every axis not
    contracted: per token for activations, per output channel for weights; dynamic "current"
    scaling, no history), rounded to float8_e4m3fn, multiplied in FP8 and rescaled. Backward: the
    incoming gradient is scaled the same way and rounded to float8_e5m2; both gradient dots take
    it with the forward's FP8 operands. This is qwix's ``QtRule(weight_qtype=e4m3,
    act_qtype=e4m3, bwd_qtype=e5m2)`` dot (``qwix._src.core.dot_general_qt``, qwix 0.1.8),
    called directly instead of through ``qwix.quantize_model``'s interception (see docs).

    Args:
      spec: two-operand einsum spec.
      x, w: float arrays of any float dtype (quantized from float32; bf16 values are exact in it).
      out_dtype: result dtype.
    Returns:
      ``[spec's output shape]`` in ``out_dtype``. Gradients come back in the inputs' dtypes.

    On a GPU with FP8 tensor cores (H100/H200/B200) XLA runs the dot on them; on a CPU XLA
    converts the FP8 operands to float32 and multiplies those: the numerics are FP8's
    (fake-quantized), the speed is not.
    """
    y = jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32), _dot_general=_QtDotGeneral())
    return y.astype(out_dtype)


def matmul(spec: str, x: jax.Array, w: jax.Array, dtype, out_dtype=None, *, quant: str | None = None) -> jax.Array:
    """``einsum(spec, x, w)`` with inputs in the compute ``dtype``, float32 accumulation.

    Args:
      spec: two-operand einsum spec, e.g. ``"btd,dhk->bthk"``.
      x, w: arrays of any float dtype (cast to ``dtype``).
      dtype: compute dtype (float32 / bfloat16 / float16).
      out_dtype: result dtype (default ``dtype``; float32 for logits).
      quant: ``"fp8"`` runs :func:`fp8_einsum`, ``"none"`` the compute dtype; None (default)
        takes :func:`current_precision`'s. Products of two activations (attention) pass "none".
    Returns:
      ``einsum(spec, x, w)`` in ``out_dtype``.
    Raises:
      ValueError: ``spec`` is not an explicit two-operand spec ``"x,w->out"``.

    16-bit compute: the forward dot *and both backward dots* (d input, d weight) take 16-bit
    inputs with float32 accumulation (a custom VJP casts the incoming cotangent to ``dtype``);
    the gradients come back in the primal dtypes (float32 weight gradients, never rounded to 16
    bits). Plain autodiff would hand the backward dots a float32 cotangent, and XLA:CPU then runs
    them as float32 x float32 (measured in benchmarks/NOTES.md). float32 compute: a plain einsum,
    except that a projection (x's trailing axes contracted with w's leading axes) runs as one 2-D
    matmul between reshapes (:func:`_projection_2d`).
    """
    if not isinstance(spec, str) or spec.count("->") != 1 or spec.split("->")[0].count(",") != 1:
        raise ValueError(f"matmul spec must be an explicit two-operand einsum 'x,w->out' (e.g. "
                         f"'btd,dk->btk'), got {spec!r}")
    out_dtype = dtype if out_dtype is None else out_dtype
    if (quant or current_precision().quant) == "fp8":
        return fp8_einsum(spec, x, w, out_dtype)
    # float32: a projection runs as one 2-D matmul between reshapes. XLA:CPU then lays the
    # backward dots out row-major (einsum's N-D autodiff transposed cotangents of fused q/k/v
    # projections): transformer.py:small / bench float32 steps 1.09-1.10x faster, chunked mixer
    # layers 1.02-1.21x (benchmarks/NOTES.md). 16-bit compute keeps the N-D custom VJP (the 2-D
    # form measured 0.89x there).
    two_d = _projection_2d(spec, x.shape, w.shape) if PROJECT_2D and jnp.dtype(dtype).itemsize >= 4 else None
    if two_d is not None:
        (m, k, n), out_shape = two_d
        return matmul("mk,kn->mn", x.reshape(m, k), w.reshape(k, n), dtype, out_dtype).reshape(out_shape)
    # float16 with a float32 result (the LM head): keep the float32 cotangent (tiny per-token
    # logit gradients underflow float16; there is no loss scaling). bfloat16 has float32's range.
    keep_f32_cotangent = jnp.dtype(dtype) == jnp.float16 and jnp.dtype(out_dtype).itemsize >= 4
    if jnp.dtype(dtype).itemsize >= 4 or _grad_specs(spec) is None or keep_f32_cotangent:
        y = jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    return _dot16(spec, jnp.dtype(dtype), jnp.dtype(out_dtype), x, w)


_GPU_PLATFORMS = ("gpu", "cuda")
_CUDNN_MAX_HEAD_DIM = 256  # jax's cuDNN flash-attention check: <= 128 before Hopper, <= 256 from Hopper on


def attention_implementation(*, platform: str, dtype, head_dim: int, seq_q: int, seq_k: int,
                             has_mask: bool = False, is_causal: bool = True,
                             local_window_size: tuple[int, int] | None = None,
                             requested: str = "auto") -> tuple[str, str]:
    """Choose the attention kernel: ``("cudnn" | "xla", reason)``.

    cuDNN's fused flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``) is
    chosen when ``requested`` is "auto" or "cudnn" and the inputs meet jax's cuDNN conditions:
    ``platform`` is a GPU; 16-bit ``dtype`` (bfloat16 / float16); ``head_dim`` a multiple of 8
    and <= 256 (<= 128 before Hopper: jax then raises at trace time and the caller falls back);
    a local window only with ``right == 0`` or causal; a boolean mask (passed as an additive
    bias) only with even ``seq_q`` and ``seq_k`` (cuDNN's training kernels with a bias); causal only
    with ``seq_q == seq_k`` (the XLA form aligns the causal mask top-left for ``T != S``).
    Otherwise, and always for ``requested == "xla"``, the XLA form.

    Args:
      platform: jax backend name (``jax.default_backend()``: "cpu", "gpu", "tpu").
      dtype: compute dtype of q, k, v.
      head_dim, seq_q, seq_k: sizes (``seq_q`` queries, ``seq_k`` keys).
      has_mask, is_causal, local_window_size: as passed to :func:`dot_product_attention`.
      requested: ``model.attention_impl``: "auto" | "xla" | "cudnn".
    Returns:
      ``(implementation, reason)``; the reason says why the XLA form was taken (empty for cuDNN).
    Raises:
      ValueError: ``requested == "cudnn"`` but the inputs do not qualify (naming why and the fix
        ``model.attention_impl=auto``), or an unknown ``requested``.
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {requested!r}: choose one of {ATTENTION_IMPLS} "
                         "(config.model.attention_impl)")
    if requested == "xla":
        return "xla", "model.attention_impl='xla'"
    why = ""
    if platform not in _GPU_PLATFORMS:
        why = f"platform {platform!r} is not a GPU"
    elif jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        why = f"dtype {jnp.dtype(dtype).name} (cuDNN fused attention takes bfloat16 / float16)"
    elif head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        why = f"head_dim {head_dim} (cuDNN needs a multiple of 8, <= {_CUDNN_MAX_HEAD_DIM})"
    elif local_window_size is not None and local_window_size[1] != 0 and not is_causal:
        why = f"local window {tuple(local_window_size)} with a right part and no causal mask"
    elif has_mask and (seq_q % 2 or seq_k % 2):
        why = f"a mask with odd lengths (queries {seq_q}, keys {seq_k})"
    elif is_causal and seq_q != seq_k:
        why = f"causal with {seq_q} queries and {seq_k} keys (alignment differs from the XLA form)"
    if not why:
        return "cudnn", ""
    if requested == "cudnn":
        raise ValueError(f"model.attention_impl='cudnn' but cuDNN fused attention cannot run here: {why}; "
                         "use --config.model.attention_impl=auto (cuDNN where it qualifies, else XLA)")
    return "xla", why


def _backend() -> str:
    """The jax backend name (a function so tests can pretend to be on a GPU)."""
    return jax.default_backend()


_CUDNN_FALLBACKS: set[str] = set()


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          is_causal: bool = True, local_window_size: tuple[int, int] | None = None,
                          dtype=None, implementation: str | None = None) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads (Vaswani et al. 2017 eq. 1; GQA,
    Ainslie et al. 2023): ``softmax(q k^T / sqrt(head_dim) + masks) v``.

    Args:
      q: ``[B, T, n_heads, head_dim]``; k, v: ``[B, S, n_kv_heads, head_dim]``, ``n_heads %
        n_kv_heads == 0`` (query head ``i`` reads KV head ``i // (n_heads / n_kv_heads)``).
      mask: optional bool ``[B or 1, 1 or n_heads, T or 1, S]``; True = may attend.
      is_causal: query ``i`` sees keys ``j <= i`` (T == S).
      local_window_size: ``(left, right)``: keys ``i - left <= j <= i + right`` only.
      dtype: compute dtype (default ``q.dtype``).
      implementation: "auto" | "xla" | "cudnn"; None (default) takes :func:`current_precision`'s
        ``attention`` (``model.attention_impl``).
    Returns:
      ``[B, T, n_heads, head_dim]`` in ``dtype``. Softmax in float32; a fully masked row averages
      the values uniformly (as ``jax.nn.dot_product_attention``).
    Raises:
      ValueError: inconsistent shapes (q / k / v ranks, batch, head_dim, ``n_heads %
        n_kv_heads``), a mask that is not bool or does not broadcast to ``[B, n_heads, T, S]``, ``is_causal``
        with ``T != S``, a ``local_window_size`` that is not two non-negative ints;
        ``implementation="cudnn"`` where cuDNN cannot run (see :func:`attention_implementation`),
        or jax's cuDNN path rejected the inputs.

    Implementation (:func:`attention_implementation` decides, from the backend at trace time):
    on a GPU with 16-bit inputs that qualify, cuDNN's fused flash attention
    (``jax.nn.dot_product_attention(implementation="cudnn")``); if jax's cuDNN path raises while
    tracing (unsupported shape / GPU / cuDNN version), a warning is logged once per reason and the
    XLA form runs instead, so a result is never silently wrong, only slower. A cuDNN failure at
    compile time is an error (``model.attention_impl=xla`` avoids it). Otherwise the XLA form,
    :func:`efficient_arch.ops.attention.attention_core`: the same math as
    ``jax.nn.dot_product_attention(implementation="xla")`` with a hand-written backward that
    keeps only the probabilities (in ``dtype``) instead of autodiff's float32 scores, masked
    scores and probabilities, and whose products take ``dtype`` inputs with float32
    accumulation (never FP8): jax's form would hand the probabilities-times-values product and
    three of the four backward products to XLA:CPU as float32 dots in 16-bit compute.
    The XLA form runs in blocks of queries (:func:`efficient_arch.ops.attention.blocked_attention`),
    each over only the keys its causal / window mask can reach.
    FLOPs: ``4 n_heads head_dim`` per scored (query, key) pair: ``executed_pairs(key_ranges(...))``
    of :mod:`efficient_arch.ops.attention` (masked entries inside a block included; ``T S`` when the
    sequence is one block; cuDNN skips the upper triangle at its own tile size, the count does not
    change).
    """
    _check_attention_args(q, k, v, mask, is_causal, local_window_size)
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    requested = implementation or current_precision().attention
    b, t, n, hd = q.shape
    s, kv = k.shape[1], k.shape[2]
    impl, _ = attention_implementation(platform=_backend(), dtype=dtype, head_dim=hd, seq_q=t, seq_k=s,
                                       has_mask=mask is not None, is_causal=is_causal,
                                       local_window_size=local_window_size, requested=requested)
    if impl == "cudnn":
        try:
            return jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask,
                                                is_causal=is_causal, local_window_size=local_window_size,
                                                implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError, TypeError) as e:
            if requested == "cudnn":
                raise ValueError(f"model.attention_impl='cudnn': jax's cuDNN attention rejected q {q.shape} "
                                 f"k {k.shape} {jnp.dtype(dtype).name}: {e}; use "
                                 "--config.model.attention_impl=auto or xla") from e
            reason = f"{type(e).__name__}: {e}"
            if reason not in _CUDNN_FALLBACKS:
                _CUDNN_FALLBACKS.add(reason)
                _log.warning("cuDNN fused attention unavailable for q %s k %s %s (%s); using the XLA form",
                             q.shape, k.shape, jnp.dtype(dtype).name, reason)
    from efficient_arch.ops import attention as attention_ops

    i, j = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
    allowed = jnp.ones((t, s), bool)
    if is_causal:
        allowed &= j <= i
    if local_window_size is not None:
        left, right = local_window_size
        allowed &= (j >= i - left) & (j <= i + right)
    allowed = allowed[None, None, None]  # [1, K, G, T, S] after broadcasting
    if mask is not None:
        m = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], kv, n // kv, *mask.shape[2:])
        allowed = allowed & m
    ranges = attention_ops.key_ranges(t, s, is_causal=is_causal, local_window_size=local_window_size)
    o = attention_ops.blocked_attention(q.reshape(b, t, kv, n // kv, hd), k, v, allowed, 1.0 / math.sqrt(hd),
                                        dtype, ranges)
    return o.reshape(b, t, n, hd)


def _check_attention_args(q, k, v, mask, is_causal, local_window_size) -> None:
    """The shape contract of :func:`dot_product_attention`; ValueError naming what is wrong."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"dot_product_attention: q, k, v must be [B, T|S, heads, head_dim]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    b, t, n, hd = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != hd:
        raise ValueError(f"dot_product_attention: k [B, S, n_kv_heads, head_dim] and v [B, S, n_kv_heads, *] "
                         f"must match q [B, T, n_heads, head_dim] = {q.shape}; got k {k.shape}, v {v.shape}")
    s, kv = k.shape[1], k.shape[2]
    if n < 1 or kv < 1:
        raise ValueError(f"dot_product_attention: n_heads = {n} and n_kv_heads = {kv} must be >= 1")
    if n % kv:
        raise ValueError(f"dot_product_attention: n_heads = {n} is not a multiple of n_kv_heads = {kv} "
                         "(grouped-query attention shares each KV head among n_heads / n_kv_heads query heads)")
    if is_causal and t != s:
        raise ValueError(f"dot_product_attention: is_causal needs T == S; got T = {t}, S = {s} (pass a mask "
                         "for queries offset against a longer key sequence)")
    if mask is not None:
        if mask.dtype != jnp.bool_:
            raise ValueError(f"dot_product_attention: mask must be bool (True = may attend), got {mask.dtype} "
                             "(an additive float mask or 0/1 ints: pass mask > 0 / mask.astype(bool))")
        ok = (mask.ndim == 4 and mask.shape[0] in (1, b) and mask.shape[1] in (1, n) and mask.shape[2] in (1, t)
              and mask.shape[3] == s)
        if not ok:
            raise ValueError(f"dot_product_attention: mask must be bool [B or 1, n_heads or 1, T or 1, S] = "
                             f"[{b} or 1, {n} or 1, {t} or 1, {s}]; got {mask.shape} (a [T, S] mask: "
                             "mask[None, None])")
    if local_window_size is not None:
        w = local_window_size
        if (not isinstance(w, (tuple, list)) or len(w) != 2
                or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0 for x in w)):
            raise ValueError(f"dot_product_attention: local_window_size must be (left, right), two ints >= 0; got "
                             f"{w!r} (a causal window of W keys: (W - 1, 0))")


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): ``x / rms(x) * scale``.

    Statistics are computed in float32; input ``[..., d]`` of any dtype, output in that dtype.
    """

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, names: Sequence[str | None] = ("embed",)):
        self.eps = eps
        self.scale = param(rngs, (dim,), names, std=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotary position embedding tables (Su et al. 2021, RoFormer eq. 34).

    Args:
      positions: int ``[B, T]`` or ``[T]`` token positions.
    Returns:
      ``(sin, cos)`` float32 arrays of shape ``positions.shape + (head_dim // 2,)``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; set config.model.head_dim even")
    freqs = theta ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    ang = positions.astype(jnp.float32)[..., None] * freqs
    return jnp.sin(ang), jnp.cos(ang)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate feature pairs ``(x[..., i], x[..., i + d/2])`` by position-dependent angles.

    Args:
      x: ``[B, T, H, head_dim]`` in any float dtype.
      sin, cos: ``[B, T, head_dim/2]`` or ``[T, head_dim/2]`` float32 from :func:`rope_angles`.
    Returns:
      Same shape and dtype as ``x``; the dot product of two rotated vectors depends only on
      their position difference.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    sin, cos = sin[..., None, :], cos[..., None, :]  # broadcast over heads
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding ``[vocab_size, d_model]``; ``attend`` reuses it as a tied LM head."""

    def __init__(self, vocab_size: int, d_model: int, *, std: float, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab_size, d_model), ("vocab", "embed"), std=std)

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        """int32 ``[B, T]`` -> ``[B, T, d_model]`` in ``dtype`` (a gather: 0 FLOPs)."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)

    def attend(self, x: jax.Array, dtype) -> jax.Array:
        """``[B, T, d_model]`` -> logits ``[B, T, vocab_size]`` float32 (2*V*d FLOPs per token).

        Never FP8 (the LM head stays in the compute dtype under ``model.quant="fp8"``, as in
        common FP8 recipes)."""
        return matmul("btd,vd->btv", x, self.embedding[...], dtype, out_dtype=jnp.float32, quant="none")


@jax.custom_vjp
def swiglu(gu: jax.Array) -> jax.Array:
    """SwiGLU gate (Shazeer 2020, eq. 6): ``silu(gate) * up`` for ``gu = [..., 2, d_ff]``
    (``gu[..., 0, :]`` gate, ``gu[..., 1, :]`` up), computed in float32 (float64 stays float64),
    returned in ``gu.dtype``: ``[..., d_ff]``.

    Custom VJP: the backward keeps only ``gu`` (the gate/up matmul's output, in its own dtype) and
    recomputes the sigmoid, ``d gate = dh * up * s * (1 + gate * (1 - s))``, ``d up = dh * gate * s``
    with ``s = sigmoid(gate)``. Plain autodiff keeps five float32 ``[..., d_ff]`` arrays (the upcasts,
    sigmoid and products); under a layer scan they are written to and read back from ``[L, ...]``
    stacks. Bench step (transformer.py:bench), same-process A/B: float32 scanned 1.11x, bf16
    scanned 1.12x, bf16 scan+dots 1.11x, temporaries -768 MiB; transformer.py:small 0.95-0.97x
    (benchmarks/NOTES.md, session 7). Reverse mode only (``jvp`` / ``jacfwd`` of a custom VJP raise
    a TypeError); ``grad(grad(...))`` works.
    """
    g, u = _gate_up(gu)
    return (jax.nn.silu(g) * u).astype(gu.dtype)


def _gate_up(gu):
    """``gu [..., 2, d_ff]`` -> gate, up ``[..., d_ff]`` in float32 (float64 stays float64)."""
    ct = jnp.promote_types(gu.dtype, jnp.float32)
    return gu[..., 0, :].astype(ct), gu[..., 1, :].astype(ct)


def _swiglu_fwd(gu):
    return swiglu(gu), gu


def _swiglu_bwd(gu, dh):
    g, u = _gate_up(gu)
    s, dh = jax.nn.sigmoid(g), dh.astype(g.dtype)
    dg = dh * u * s * (1 + g * (1 - s))
    return (jnp.stack([dg, dh * g * s], axis=-2).astype(gu.dtype),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    """SwiGLU feed-forward (Shazeer 2020, eq. 6): ``W_down (silu(x W_gate) * (x W_up))``.

    Gate and up projections are one fused ``[d_model, 2, d_ff]`` kernel. Returns ``(y, aux)``
    with ``aux == {}`` (the FFN contract: an FFN may report auxiliary losses/metrics).
    ``d_ff`` overrides ``cfg.d_ff`` (MoE shared experts).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs, d_ff: int | None = None):
        d, f = cfg.d_model, d_ff or cfg.d_ff
        self.dtype = dtype_of(cfg.dtype)
        self.w_gate_up = param(rngs, (d, 2, f), ("embed", None, "mlp"), std=cfg.init_std)
        self.w_down = param(rngs, (f, d), ("mlp", "embed"), std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def __call__(self, x: jax.Array, *, segment_ids=None) -> tuple[jax.Array, dict]:
        """``x`` ``[B, T, d_model]`` -> ``([B, T, d_model], {})`` in the compute dtype."""
        from efficient_arch import parallel

        gu = matmul("btd,dkf->btkf", x, self.w_gate_up[...], self.dtype)
        h = parallel.constrain(swiglu(gu), ("batch", "seq", "act_mlp"))
        return matmul("btf,fd->btd", h, self.w_down[...], self.dtype), {}

    @staticmethod
    def flops_per_token(cfg, seq_len: int, *, attention: str = "causal", executed: bool = False,
                        platform: str | None = None) -> float:
        """Forward matmul FLOPs per token: 2 * 3 * d_model * d_ff (gate, up, down); executed ==
        model FLOPs on every platform."""
        del seq_len, attention, executed, platform
        return 6.0 * cfg.d_model * cfg.d_ff

    @staticmethod
    def remat_tail_flops_per_token(cfg) -> float:
        """FLOPs of the output matmul (``w_down``, ``2 d d_ff``): under full remat the backward
        never needs its output, so a group ending in this MLP does not recompute it."""
        return 2.0 * cfg.d_model * cfg.d_ff
