"""Based LM (Arora et al. 2024) at the transformer's sizes: alternating Taylor linear-attention
layers (``based``) and sliding-window softmax-attention layers (``sliding_window``), each block
with a SwiGLU MLP.

    --config=experiments/configs/based.py:SIZE      SIZE in tiny | small | base

``layer_pattern = ("based", "sliding_window")`` repeated ``n_layers / 2`` times. The paper's
Based architecture also has gated-convolution (BaseConv) layers, which this repo does not
implement: this is "Based without BaseConv" (see ``models/mixers/based.py``). Paper settings:
feature dim 16 for the Taylor map, window 64 (16 / 32 at the CPU sizes, whose contexts are
64 / 128 tokens). Other fields are ``transformer.py``'s (its ``SIZES``); a Based layer has
``2 d^2 + 2 d H F`` parameters, close to a GQA attention layer, so the total stays within ~4% of
the transformer's.
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent

#        feature_dim window chunk_size
BASED = {
    "tiny": (16, 16, 16),
    "small": (16, 32, 32),
    "base": (16, 64, 64),
}


def get_config(arg: str | None = None):
    """Return the Based hybrid config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size('based', BASED, arg)
    c = load_config(HERE / "transformer.py", size)
    m = c.model
    m.mixer = "based"
    m.layer_pattern = ("based", "sliding_window")
    m.feature_dim, m.window_size, m.chunk_size = BASED[size]
    m.mixer_form = "chunked"
    return c
