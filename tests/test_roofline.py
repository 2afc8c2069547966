"""Tests for efficient_arch.roofline and the roofline CLI: decode state bytes from the caches'
shapes (attention grows with the context, recurrent states do not), decode FLOPs against XLA's
count of the decode program, train-step byte terms, the ceiling from the registry figures, MoE
touched experts, chip errors, and ``efficient-arch roofline`` writing JSON.

Everything is abstract (eval_shape / make_jaxpr / lowering): no model is run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import REPO_ROOT

from efficient_arch import cli, hardware
from efficient_arch import roofline as R
from efficient_arch.config import finalize, group_len, load_config
from efficient_arch.flops import analytic_flops
from efficient_arch.models.lm import count_params

CONFIGS = REPO_ROOT / "experiments" / "configs"
CONFIG_FILES = sorted(p.name for p in CONFIGS.glob("*.py") if not p.name.startswith("_"))
H100 = R.chip_figures("h100", "bfloat16")


def tiny(name: str, **model):
    c = load_config(CONFIGS / name, "tiny")
    c.model.dtype = "bfloat16"
    for k, v in model.items():
        c.model[k] = v
    return c


def fmodel(cfg):
    return finalize(cfg).model


# ----------------------------------------------------------------------------- chip figures


def test_chip_figures_come_from_the_registries():
    peak = hardware.PEAK_FLOPS["H100 SXM"]["bfloat16"]
    bw = hardware.HBM_BANDWIDTH["H100 SXM"]["bytes_per_s"]
    assert (peak, bw) == (989e12, 3.35e12)
    assert H100["peak_flops_per_s"] == peak and H100["hbm_bytes_per_s"] == bw
    assert H100["ridge_flops_per_byte"] == peak / bw
    v5e = R.chip_figures("v5e", "bfloat16")
    assert v5e["ridge_flops_per_byte"] == 197e12 / 819e9 and v5e["chip"] == "TPU v5e"
    a100 = R.chip_figures("NVIDIA A100-SXM4-80GB", "bfloat16")
    assert (a100["peak_flops_per_s"], a100["hbm_bytes_per_s"]) == (312e12, 2039e9)


@pytest.mark.parametrize("chip", ["mi300x", "gb200", "cpu"])
def test_unknown_chip_raises_naming_the_flag(chip):
    with pytest.raises(hardware.UnknownAcceleratorError, match="--hbm_bandwidth"):
        R.chip_figures(chip, "bfloat16")


def test_ambiguous_chip_names_the_precise_spellings():
    with pytest.raises(hardware.UnknownAcceleratorError, match="a100-80gb"):
        R.chip_figures("a100", "bfloat16")


def test_overrides_replace_unknown_figures():
    fig = R.chip_figures("mi300x", "bfloat16", peak_flops=1.3e15, hbm_bandwidth=5.3e12)
    assert fig["ridge_flops_per_byte"] == pytest.approx(1.3e15 / 5.3e12)
    assert fig["peak_source"] == fig["hbm_source"] == "user-given"
    with pytest.raises(hardware.UnknownAcceleratorError, match="peak_flops"):  # bandwidth alone: peak unknown
        R.chip_figures("mi300x", "bfloat16", hbm_bandwidth=5.3e12)


def test_ceiling_is_min_one_intensity_over_ridge():
    ridge = H100["ridge_flops_per_byte"]
    assert R.ceiling(ridge / 10, ridge) == pytest.approx(0.1)
    assert R.ceiling(10 * ridge, ridge) == 1.0
    with pytest.raises(ValueError):
        R.ceiling(1.0, 0.0)


# ----------------------------------------------------------------------------- decode state bytes


def test_attention_decode_bytes_grow_linearly_with_context():
    """KV read = 2 (k, v) L context n_kv head_dim bytes per sequence; one position written;
    weights read once (tied embedding: all parameters); the rest is activations."""
    cfg = tiny("transformer.py")
    m = fmodel(cfg)
    b = 3
    per_pos = 2 * m.n_layers * m.n_kv_heads * m.head_dim * 2 * b  # bfloat16 cache
    n = count_params(m)["n_params"]
    totals = []
    for ctx in (16, 48, 80):
        d = R.decode_roofline(cfg, H100, b, ctx)
        assert d["bytes"]["state_read"] == per_pos * ctx
        assert d["bytes"]["state_written"] == per_pos
        assert d["bytes"]["weights"] == n * 2
        assert (d["bytes_total"] - d["bytes"]["activations"]
                == 2 * m.n_layers * ctx * m.n_kv_heads * m.head_dim * 2 * b + n * 2 + per_pos)
        totals.append(d["bytes_total"])
    # affine in the context (activations grow with it too: the [B, H, 1, context+1] scores)
    assert totals[2] - totals[1] == pytest.approx(totals[1] - totals[0], rel=1e-12)
    assert totals[1] > totals[0]


def test_recurrent_state_bytes_independent_of_context():
    """Gated DeltaNet: conv tail [B, W-1, 3 H hd] (compute dtype) + state [B, H, hd, hd] float32
    per layer, read and written whole; Mamba-2: conv tails [B, W-1, E] and [B, W-1, 2N] + SSM state
    [B, H, N, P] float32."""
    b = 2
    m = fmodel(tiny("gated_deltanet.py"))
    h, hd, w = m.n_heads, m.head_dim, m.conv_width
    gdn = m.n_layers * b * ((w - 1) * 3 * h * hd * 2 + h * hd * hd * 4)
    m2 = fmodel(tiny("mamba2.py"))
    e = m2.expand * m2.d_model
    mamba = m2.n_layers * b * ((m2.conv_width - 1) * (e + 2 * m2.state_size) * 2
                               + (e // m2.head_dim) * m2.state_size * m2.head_dim * 4)
    for name, want in (("gated_deltanet.py", gdn), ("mamba2.py", mamba)):
        mc = fmodel(tiny(name))
        for ctx in (1, 16, 4096):
            st = R.decode_state_bytes(mc, b, ctx)
            assert st["state_read"] == st["state_written"] == st["constant_bytes"] == want, (name, ctx)
            assert st["growing_bytes_per_position"] == 0


def test_sliding_window_reads_min_window_context():
    m = fmodel(tiny("sliding_window.py"))
    b, w = 2, m.window_size
    per_pos = 2 * m.n_layers * m.n_kv_heads * m.head_dim * 2 * b
    for ctx in (w // 2, w, 4 * w):
        st = R.decode_state_bytes(m, b, ctx)
        assert st["state_read"] == per_pos * min(w, ctx)
        assert st["state_written"] == per_pos


def test_long_context_recurrent_moves_fewer_bytes_than_kv_cache():
    """The point of the table: at long context the KV cache dominates attention's decode bytes;
    the constant-state mixer moves far fewer bytes per token."""
    att = R.decode_roofline(tiny("transformer.py"), H100, 4, 8192)
    gdn = R.decode_roofline(tiny("gated_deltanet.py"), H100, 4, 8192)
    assert att["bytes"]["state_read"] > 10 * att["bytes"]["weights"]
    assert gdn["bytes_per_token"] * 10 < att["bytes_per_token"]
    assert att["bound"] == gdn["bound"] == "memory" and att["ceiling"] < 0.05


# ----------------------------------------------------------------------------- decode FLOPs


def test_attention_decode_flops_equal_full_square_row():
    """One new token attending to context + 1 keys is one row of the full square of length
    context + 1: the same formula as flops_per_token(..., attention="full")."""
    from efficient_arch.models.mixers.attention import Attention
    from efficient_arch.models.mixers.sliding_window import SlidingWindowAttention

    m = fmodel(tiny("transformer.py"))
    for ctx in (1, 7, 100):
        assert Attention.decode_flops_per_token(m, ctx) == Attention.flops_per_token(m, ctx + 1, attention="full")
    sw = fmodel(tiny("sliding_window.py"))
    w = sw.window_size
    assert (SlidingWindowAttention.decode_flops_per_token(sw, 10 * w)
            == SlidingWindowAttention.decode_flops_per_token(sw, w - 1)
            == Attention.decode_flops_per_token(sw, w - 1))


def test_recurrent_decode_flops_independent_of_context():
    m = fmodel(tiny("mamba2.py"))
    assert R.decode_flops_per_token(m, 4)["total"] == R.decode_flops_per_token(m, 40000)["total"]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_decode_flops_match_xla(name):
    """Analytic decode FLOPs vs XLA's cost analysis of one lowered ``LM.decode`` step (one layer
    group, so no scan to correct; cache of context + 1 slots). XLA adds elementwise work (norms,
    SiLU, RoPE, softmax, gates), +0.8-1.2% at the small sizes (measured on CPU, jax 0.10.2).
    MoE FFNs are compared as executed: capacity dispatch on a 1-token sequence runs all experts."""
    c = load_config(CONFIGS / name, "small")
    # one layer group (and the MoE dense prefix, if any): every layer scan has one trip
    c.model.n_layers = group_len(c.model) + (c.model.moe.first_k_dense if c.model.ffn == "moe" else 0)
    cfg = R._roofline_cfg(c, 2, 40)
    graphdef, state = R._abstract_model(cfg.model)
    cache = R._cache_shapes(graphdef, state, 2, 41)
    step = jax.jit(lambda s, t, ch: nnx.merge(graphdef, s).decode(t, ch, position=40))
    lowered = step.lower(state, jax.ShapeDtypeStruct((2, 1), jnp.int32), cache)
    xla = hardware.normalize_cost_analysis(lowered.cost_analysis())["flops"]
    ana = 2 * R.decode_flops_per_token(cfg.model, 40, executed=True)["total"]
    assert 1.0 <= xla / ana <= 1.03, (name, xla / ana)


# ----------------------------------------------------------------------------- train step


def test_train_bytes_terms():
    """Weights read twice (forward, backward) in param_dtype; gradients written + read by clip and
    AdamW; AdamW moments and parameters read + written; activations proportional to the batch."""
    cfg = tiny("transformer.py")
    m = fmodel(cfg)
    n = count_params(m)["n_params"]
    t2 = R.train_roofline(cfg, H100, 2, 32)
    t4 = R.train_roofline(cfg, H100, 4, 32)
    assert t2["bytes"]["weights"] == 2 * n * 4
    assert t2["bytes"]["gradients"] == 3 * n * 4
    assert t2["bytes"]["optimizer"] == 6 * n * 4
    assert t4["bytes"]["activations"] == pytest.approx(2 * t2["bytes"]["activations"], rel=1e-12)
    assert t2["flops"] == analytic_flops(R._roofline_cfg(cfg, 2, 32))["model_flops_per_step"]
    for t in (t2, t4):
        assert t["ceiling"] == min(1.0, t["flops"] / t["bytes_total"] / H100["ridge_flops_per_byte"])
        assert t["time_s"] == max(t["flops"] / H100["peak_flops_per_s"], t["bytes_total"] / H100["hbm_bytes_per_s"])
        assert t["tokens_per_s"] == pytest.approx(t["tokens_per_step"] / t["time_s"])
    remat = R.train_roofline(tiny("transformer.py", remat="full"), H100, 2, 32)
    assert remat["bytes"]["weights"] == 3 * n * 4


# ----------------------------------------------------------------------------- MoE


def test_moe_touched_experts_grow_with_the_batch():
    """A decode batch touches up to min(E, B top_k) experts per MoE layer: one token reads the
    active parameters, enough tokens read every expert."""
    cfg = tiny("transformer.py")
    cfg.model.ffn = "moe"
    m = fmodel(cfg)
    counts = count_params(m)
    e, k = m.moe.n_experts, m.moe.top_k
    assert counts["n_active_params"] < counts["n_params"]
    assert R.touched_params(m, counts, 1) == counts["n_active_params"]
    assert R.touched_params(m, counts, e) == counts["n_params"]
    mid = R.touched_params(m, counts, 2)
    assert mid == pytest.approx(counts["n_active_params"]
                                + (counts["n_params"] - counts["n_active_params"]) * (2 * k - k) / (e - k))
    d1 = R.decode_roofline(cfg, H100, 1, 16)
    assert d1["bytes"]["weights"] == counts["n_active_params"] * 2


# ----------------------------------------------------------------------------- CLI


def test_cli_roofline_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["roofline", f"--config={CONFIGS / 'gated_deltanet.py'}:tiny", "--config.model.dtype=bfloat16",
                   "--chip=h100", "--batch=2", "--context=64", f"--json={out}"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["chip"]["chip"] == "H100 SXM" and data["batch"] == 2 and data["context"] == 64
    for step in ("train", "decode"):
        s = data[step]
        assert s["ceiling"] == pytest.approx(min(1.0, s["intensity_flops_per_byte"] / data["chip"]["ridge_flops_per_byte"]))
    printed = capsys.readouterr().out
    assert "utilization ceiling" in printed and "decode step" in printed


def test_cli_roofline_all_configs(tmp_path, capsys):
    out = tmp_path / "all.json"
    rc = cli.main(["roofline", "--arch=all", "--size=tiny", "--chip=v5e", "--batch=1", "--context=256",
                   "--config.model.dtype=bfloat16",
                   "--notrain", f"--json={out}"])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == CONFIG_FILES
    assert all("train" not in r and r["decode"]["ceiling"] > 0 for r in rows)
    assert "transformer.py" in capsys.readouterr().out


def test_cli_roofline_unknown_chip_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["roofline", f"--config={CONFIGS / 'transformer.py'}:tiny", "--chip=mi300x"])
    assert e.value.code == 2
    assert "--hbm_bandwidth" in capsys.readouterr().err


def test_float32_roofline_uses_the_same_peak_as_mfu():
    """On an NVIDIA chip a float32 model's dots run as TF32 at jax's default precision: the
    roofline's peak (and ridge point) is the TF32 one, as MFU's (hardware.lookup_matmul_peak);
    with true float32 matmuls requested, the CUDA-core rate."""
    import jax

    from efficient_arch import hardware, roofline

    f = roofline.chip_figures("h200", "float32")
    assert f["peak_flops_per_s"] == hardware.PEAK_FLOPS["H200"]["tf32"] and "TF32" in f["peak_source"]
    assert f["peak_flops_per_s"] == hardware.lookup_matmul_peak("NVIDIA H200", "float32")[0]
    with jax.default_matmul_precision("highest"):
        assert roofline.chip_figures("h200", "float32")["peak_flops_per_s"] == hardware.PEAK_FLOPS["H200"]["float32"]
    assert roofline.chip_figures("h200", "bfloat16")["peak_flops_per_s"] == hardware.PEAK_FLOPS["H200"]["bfloat16"]
