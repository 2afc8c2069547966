"""Sequence mixers: one file per family, each registered in ``models/registry.py``.

The contract every mixer class follows (``cfg`` is the finalized ``config.model`` section)::

    class Mixer(nnx.Module):
        def __init__(self, cfg, *, rngs: nnx.Rngs): ...
        def __call__(self, x, *, segment_ids=None, positions=None) -> y
            # x, y: [B, T, d_model] in the compute dtype (cfg.dtype); segment_ids: optional int32
            # [B, T] (packed documents: no information crosses a boundary); positions: optional
            # int32 [B, T] (used by RoPE mixers, ignored by others)
        def init_cache(self, batch_size: int, max_len: int) -> cache      # pytree of arrays
        def decode(self, x, cache, *, position) -> (y, cache)
            # x, y: [B, 1, d_model]; position: int32 scalar, index of this token; the cache has a
            # constant size for recurrent mixers (state [B, H, K, V] float32, conv tail)
        @staticmethod
        def flops_per_token(cfg, seq_len: int, *, attention: str = "causal") -> float
            # forward FLOPs per token of the form that cfg.mixer_form executes (matmul FLOPs;
            # see each file's docstring for the formula); attention: "causal" | "full" (MFU
            # conventions for softmax attention's score term) | "executed" (what the program
            # scores: hardware FLOPs); mixers without softmax attention ignore it

Numerics live once in ``efficient_arch/ops/``; a mixer composes ops and layers, never re-derives a
scan. Parameters are created with ``layers.param`` (logical axis names) and matmuls use
``layers.matmul`` (compute dtype in, float32 accumulation).
"""
