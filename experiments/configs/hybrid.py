"""Gated DeltaNet / attention hybrid at the transformer's sizes: the group
``("gated_deltanet", "gated_deltanet", "attention")`` repeated ``n_layers / 3`` times, each
block with a SwiGLU MLP (one global-attention layer per two recurrent layers, in the spirit of
the hybrids of Yang et al. 2024, "Gated Delta Networks", Sec. 4).

    --config=experiments/configs/hybrid.py:SIZE      SIZE in tiny | small | base

d_model, heads, seq_len, batch, steps and lr are ``transformer.py``'s (its ``SIZES``).
``n_layers`` must be a multiple of 3 (3 / 3 / 12) and ``d_ff`` is reduced so the parameter count
stays within ~5% of the transformer of the same size (a Gated DeltaNet layer has ~5 d^2
parameters against the GQA attention layer's ~2.7 d^2).
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent

PATTERN = ("gated_deltanet", "gated_deltanet", "attention")
#        n_layers d_ff chunk_size
HYBRID = {
    "tiny": (3, 80, 16),
    "small": (3, 640, 32),
    "base": (12, 1664, 64),
}


def get_config(arg: str | None = None):
    """Return the hybrid config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size('hybrid', HYBRID, arg)
    c = load_config(HERE / "transformer.py", size)
    m = c.model
    m.mixer = "attention"
    m.layer_pattern = PATTERN
    m.n_layers, m.d_ff, m.chunk_size = HYBRID[size]
    m.mixer_form = "chunked"
    return c
