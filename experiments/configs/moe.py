"""Mixture-of-Experts transformer (GQA attention + MoE SwiGLU FFN) at the transformer's sizes.

    --config=experiments/configs/moe.py:SIZE      SIZE in tiny | small | base

Switch / Mixtral-style routing (Fedus et al. 2022; Jiang et al. 2024): softmax router, top-2 of 8
experts with renormalized top-2 weights, load-balancing loss 0.01 and router z-loss 1e-3
(ST-MoE), capacity dispatch with capacity factor 1.25. Each expert has ``d_ff / 2`` hidden units,
so the two active experts hold the dense MLP's ``d_ff``: *active* parameters equal the
transformer's of the same size (plus the ``d_model x 8`` router) while the total is ~4x in the
FFNs. Equal active parameters = equal model FLOPs per token: the comparison MoE papers make.
``--config.model.moe.dispatch=dropless`` switches to sorted tokens + ``jax.lax.ragged_dot``
(dense on CPU: see efficient_arch/models/moe.py).
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent
SIZES = ("tiny", "small", "base")


def get_config(arg: str | None = None):
    """Return the MoE config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size("moe", dict.fromkeys(SIZES), arg)
    c = load_config(HERE / "transformer.py", size)
    m = c.model
    m.ffn = "moe"
    mo = m.moe
    mo.n_experts, mo.top_k, mo.d_ff_expert = 8, 2, m.d_ff // 2
    mo.router, mo.norm_top_k = "softmax", True
    mo.dispatch, mo.capacity_factor = "capacity", 1.25
    mo.aux_loss_coef, mo.z_loss_coef = 0.01, 1e-3
    return c
