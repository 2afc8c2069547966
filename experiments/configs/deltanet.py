"""DeltaNet LM at the transformer's sizes: every block is a DeltaNet mixer + SwiGLU MLP.

    --config=experiments/configs/deltanet.py:SIZE      SIZE in tiny | small | base

d_model, n_layers, n_heads (head_dim = d_model / n_heads), seq_len, batch, steps and lr are those
of ``transformer.py`` (its ``SIZES``). DeltaNet settings follow Yang et al. 2024 ("Parallelizing
Linear Transformers with the Delta Rule over Sequence Length"): short conv width 4, chunked UT
form with chunk 64 at base (16 / 32 at the CPU sizes, a quarter of seq_len). A DeltaNet layer has
full-width q, k, v (no GQA), a conv and beta: ~4 d^2 parameters against the GQA attention layer's
2.7-3.3 d^2, so ``d_ff`` is reduced to keep the parameter count within ~2% of the transformer of
the same size (tests/test_mixers_deltanet.py checks 10%).
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent

#        chunk_size d_ff
DELTANET = {
    "tiny": (16, 160),
    "small": (32, 416),
    "base": (64, 1728),
}


def make_config(mixer: str, table: dict, arg: str | None):
    """The transformer config of size ``arg`` with ``mixer`` and ``(chunk_size, d_ff)`` from ``table``.

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size(mixer, table, arg)
    c = load_config(HERE / "transformer.py", size)
    m = c.model
    m.mixer = mixer
    m.chunk_size, m.d_ff = table[size]
    m.conv_width, m.mixer_form = 4, "chunked"
    return c


def get_config(arg: str | None = None):
    """Return the DeltaNet config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    return make_config("deltanet", DELTANET, arg)
