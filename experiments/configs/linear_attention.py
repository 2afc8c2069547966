"""Causal linear attention LM (Katharopoulos et al. 2020) at the transformer's sizes.

    --config=experiments/configs/linear_attention.py:SIZE      SIZE in tiny | small | base

d_model, n_layers, n_heads (head_dim = d_model / n_heads), seq_len, batch, steps and lr are those
of ``transformer.py`` (its ``SIZES``). Feature map elu + 1 with the normalising denominator (the
paper's eq. 7 / 9), chunked form with chunk 16 / 32 / 64 (tiny / small / base). A linear-attention
layer has full-width q, k, v, o (4 d^2 parameters against the GQA attention layer's 2.7-3 d^2),
so ``d_ff`` is reduced to keep the parameter count within 4% of the transformer of the same size
(measured with ``count_params``: tiny 0.965, small 0.985, base 0.996).
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent

#        chunk_size d_ff
LINEAR_ATTENTION = {
    "tiny": (16, 160),
    "small": (32, 416),
    "base": (64, 1696),
}


def get_config(arg: str | None = None):
    """Return the linear-attention config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size('linear_attention', LINEAR_ATTENTION, arg)
    c = load_config(HERE / "transformer.py", size)
    m = c.model
    m.mixer, m.mixer_form = "linear_attention", "chunked"
    m.feature_map, m.normalize = "elu", True
    m.chunk_size, m.d_ff = LINEAR_ATTENTION[size]
    return c
