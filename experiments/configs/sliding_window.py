"""Sliding-window attention LM at the transformer's sizes: every block is local causal softmax
attention over the last ``window_size`` tokens (GQA + RoPE) + SwiGLU MLP.

    --config=experiments/configs/sliding_window.py:SIZE      SIZE in tiny | small | base

Everything but the mixer and ``window_size`` is ``transformer.py``'s (its ``SIZES``), so the
parameter count is identical to the transformer's; the window is a quarter of the training
context (16 / 32 / 256 tokens). The blocked training form (``mixer_form="chunked"``) executes
``O(T W)`` attention FLOPs; ``"quadratic"`` runs the masked full-square XLA form instead.
"""

import importlib.util
import pathlib

WINDOW = {"tiny": 16, "small": 32, "base": 256}


def _transformer():
    path = pathlib.Path(__file__).with_name("transformer.py")
    spec = importlib.util.spec_from_file_location("_efficient_arch_transformer_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(arg: str | None = None):
    """Return the sliding-window config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = arg or "small"
    if size not in WINDOW:
        raise ValueError(f"unknown sliding_window size {size!r}; choose one of {sorted(WINDOW)}")
    c = _transformer().get_config(size)
    c.model.mixer = "sliding_window"
    c.model.window_size = WINDOW[size]
    c.model.mixer_form = "chunked"
    return c
