"""The decoder-only language model shared by every architecture.

    tokens -> Embed -> [Block(mixer, ffn)] x n_layers -> RMSNorm -> LM head (tied or untied)

A block is pre-norm: ``x += mixer(norm(x)); x += ffn(norm(x))``, with the mixer and FFN classes
taken from ``models/registry.py``. ``model.layer_pattern`` (e.g. ``["gated_deltanet",
"attention"]``) and, for MoE, ``moe.moe_every`` define a *group* of ``lcm(len(pattern),
moe_every)`` blocks repeated over the depth (after ``moe.first_k_dense`` all-dense layers, kept
in a separate ``prefix`` stack: stacked groups must be identical); the
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
from efficient_arch.models.layers import Embed, RMSNorm, dtype_of, matmul, param, precision_of
from efficient_arch.ops import scan as scan_lib

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_pattern(cfg) -> list[str]:
    """Mixer names of the repeating pattern (``[cfg.mixer]`` when ``layer_pattern`` is None)."""
    return list(cfg.layer_pattern) if cfg.layer_pattern is not None else [cfg.mixer]


def n_prefix_layers(cfg) -> int:
    """Leading dense-FFN layers of an MoE model (``moe.first_k_dense``); 0 otherwise."""
    return cfg.moe.first_k_dense if cfg.ffn == "moe" else 0


def group_blocks(cfg, *, dense: bool = False) -> list[tuple[str, str]]:
    """``(mixer, ffn)`` of each block of one repeated group (``config.group_len`` blocks).

    Block ``j`` uses mixer ``pattern[j % len(pattern)]`` and, in an MoE model, the MoE FFN when
    ``j % moe_every == moe_every - 1`` (Llama-4 interleaving: layers 1, 3, ... for 2), else the
    dense MLP. ``dense=True`` gives the all-MLP groups of the ``first_k_dense`` prefix.
    """
    from efficient_arch.config import group_len

    pattern = layer_pattern(cfg)
    every = cfg.moe.moe_every
    out = []
    for j in range(group_len(cfg)):
        moe = cfg.ffn == "moe" and not dense and j % every == every - 1
        out.append((pattern[j % len(pattern)], "moe" if moe else ("mlp" if cfg.ffn == "moe" else cfg.ffn)))
    return out


def layer_kinds(cfg) -> list[tuple[str, str]]:
    """``(mixer, ffn)`` of every layer in order (length ``n_layers``), for FLOP and param counts."""
    glen = len(group_blocks(cfg))
    k = n_prefix_layers(cfg)
    return (group_blocks(cfg, dense=True) * (k // glen)
            + group_blocks(cfg) * ((cfg.n_layers - k) // glen))


class Block(nnx.Module):
    """Pre-norm residual block: a sequence mixer then an FFN, each behind an RMSNorm."""

    def __init__(self, cfg, mixer: str, ffn: str, *, rngs: nnx.Rngs):
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.mixer = registry.get_mixer(mixer)(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        self.ffn = registry.get_ffn(ffn)(cfg, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None):
        """``x`` ``[B, T, d_model]`` -> ``([B, T, d_model], aux dict of float32 arrays)``."""
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

    def prefill(self, x, cache):
        """The prompt ``x [B, T, d_model]`` through the block, the mixer in its parallel form
        filling ``cache`` (``mixer.prefill``). Returns ``([B, T, d_model], cache)``."""
        y, cache = self.mixer.prefill(self.mixer_norm(x), cache)
        x = x + y
        y, _ = self.ffn(self.ffn_norm(x))
        return x + y, cache


class Group(nnx.Module):
    """One repetition of :func:`group_blocks`: a list of blocks applied in order.

    Aux: scalars are summed over blocks; a vector (per-layer statistic such as MoE
    ``expert_counts``) of block ``j`` is returned under ``"{name}/{j}"``.
    """

    def __init__(self, cfg, *, dense: bool = False, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, mixer, ffn, rngs=rngs) for mixer, ffn in group_blocks(cfg, dense=dense)])

    def __call__(self, x, *, segment_ids=None, positions=None):
        aux_total: dict = {}
        for j, blk in enumerate(self.blocks):
            x, aux = blk(x, segment_ids=segment_ids, positions=positions)
            for k, v in aux.items():
                if jnp.ndim(v):
                    aux_total[f"{k}/{j}"] = v
                else:
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

    def prefill(self, x, caches):
        new = []
        for blk, c in zip(self.blocks, caches):
            x, c = blk.prefill(x, c)
            new.append(c)
        return x, new


def _stack(cfg, n: int, dense: bool, rngs: nnx.Rngs):
    """``n`` groups with parameters stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return Group(cfg, dense=dense, rngs=rngs)

    return make(rngs)


