"""Mamba-2 (SSD) LM at the transformer's sizes: every block is a Mamba-2 mixer + SwiGLU MLP.

    --config=experiments/configs/mamba2.py:SIZE      SIZE in tiny | small | base

d_model, n_layers, seq_len, batch, steps and lr are those of ``transformer.py`` (its ``SIZES``).
Mamba-2 settings follow Dao & Gu 2024 (expand 2, conv width 4, head dim 64 / state 128 at base;
smaller heads and states at the CPU sizes). The paper's Mamba-2 stacks have no MLP; this LM's
blocks always carry an FFN, so ``d_ff`` is reduced to keep the parameter count within ~5% of the
transformer of the same size (a Mamba-2 layer with expand 2 has ~6 d^2 parameters against the
attention layer's 2-4 d^2); the comparison is then at equal parameters and equal depth.
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent

#       head_dim state_size chunk_size d_ff
MAMBA2 = {
    "tiny": (16, 16, 16, 112),
    "small": (32, 32, 32, 256),
    "base": (64, 128, 64, 1088),
}


def get_config(arg: str | None = None):
    """Return the Mamba-2 config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size('mamba2', MAMBA2, arg)
    c = load_config(HERE / "transformer.py", size)
    m = c.model
    m.mixer = "mamba2"
    m.head_dim, m.state_size, m.chunk_size, m.d_ff = MAMBA2[size]
    m.expand, m.conv_width, m.mixer_form = 2, 4, "chunked"
    return c
