"""The public MFU table recomputes published figures from stated inputs (REFERENCES.md)."""

import importlib.util

from conftest import REPO_ROOT

from efficient_arch.flops import palm_training_flops_per_token


def _table():
    spec = importlib.util.spec_from_file_location("public_mfu", REPO_ROOT / "experiments/tables/public_mfu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, {r["system"]: r for r in mod.build()}


def test_palm_table3_rows_within_0p1_points():
    _, rows = _table()
    for name in ("PaLM 540B (without attention)", "PaLM 540B (with attention)",
                 "Megatron-Turing NLG 530B (without attention)", "Megatron-Turing NLG 530B (with attention)"):
        r = rows[name]
        assert abs(r["recomputed MFU %"] - r["published MFU %"]) <= 0.1, r


def test_palm_attention_term_is_the_stated_formula():
    # 12 L H Q T for PaLM 540B: 12 * 118 * 48 * 256 * 2048
    with_attn = palm_training_flops_per_token(540.35e9, 118, 48, 256, 2048)
    without = palm_training_flops_per_token(540.35e9, 118, 48, 256, 2048, attention=False)
    assert without == 6 * 540.35e9
    assert with_attn - without == 12 * 118 * 48 * 256 * 2048


def test_unreproducible_rows_say_so(tmp_path):
    mod, rows = _table()
    assert rows["Gopher 280B"]["recomputed MFU %"] is None
    assert rows["Gopher 280B"]["verdict"].startswith("cannot recompute")
    assert rows["GPT-3 175B"]["verdict"].startswith("does not match")
    md, csv_path = mod.write(mod.build(), str(tmp_path))
    text = open(md).read()
    assert "| PaLM 540B (with attention) |" in text and open(csv_path).read().count("\n") == len(rows) + 1