class LM(nnx.Module):
    """Decoder-only LM. ``cfg`` is the finalized ``config.model`` section.

    Call: ``tokens`` int32 ``[B, T]`` -> ``(logits float32 [B, T, vocab_size], aux)`` where
    ``aux`` maps names to float32 scalars summed over layers (``"aux_loss"``, if present, is
    added to the training loss by the train step).
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        glen = len(group_blocks(cfg))
        n_prefix = n_prefix_layers(cfg) // glen
        self.n_groups = (cfg.n_layers - n_prefix_layers(cfg)) // glen
        self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs)
        self.prefix = _stack(cfg, n_prefix, True, rngs) if n_prefix else None  # first_k_dense
        self.groups = _stack(cfg, self.n_groups, False, rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std)

    def _stacks(self):
        return [("prefix", self.prefix)] * (self.prefix is not None) + [("groups", self.groups)]

    def _run_stack(self, stack, x, segment_ids, positions):
        """Apply stacked groups (scan or loop). Aux: scalars summed over groups; vectors stacked
        ``[n_groups, ...]``."""
        graphdef, stacked = nnx.split(stack)
        n = jax.tree.leaves(stacked)[0].shape[0]

        def body(h, group_state):
            group = nnx.merge(graphdef, group_state)
            return group(h, segment_ids=segment_ids, positions=positions)

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        with precision_of(self.cfg):  # model.quant / attention_impl for the blocks (not the head)
            if self.cfg.scan_layers:
                # bf16 residuals as integers: stacked in place (ops/scan.py); other dtypes have
                # nothing to pack and keep the plain body
                bf16 = self.dtype == jnp.bfloat16
                x, auxs = jax.lax.scan(scan_lib.int_residuals(body) if bf16 else body, x, stacked)
            else:
                outs = []
                for i in range(n):
                    x, a = body(x, jax.tree.map(lambda p: p[i], stacked))
                    outs.append(a)
                auxs = jax.tree.map(lambda *v: jnp.stack(v), *outs) if outs else {}
        return x, {k: (jnp.sum(v) if v.ndim == 1 else v) for k, v in auxs.items()}

    def hidden(self, tokens, *, segment_ids=None, positions=None):
        """Final-normed hidden states ``[B, T, d_model]`` (compute dtype) and the aux dict.

        Aux: float32 scalars summed over layers (``aux_loss`` is added to the training loss),
        and per-layer vectors (MoE ``expert_counts``) under ``"{stack}/{name}/{block}"`` with
        shape ``[n_groups, ...]``, matching the stacked parameters of that block.
        """
        x = self.embed(tokens, self.dtype)
        x = parallel.constrain(x, ("batch", "seq", "act_embed"))
        aux: dict = {}
        for name, stack in self._stacks():
            x, a = self._run_stack(stack, x, segment_ids, positions)
            for k, v in a.items():
                if v.ndim:
                    aux[f"{name}/{k}"] = v
                else:
                    aux[k] = aux.get(k, 0.0) + v
        return self.final_norm(x), aux

    def logits(self, h):
        """LM head: ``[B, T, d_model]`` -> float32 ``[B, T, vocab_size]``."""
        if self.cfg.tie_embeddings:
            out = self.embed.attend(h, self.dtype)
        else:
            out = matmul("btd,dv->btv", h, self.head[...], self.dtype, out_dtype=jnp.float32, quant="none")
        return parallel.constrain(out, ("batch", "seq", "act_vocab"))

    def head_weight(self) -> tuple[jax.Array, bool]:
        """The LM head's weight and whether it is tied: ``(embedding [V, d_model], True)`` or
        ``(head [d_model, V], False)`` (for the fused loss, ops/cross_entropy.py)."""
        if self.cfg.tie_embeddings:
            return self.embed.embedding[...], True
        return self.head[...], False

    def __call__(self, tokens, *, segment_ids=None, positions=None):
        h, aux = self.hidden(tokens, segment_ids=segment_ids, positions=positions)
        return self.logits(h), aux

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """Decode caches of every layer: ``{"groups": ..., ["prefix": ...]}``, each stacked on a
        leading ``n_groups`` axis like the params.

        Attention layers hold a ``[B, max_len, n_kv_heads, head_dim]`` KV cache; recurrent mixers
        a constant-size state.
        """
        out = {}
        for name, stack in self._stacks():
            graphdef, stacked = nnx.split(stack)
            n = jax.tree.leaves(stacked)[0].shape[0]
            first = nnx.merge(graphdef, jax.tree.map(lambda p: p[0], stacked))
            one = first.init_cache(batch_size, max_len)
            out[name] = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), one)
        return out

    def decode(self, tokens, cache: dict, *, position):
        """One decoding step: ``tokens`` int32 ``[B, 1]`` at index ``position`` (int32 scalar).

        Returns ``(logits float32 [B, 1, vocab_size], cache)``; a scan over the layer groups as in
        training, so the logits equal the full forward pass's at that position.
        """
        x, new_cache = self._scan_with_cache(self.embed(tokens, self.dtype), cache,
                                             lambda group, h, c: group.decode(h, c, position=position))
        return self.logits(self.final_norm(x)), new_cache

    def _scan_with_cache(self, x, cache: dict, step):
        """``x`` through every stack's layer groups (one ``lax.scan`` per stack, as in training)
        with their caches: ``step(group, h, group_cache) -> (h, group_cache)``; the precision
        policy of :meth:`hidden` applies. Returns ``(x, new_cache)``."""
        new_cache = {}
        for name, stack in self._stacks():
            graphdef, stacked = nnx.split(stack)

            def body(h, layer, graphdef=graphdef):
                group_state, group_cache = layer
                return step(nnx.merge(graphdef, group_state), h, group_cache)

            with precision_of(self.cfg):
                x, new_cache[name] = jax.lax.scan(body, x, (stacked, cache[name]))
        return x, new_cache

    def prefill(self, tokens, cache: dict, *, all_logits: bool = False):
        """The prompt in one parallel pass, producing the caches decoding continues from.

        Every mixer runs its ``prefill`` (attention: causal attention over the prompt with its
        keys/values written into the KV cache; recurrent mixers: the chunked form returning the
        final state and conv tails), through the same scan over the stacked layer groups as
        :meth:`decode`. Afterwards ``decode(tokens[:, T:T+1], cache, position=T)`` continues the
        sequence exactly as if the prompt had been decoded token by token.

        Args:
          tokens: int32 ``[B, T]``, the prompt at positions ``0 .. T - 1`` (``T >= 1``).
          cache: a fresh :meth:`init_cache` ``(B, max_len)`` with ``max_len >= T``.
          all_logits: return the logits of every prompt position instead of the last one only.
        Returns:
          ``(logits float32 [B, T or 1, vocab_size], cache)``: equal (up to float rounding) to
          the full forward pass's logits at those positions.
        Raises:
          ValueError: the prompt does not fit an attention cache (``T > max_len``).
          AttributeError: a mixer without ``prefill`` (the message names it): there is no silent
            fallback to another path.
        """
        for _, stack in self._stacks():
            for blk in stack.blocks:
                if not hasattr(blk.mixer, "prefill"):
                    raise AttributeError(f"mixer {type(blk.mixer).__name__} has no prefill(x, cache); "
                                         "add one (parallel form returning its decode cache)")
        x, new_cache = self._scan_with_cache(self.embed(tokens, self.dtype), cache,
                                             lambda group, h, c: group.prefill(h, c))
        if not all_logits:
            x = x[:, -1:]
        return self.logits(self.final_norm(x)), new_cache


def new_model(cfg, seed: int) -> LM:
    """Construct an LM without eager sharding: parameters carry logical names, which only
    ``parallel.py`` resolves to mesh axes (as jit out_shardings), so this works with or without
    a mesh in context, traced or not."""
    with nnx.use_eager_sharding(False):
        return LM(cfg, rngs=nnx.Rngs(seed))


def count_params(cfg) -> dict[str, int]:
    """Parameter counts without allocating: ``n_params``, ``n_params_non_embedding`` and
    ``n_active_params`` (parameters one token uses: an MoE layer's unchosen ``E - top_k`` experts
    excluded; equal to ``n_params`` for dense models).

    Non-embedding excludes the token embedding matrix (and the untied head), following Kaplan et
    al. 2020. The MoE ``expert_bias`` (not trained by gradient) is not counted.
    """
    abstract = nnx.eval_shape(lambda: new_model(cfg, 0))
    state = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    total = sum(int(v.size) for path, v in flat if getattr(path[-1], "key", None) != "expert_bias")
    emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    inactive = 0
    for _, ffn in layer_kinds(cfg):
        if ffn != "mlp":
            inactive += getattr(registry.get_ffn(ffn), "n_inactive_params", lambda c: 0)(cfg)
    return {"n_params": total, "n_params_non_embedding": total - emb, "n_active_params": total - inactive}


def apply_step_stats(mcfg, params: dict, metrics: dict) -> tuple[dict, dict]:
    """After the optimizer update: hand the step's per-layer statistics to the modules that made
    them, then drop what cannot be logged.

    Every FFN / mixer class present that defines ``post_step(cfg, params, metrics) -> (params,
    metrics)`` is called once (the MoE's aux-loss-free bias step and load metrics). Remaining
    non-scalar entries (per-layer vectors ``"{stack}/{name}/{block}"``) are removed, so the
    returned metrics are float32 scalars. Returns ``(params, metrics)``.
    """
    classes = {registry.get_mixer(m) for m, _ in layer_kinds(mcfg)} | {registry.get_ffn(f) for _, f in layer_kinds(mcfg)}
    for cls in sorted(classes, key=lambda c: c.__name__):
        hook = getattr(cls, "post_step", None)
        if hook is not None:
            params, metrics = hook(mcfg, params, metrics)
    return params, {k: v for k, v in metrics.items() if not jnp.ndim(v)}


def update_expert_bias(params: dict, aux: dict, rate: float) -> dict:
    """Aux-loss-free balancing step (DeepSeek-V3 §2.1.2): ``b_i += rate * sign(mean load - load_i)``.

    Args:
      params: the pure-dict parameters; every MoE block's ``ffn.expert_bias`` ``[n_groups, E]``
        is updated (outside the gradient).
      aux: the step's metrics holding ``"{stack}/expert_counts/{block}"`` ``[n_groups, E]``.
    Returns:
      new params (other leaves untouched).
    """
    params = dict(params)
    for key, counts in aux.items():
        stack, name, block = key.split("/")
        if name != "expert_counts":
            continue
        blocks = dict(params[stack]["blocks"])
        ffn = dict(blocks[int(block)]["ffn"])
        mean = jnp.mean(counts, axis=-1, keepdims=True)
        ffn["expert_bias"] = ffn["expert_bias"] + rate * jnp.sign(mean - counts)
        blocks[int(block)] = {**blocks[int(block)], "ffn": ffn}
        params[stack] = {**params[stack], "blocks": blocks}
    return params
