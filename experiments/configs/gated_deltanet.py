"""Gated DeltaNet LM at the transformer's sizes: every block is a Gated DeltaNet mixer + SwiGLU MLP.

    --config=experiments/configs/gated_deltanet.py:SIZE      SIZE in tiny | small | base

As ``deltanet.py`` (transformer sizes, conv width 4, chunked form) with Yang, Kautz & Hatamizadeh
2024 ("Gated Delta Networks")'s per-head data-dependent decay and SiLU output gate. The gate adds
a ``d x d`` projection: ~5 d^2 parameters per mixer against the GQA attention layer's 2.7-3.3 d^2,
so ``d_ff`` is reduced to keep the parameter count within ~2% of the transformer of the same size
(tests/test_mixers_deltanet.py checks 10%).
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent

#        chunk_size d_ff
GATED_DELTANET = {
    "tiny": (16, 144),
    "small": (32, 352),
    "base": (64, 1472),
}


def get_config(arg: str | None = None):
    """Return the Gated DeltaNet config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size("gated_deltanet", GATED_DELTANET, arg)
    c = load_config(HERE / "deltanet.py", size)
    c.model.mixer = "gated_deltanet"
    c.model.chunk_size, c.model.d_ff = GATED_DELTANET[size]
    return c
