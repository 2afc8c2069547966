"""Sliding-window attention LM at the transformer's sizes: every block is local causal softmax
attention over the last ``window_size`` tokens (GQA + RoPE) + SwiGLU MLP.

    --config=experiments/configs/sliding_window.py:SIZE      SIZE in tiny | small | base

Everything but the mixer and ``window_size`` is ``transformer.py``'s (its ``SIZES``), so the
parameter count is identical to the transformer's; the window is a quarter of the training
context (16 / 32 / 256 tokens). The blocked training form (``mixer_form="chunked"``) executes
``O(T W)`` attention FLOPs; ``"quadratic"`` runs the masked full-square XLA form instead.
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent

WINDOW = {"tiny": 16, "small": 32, "base": 256}


def get_config(arg: str | None = None):
    """Return the sliding-window config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size('sliding_window', WINDOW, arg)
    c = load_config(HERE / "transformer.py", size)
    c.model.mixer = "sliding_window"
    c.model.window_size = WINDOW[size]
    c.model.mixer_form = "chunked"
    return c
