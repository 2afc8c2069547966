"""RetNet LM (multi-scale retention, Sun et al. 2023) at the transformer's sizes.

    --config=experiments/configs/retnet.py:SIZE      SIZE in tiny | small | base

d_model, n_layers, n_heads (head_dim = d_model / n_heads), seq_len, batch, steps and lr are those
of ``transformer.py`` (its ``SIZES``). Per-head decays gamma_h = 1 - 2^(-5 - h) (fixed), chunkwise
form with chunk 16 / 32 / 64 (tiny / small / base). A retention layer has q, k, v, gate and output
projections (5 d^2 parameters against the GQA attention layer's 2.7-3 d^2; the paper's value/gate
width 2d would be 8 d^2), so ``d_ff`` is reduced to keep the parameter count within 4% of the
transformer of the same size (measured with ``count_params``: tiny 1.037, small 0.985, base 0.996).
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent

#        chunk_size d_ff
RETNET = {
    "tiny": (16, 160),
    "small": (32, 352),
    "base": (64, 1440),
}


def get_config(arg: str | None = None):
    """Return the RetNet config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size('retnet', RETNET, arg)
    c = load_config(HERE / "transformer.py", size)
    m = c.model
    m.mixer, m.mixer_form = "retnet", "chunked"
    m.chunk_size, m.d_ff = RETNET[size]
    return c
