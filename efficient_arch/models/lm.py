"""The decoder-only language model shared by every architecture.

    tokens -> Embed -> [Block(mixer, ffn)] x n_layers -> RMSNorm -> LM head (tied or untied)

A block is pre-norm: ``x += mixer(norm(x)); x += ffn(norm(x))``, with the mixer and FFN classes
taken from ``models/registry.py``. ``model.layer_pattern`` (e.g. ``["gated_deltanet",
"attention"]``) defines a *group* of blocks repeated ``n_layers / len(pattern)`` times; the
groups' parameters are stacked on a leading ``layers`` axis and applied with ``jax.lax.scan``
(compile time independent of depth) or, with ``scan_layers=False``, with a Python loop over the
same stacked parameters (same numbers; compile time grows with depth). ``model.remat`` wraps
the group in ``jax.checkpoint`` with policy none / full / dots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_arch import parallel
from efficient_arch.models import registry
from efficient_arch.models.layers import Embed, RMSNorm, dtype_of, param

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_pattern(cfg) -> list[str]:
    """Mixer names of one repeated group (``[cfg.mixer]`` when ``layer_pattern`` is None)."""
    return list(cfg.layer_pattern) if cfg.layer_pattern is not None else [cfg.mixer]


class Block(nnx.Module):
    """Pre-norm residual block: a sequence mixer then an FFN, each behind an RMSNorm."""

    def __init__(self, cfg, mixer: str, *, rngs: nnx.Rngs):
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mixer = registry.get_mixer(mixer)(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.ffn = registry.get_ffn(cfg.ffn)(cfg, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None):
        """``x`` ``[B, T, d_model]`` -> ``([B, T, d_model], aux dict of float32 scalars)``."""
        x = x + self.mixer(self.mixer_norm(x), segment_ids=segment_ids, positions=positions)
        y, aux = self.ffn(self.ffn_norm(x), segment_ids=segment_ids)
        x = parallel.constrain(x + y, ("batch", "seq", "act_embed"))
        return x, aux


    def decode(self, x, cache, *, position):
        """One token ``x [B, 1, d_model]`` through the block with the mixer's cache."""
        y, cache = self.mixer.decode(self.mixer_norm(x), cache, position=position)
        x = x + y
        y, _ = self.ffn(self.ffn_norm(x))
        return x + y, cache


class Group(nnx.Module):
    """One repetition of ``layer_pattern``: a list of blocks applied in order."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, name, rngs=rngs) for name in layer_pattern(cfg)])

    def __call__(self, x, *, segment_ids=None, positions=None):
        aux_total: dict = {}
        for blk in self.blocks:
            x, aux = blk(x, segment_ids=segment_ids, positions=positions)
            for k, v in aux.items():
                aux_total[k] = aux_total.get(k, 0.0) + v
        return x, aux_total


    def init_cache(self, batch_size: int, max_len: int) -> list:
        return [blk.mixer.init_cache(batch_size, max_len) for blk in self.blocks]

    def decode(self, x, caches, *, position):
        new = []
        for blk, c in zip(self.blocks, caches):
            x, c = blk.decode(x, c, position=position)
            new.append(c)
        return x, new


class LM(nnx.Module):
    """Decoder-only LM. ``cfg`` is the finalized ``config.model`` section.

    Call: ``tokens`` int32 ``[B, T]`` -> ``(logits float32 [B, T, vocab_size], aux)`` where
    ``aux`` maps names to float32 scalars summed over layers (``"aux_loss"``, if present, is
    added to the training loss by the train step).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        self.n_groups = cfg.n_layers // len(layer_pattern(cfg))
        self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs)

        @nnx.split_rngs(splits=self.n_groups)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_groups(rngs):
            return Group(cfg, rngs=rngs)

        self.groups = make_groups(rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std)

    def hidden(self, tokens, *, segment_ids=None, positions=None):
        """Final-normed hidden states ``[B, T, d_model]`` (compute dtype) and the aux dict."""
        x = self.embed(tokens, self.dtype)
        x = parallel.constrain(x, ("batch", "seq", "act_embed"))
        graphdef, stacked = nnx.split(self.groups)

        def body(h, group_state):
            group = nnx.merge(graphdef, group_state)
            return group(h, segment_ids=segment_ids, positions=positions)

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x, auxs = jax.lax.scan(body, x, stacked)
            aux = {k: jnp.sum(v) for k, v in auxs.items()}
        else:
            aux = {}
            for i in range(self.n_groups):
                x, a = body(x, jax.tree.map(lambda p: p[i], stacked))
                for k, v in a.items():
                    aux[k] = aux.get(k, 0.0) + v
        return self.final_norm(x), aux

    def logits(self, h):
        """LM head: ``[B, T, d_model]`` -> float32 ``[B, T, vocab_size]``."""
        if self.cfg.tie_embeddings:
            out = self.embed.attend(h, self.dtype)
        else:
            out = jnp.einsum("btd,dv->btv", h.astype(self.dtype), self.head[...].astype(self.dtype),
                             preferred_element_type=jnp.float32)
        return parallel.constrain(out, ("batch", "seq", "act_vocab"))

    def __call__(self, tokens, *, segment_ids=None, positions=None):
        h, aux = self.hidden(tokens, segment_ids=segment_ids, positions=positions)
        return self.logits(h), aux

    def init_cache(self, batch_size: int, max_len: int):
        """Decode caches of every layer, stacked on a leading ``n_groups`` axis (like the params).

        Attention layers hold a ``[B, max_len, n_kv_heads, head_dim]`` KV cache; recurrent mixers
        a constant-size state.
        """
        graphdef, stacked = nnx.split(self.groups)
        first = nnx.merge(graphdef, jax.tree.map(lambda p: p[0], stacked))
        one = first.init_cache(batch_size, max_len)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.n_groups,) + a.shape), one)

    def decode(self, tokens, cache, *, position):
        """One decoding step: ``tokens`` int32 ``[B, 1]`` at index ``position`` (int32 scalar).

        Returns ``(logits float32 [B, 1, vocab_size], cache)``; a scan over the layer groups as in
        training, so the logits equal the full forward pass's at that position.
        """
        x = self.embed(tokens, self.dtype)
        graphdef, stacked = nnx.split(self.groups)

        def body(h, layer):
            group_state, group_cache = layer
            h, group_cache = nnx.merge(graphdef, group_state).decode(h, group_cache, position=position)
            return h, group_cache

        x, cache = jax.lax.scan(body, x, (stacked, cache))
        return self.logits(self.final_norm(x)), cache


def new_model(cfg, seed: int) -> LM:
    """Construct an LM without eager sharding: parameters carry logical names, which only
    ``parallel.py`` resolves to mesh axes (as jit out_shardings), so this works with or without
    a mesh in context, traced or not."""
    with nnx.use_eager_sharding(False):
        return LM(cfg, rngs=nnx.Rngs(seed))


def count_params(cfg) -> dict[str, int]:
    """Parameter counts without allocating: ``n_params`` and ``n_params_non_embedding``.

    Non-embedding excludes the token embedding matrix (and the untied head), following Kaplan et
    al. 2020. MoE subclasses add ``n_active_params``; for dense models it equals ``n_params``.
    """
    abstract = nnx.eval_shape(lambda: new_model(cfg, 0))
    state = nnx.state(abstract, nnx.Param)
    total = sum(int(v.size) for v in jax.tree.leaves(state))
    emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return {"n_params": total, "n_params_non_embedding": total - emb, "n_active_params": total}
