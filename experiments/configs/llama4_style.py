"""Llama-4-style MoE (Meta 2025, Llama 4 Scout/Maverick model card and reference code) at the
transformer's sizes, scaled down.

    --config=experiments/configs/llama4_style.py:SIZE      SIZE in tiny | small | base

What is kept: MoE interleaved with dense layers (``moe_every = 2``: layers 1, 3, ... are MoE, as
Maverick's interleave step 2), top-1 routing with a sigmoid gate on the chosen expert's score (not
normalized: a normalized top-1 weight would be constant 1), and one shared expert always active
beside the routed one. What is scaled: 16 routed experts (Maverick: 128). Each expert has
``d_ff / 2`` units, so routed + shared = the dense MLP's width in the MoE layers, and the dense
layers keep ``d_ff``: active parameters equal the transformer's. Balance loss 0.01, z-loss 1e-3
and capacity dispatch (factor 1.25) as ``moe.py`` (Llama 4 is not documented as dropping
tokens; on GPU/TPU use ``--config.model.moe.dispatch=dropless``).
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent
SIZES = ("tiny", "small", "base")


def get_config(arg: str | None = None):
    """Return the Llama-4-style config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size("llama4_style", dict.fromkeys(SIZES), arg)
    c = load_config(HERE / "moe.py", size)
    mo = c.model.moe
    mo.n_experts, mo.top_k, mo.n_shared_experts = 16, 1, 1
    mo.router, mo.norm_top_k = "sigmoid", False
    mo.moe_every = 2
    return c
