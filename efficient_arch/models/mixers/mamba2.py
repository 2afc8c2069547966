"""Mamba-2 mixer: the SSD layer of Dao & Gu 2024 ("Transformers are SSMs", Sec. 7, Fig. 6).

With ``d = d_model``, inner width ``E = expand * d``, ``H = E / P`` heads of size ``P = head_dim``,
state size ``N = state_size`` and one B/C group shared by all heads (``ngroups = 1``)::

    z, x, B, C, dt = x_in W_z, x_in W_x, x_in W_B, x_in W_C, x_in W_dt     (in_proj, parallel)
    x, B, C = silu(conv1d(x)), silu(conv1d(B)), silu(conv1d(C))         (causal depthwise, width W)
    dt = softplus(dt + dt_bias)                    [B, T, H]
    A  = -exp(A_log)                               [H]        (scalar per head: SSD, Sec. 6)
    per head, the SSM of Sec. 3 (eq. 1) with A_t = exp(dt_t A) I (scalar times identity: SSD):
        S_t = exp(dt_t A) S_{t-1} + B_t^T (dt_t x_t)          S_t [N, P]
        y_t = C_t S_t + D x_t
    y = RMSNorm(y * silu(z))                        (gated RMSNorm, norm after the gate)
    out = y W_out

The SSM is exactly the gated linear attention recurrence of ``ops/linear_recurrence.py`` with
``q = C``, ``k = B`` (broadcast over heads), ``v = dt * x`` and scalar ``log_decay = dt * A``, so
``cfg.mixer_form`` picks its chunked (SSD's block decomposition, Sec. 6), recurrent or quadratic
(the "attention" dual, Sec. 5) form. Decoding keeps the conv tails and the state ``S [B, H, N, P]``.

Initialisation follows the reference: ``dt`` log-uniform in ``[1e-3, 1e-1]`` stored as
``dt_bias = softplus^{-1}(dt)``; ``A = U[1, 16]`` stored as ``A_log``; ``D = 1``; conv weights
``~ N(0, 1/(3W))`` (the variance of PyTorch's default depthwise init), biases 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_arch import parallel
from efficient_arch.config import check_flop_attention
from efficient_arch.models.layers import dtype_of, matmul, param
from efficient_arch.ops.conv import causal_conv1d, conv_step, flops_causal_conv1d
from efficient_arch.ops.linear_recurrence import (flops_gated_linear_attention, gated_linear_attention,
                                                  gla_step)


def _custom_param(rngs, shape, names, init) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), jnp.float32))


def _dt_bias_init(key, shape, dtype, dt_min=1e-3, dt_max=1e-1, floor=1e-4):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus


def _a_log_init(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


class ShortConv(nnx.Module):
    """Causal depthwise conv parameters: ``weight [W, *channels]``, ``bias [*channels]``.

    Channels may be multi-dimensional (for logical axis names); they are flattened for the op.
    """

    def __init__(self, width: int, channels: tuple[int, ...], names: tuple, *, rngs: nnx.Rngs):
        self.weight = param(rngs, (width,) + channels, (None,) + names, std=(3.0 * width) ** -0.5)
        self.bias = _custom_param(rngs, channels, names, nnx.initializers.zeros)

    def __call__(self, x, *, segment_ids=None):
        """``x [B, T, *channels]`` -> same shape and dtype."""
        b, t = x.shape[:2]
        w = self.weight[...]
        # store_cotangent: the conv's backward would recompute the gated-norm / skip / SSD-output
        # backward at each of its W taps (ops/conv; benchmarks/NOTES.md, session 6)
        y = causal_conv1d(x.reshape(b, t, -1), w.reshape(w.shape[0], -1), self.bias[...].reshape(-1),
                          segment_ids=segment_ids, store_cotangent=True)
        return y.reshape(x.shape)

    def step(self, x_t, state):
        """``x_t [B, *channels]``, ``state [B, W-1, C]`` -> ``(y_t [B, *channels], state)``."""
        w = self.weight[...]
        y, state = conv_step(x_t.reshape(x_t.shape[0], -1), state, w.reshape(w.shape[0], -1),
                             self.bias[...].reshape(-1))
        return y.reshape(x_t.shape), state

    def prefill(self, x, tail):
        """``x [B, T, *channels]``, ``tail [B, W-1, C]`` -> ``(y [B, T, *channels], tail)``
        (:func:`conv_prefill`)."""
        b, t = x.shape[:2]
        w = self.weight[...]
        y, tail = conv_prefill(x.reshape(b, t, -1), tail, w.reshape(w.shape[0], -1), self.bias[...].reshape(-1))
        return y.reshape(x.shape), tail


def conv_prefill(x: jax.Array, tail: jax.Array, weight: jax.Array, bias: jax.Array | None = None):
    """:func:`~efficient_arch.ops.conv.causal_conv1d` over ``x`` continuing after ``tail``.

    Args:
      x: ``[B, T, C]``; tail: ``[B, W - 1, C]`` the ``W - 1`` inputs before ``x`` (oldest first;
        zeros at the start of a sequence, which is the op's zero padding); weight ``[W, C]``;
        bias optional ``[C]``.
    Returns:
      ``(y [B, T, C] in x.dtype, new tail [B, W - 1, C] in tail.dtype)``: the conv outputs of
      ``x``'s tokens and the last ``W - 1`` inputs, the ``conv_state`` of
      :func:`~efficient_arch.ops.conv.conv_step`.
    """
    n = tail.shape[1]
    full = jnp.concatenate([tail.astype(x.dtype), x], axis=1)
    y = causal_conv1d(full, weight, bias)[:, n:]
    return y, full[:, full.shape[1] - n:].astype(tail.dtype)


class GatedRMSNorm(nnx.Module):
    """``RMSNorm(y * silu(z))`` over the whole inner width (``ngroups = 1``), scale ``[H, P]``.

    Float32 statistics; output in ``y.dtype``.
    """

    def __init__(self, h: int, p: int, *, eps: float, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (h, p), ("heads", "head_dim"), std=None)

    def __call__(self, y, z):
        g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        ms = jnp.mean(g * g, axis=(-2, -1), keepdims=True)
        return (g * jax.lax.rsqrt(ms + self.eps) * self.scale[...]).astype(y.dtype)


class Mamba2(nnx.Module):
    """Mamba-2 (SSD) sequence mixer; see the module docstring for the math.

    Config fields: ``d_model``, ``expand``, ``head_dim`` (P), ``state_size`` (N), ``conv_width``,
    ``mixer_form``, ``chunk_size``, ``norm_eps``, ``init_std``, ``n_layers``.

    Parameters: ``w_zx [d, 2, H, P]``, ``w_bc [d, 2, N]``, ``w_dt [d, H]``, ``conv_x``
    (``[W, H, P]`` + bias), ``conv_bc`` (``[W, 2, N]`` + bias), ``dt_bias, A_log, D [H]``,
    ``norm.scale [H, P]``, ``w_out [H, P, d]``.

    Raises:
      ValueError: if ``expand * d_model`` is not a multiple of ``head_dim``.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, p, n = cfg.d_model, cfg.head_dim, cfg.state_size
        inner = cfg.expand * d
        if inner % p:
            raise ValueError(f"Mamba-2: inner width expand*d_model={inner} must be a multiple of "
                             f"model.head_dim={p}; change model.expand or model.head_dim")
        h = inner // p
        self.n_heads, self.head_dim, self.state_size, self.width = h, p, n, cfg.conv_width
        self.form, self.chunk_size = cfg.mixer_form, cfg.chunk_size
        self.dtype = dtype_of(cfg.dtype)
        std = cfg.init_std
        self.w_zx = param(rngs, (d, 2, h, p), ("embed", None, "heads", "head_dim"), std=std)
        self.w_bc = param(rngs, (d, 2, n), ("embed", None, None), std=std)
        self.w_dt = param(rngs, (d, h), ("embed", "heads"), std=std)
        self.conv_x = ShortConv(cfg.conv_width, (h, p), ("heads", "head_dim"), rngs=rngs)
        self.conv_bc = ShortConv(cfg.conv_width, (2, n), (None, None), rngs=rngs)
        self.dt_bias = _custom_param(rngs, (h,), ("heads",), _dt_bias_init)
        self.A_log = _custom_param(rngs, (h,), ("heads",), _a_log_init)
        self.D = param(rngs, (h,), ("heads",), std=None)
        self.norm = GatedRMSNorm(h, p, eps=cfg.norm_eps, rngs=rngs)
        self.w_out = param(rngs, (h, p, d), ("heads", "head_dim", "embed"),
                           std=std / math.sqrt(2 * cfg.n_layers))

    def _project(self, x):
        """in_proj: ``x [..., d]`` -> z, x ``[..., H, P]``; bc ``[..., 2, N]``; dt_raw ``[..., H]``."""
        zx = matmul("...d,dchp->...chp", x, self.w_zx[...], self.dtype)
        bc = matmul("...d,dcn->...cn", x, self.w_bc[...], self.dtype)
        dt = matmul("...d,dh->...h", x, self.w_dt[...], self.dtype)
        return zx[..., 0, :, :], zx[..., 1, :, :], bc, dt

    def _ssm_inputs(self, xs, bc, dt_raw):
        """Post-conv activations -> (q, k, v, log_decay) of the gated linear attention op."""
        xs = jax.nn.silu(xs.astype(jnp.float32))
        bc = jax.nn.silu(bc.astype(jnp.float32))
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias[...])  # [..., H]
        log_decay = dt * -jnp.exp(self.A_log[...])  # <= 0
        v = (xs * dt[..., None]).astype(self.dtype)
        shape = xs.shape[:-1] + (self.state_size,)  # [..., H, N]
        q = jnp.broadcast_to(bc[..., 1:2, :], shape).astype(self.dtype)  # C
        k = jnp.broadcast_to(bc[..., 0:1, :], shape).astype(self.dtype)  # B
        return q, k, v, log_decay, xs

    def _output(self, y, xs, z):
        y = y.astype(jnp.float32) + self.D[...][:, None] * xs  # D skip
        y = self.norm(y.astype(self.dtype), z)
        return matmul("...hp,hpd->...d", y, self.w_out[...], self.dtype)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Mamba-2 over a sequence.

        Args:
          x: ``[B, T, d_model]`` compute dtype; segment_ids: optional int ``[B, T]`` (conv taps
            and SSM state do not cross document boundaries); positions: ignored.
        Returns:
          ``[B, T, d_model]`` in the compute dtype.
        """
        del positions
        z, xs, bc, dt_raw = self._project(x)
        xs = self.conv_x(xs, segment_ids=segment_ids)
        bc = self.conv_bc(bc, segment_ids=segment_ids)
        q, k, v, log_decay, xs = self._ssm_inputs(xs, bc, dt_raw)
        v = parallel.constrain(v, ("batch", "seq", "act_heads", None))
        y, _ = gated_linear_attention(q, k, v, log_decay, segment_ids=segment_ids, form=self.form,
                                      chunk_size=self.chunk_size)
        return self._output(y, xs, z)

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, jax.Array]:
        """Constant-size cache: ``conv_x [B, W-1, H*P]``, ``conv_bc [B, W-1, 2N]`` (compute
        dtype) and ``ssm [B, H, N, P]`` float32; ``max_len`` is unused."""
        del max_len
        w, h, p, n = self.width, self.n_heads, self.head_dim, self.state_size
        return {"conv_x": jnp.zeros((batch_size, w - 1, h * p), self.dtype),
                "conv_bc": jnp.zeros((batch_size, w - 1, 2 * n), self.dtype),
                "ssm": jnp.zeros((batch_size, h, n, p), jnp.float32)}

    def decode(self, x: jax.Array, cache: dict, *, position) -> tuple[jax.Array, dict]:
        """One token ``x [B, 1, d_model]`` -> ``(y [B, 1, d_model], cache)``; ``position`` unused.

        FLOPs: in/out projections + ``2 W (E + 2N)`` conv + ``~4 H N P`` state update/read-out.
        """
        del position
        z, xs, bc, dt_raw = self._project(x[:, 0])
        xs, cx = self.conv_x.step(xs, cache["conv_x"])
        bc, cbc = self.conv_bc.step(bc, cache["conv_bc"])
        q, k, v, log_decay, xs = self._ssm_inputs(xs, bc, dt_raw)
        y, s = gla_step(q, k, v, log_decay, cache["ssm"])
        out = self._output(y, xs, z)
        return out[:, None], {"conv_x": cx, "conv_bc": cbc, "ssm": s}

    def prefill(self, x: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """The prompt in the chunked (SSD) form, returning the conv tails and the SSM state.

        Args:
          x: ``[B, T, d_model]`` (compute dtype), the tokens after the cache's (positions
            ``0 .. T - 1`` for a fresh :meth:`init_cache`).
          cache: :meth:`init_cache`'s ``conv_x``, ``conv_bc`` (the last ``W - 1`` conv inputs)
            and ``ssm [B, H, N, P]`` float32 (the initial state).
        Returns:
          ``(y [B, T, d_model], cache)``: the convs continue after the cached tails
          (:func:`conv_prefill`) and keep the prompt's last ``W - 1`` inputs; the SSM is one
          :func:`~efficient_arch.ops.linear_recurrence.gated_linear_attention` call,
          ``form="chunked"`` with ``cfg.chunk_size``, returning its final state.
        """
        z, xs, bc, dt_raw = self._project(x)
        xs, cx = self.conv_x.prefill(xs, cache["conv_x"])
        bc, cbc = self.conv_bc.prefill(bc, cache["conv_bc"])
        q, k, v, log_decay, xs = self._ssm_inputs(xs, bc, dt_raw)
        y, s = gated_linear_attention(q, k, v, log_decay, initial_state=cache["ssm"], form="chunked",
                                      chunk_size=self.chunk_size)
        return self._output(y, xs, z), {"conv_x": cx, "conv_bc": cbc, "ssm": s}

    @staticmethod
    def flops_per_token(cfg, seq_len: int, *, attention: str = "causal") -> float:
        """Forward FLOPs per token of the form ``cfg.mixer_form`` executes.

        With ``E = expand d``, ``H = E / P``::

            in_proj   2 d (2E + 2N + H)
            conv      2 W (E + 2N)                                  (ops.conv)
            SSD       flops_gated_linear_attention(T, H, N, P, form, chunk_size)
                        chunked: H [2 C (N + P) + 4 N P]; recurrent: 4 H N P; quadratic: 2 H T (N + P)
            out_proj  2 E d

        Elementwise work (SiLU, softplus, exp, D skip, gate, norm) is not counted. ``attention``
        does not apply (no softmax attention) and only is validated.

        Raises:
          ValueError: unknown ``attention`` convention or form.
        """
        check_flop_attention(attention)
        d, p, n, w = cfg.d_model, cfg.head_dim, cfg.state_size, cfg.conv_width
        e = cfg.expand * d
        h = e // p
        proj = 2.0 * d * (2 * e + 2 * n + h) + 2.0 * e * d
        conv = flops_causal_conv1d(e + 2 * n, w)
        ssd = flops_gated_linear_attention(seq_len, h, n, p, form=cfg.mixer_form,
                                           chunk_size=cfg.chunk_size, vector_decay=False)
        return proj + conv + ssd
