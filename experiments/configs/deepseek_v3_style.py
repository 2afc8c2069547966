"""DeepSeek-V3-style MoE (Liu et al. 2024, "DeepSeek-V3 Technical Report" §2.1.2, §4.2) at the
transformer's sizes, scaled down.

    --config=experiments/configs/deepseek_v3_style.py:SIZE      SIZE in tiny | small | base

What is kept from DeepSeek-V3: fine-grained experts (many small experts, ``d_ff_expert = d_ff /
4``), one always-active shared expert, sigmoid router scores with the selected top-k weights
normalized and scaled by ``route_scale`` 2.5, auxiliary-loss-free balancing (per-expert bias)
plus a very small balance loss (1e-4, in the spirit of the
paper's sequence-wise loss, here over the batch), and the first layer(s) dense (V3: 3 of 61).
What is scaled: the bias update speed gamma is 1e-2 per step (V3: 1e-3 over 14.8T tokens; in
runs of a few hundred steps 1e-3 cannot catch up: measured on the small size, 100 steps, 1e-3 ->
max expert load 7.6x uniform, 55% of assignments dropped, val 3.41 bpb; 1e-2 -> 1.7x, 18%, 3.35
bpb), and 32 routed experts with top-3 (V3: 256, top-8), so that top_k + shared = 4 experts
of d_ff/4 give the transformer's active FFN width (equal active parameters). DeepSeek-V3 trains
dropless; this config uses capacity dispatch (factor 1.25) because ``ragged_dot`` runs densely on
CPU; on GPU/TPU pass ``--config.model.moe.dispatch=dropless``. Multi-head latent attention and
multi-token prediction are not part of this FFN study.
"""

import pathlib

from efficient_arch.config import load_config, pick_size

HERE = pathlib.Path(__file__).parent
SIZES = {"tiny": 1, "small": 1, "base": 2}  # first_k_dense


def get_config(arg: str | None = None):
    """Return the DeepSeek-V3-style config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size("deepseek_v3_style", SIZES, arg)
    c = load_config(HERE / "moe.py", size)  # capacity dispatch, factor 1.25
    m = c.model
    mo = m.moe
    mo.n_experts, mo.top_k, mo.n_shared_experts, mo.d_ff_expert = 32, 3, 1, m.d_ff // 4
    mo.router, mo.norm_top_k, mo.route_scale = "sigmoid", True, 2.5
    mo.bias_update_rate, mo.aux_loss_coef, mo.z_loss_coef = 1e-2, 1e-4, 0.0
    mo.first_k_dense = SIZES[size]
    return c
