"""Gated linear attention LM (Yang et al. 2023) at the transformer's sizes.

    --config=experiments/configs/gla.py:SIZE      SIZE in tiny | small | base

d_model, n_layers, n_heads (head_dim = d_model / n_heads), seq_len, batch, steps and lr are those
of ``transformer.py`` (its ``SIZES``). Data-dependent per-key-dim decay (low-rank 16, temperature
16), chunked form with chunk 16 / 32 / 64 (tiny / small / base; intra-chunk scores by recursive
halving of the chunk). A GLA layer has q, k, v, gate and output projections plus the low-rank decay
(~5 d^2 parameters against the GQA attention layer's 2.7-3 d^2), so ``d_ff`` is reduced to keep the
parameter count within 4% of the transformer of the same size (measured with ``count_params``: tiny
0.967, small 1.001, base 1.000).
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent

#        chunk_size d_ff
GLA = {
    "tiny": (16, 128),
    "small": (32, 352),
    "base": (64, 1440),
}


def get_config(arg: str | None = None):
    """Return the GLA config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size('gla', GLA, arg)
    c = load_config(HERE / "transformer.py", size)
    m = c.model
    m.mixer, m.mixer_form = "gla", "chunked"
    m.chunk_size, m.d_ff = GLA[size]
    return c
