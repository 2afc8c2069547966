"""Generation: every mixer's ``prefill``, ``LM.prefill``, the decode loop, sampling and the
``efficient-arch generate`` command (efficient_arch/generate.py).

One model, ``every_mixer_moe``: a hybrid whose layer group holds every registered mixer once, the
last block with an MoE FFN, and an untied head. One set of compiled programs covers every mixer
(separate models per mixer, hybrid and MoE compiled 11 x 3 programs: ~100 s on 2 loaded cores).
Greedy prefill + cached decoding picks the argmax of the full forward pass over prompt +
generated tokens at every generated position (logits equal within float32 tolerance; the
prefill's logits too at every prompt position), and the caches the parallel prefill returns
equal, layer by layer (a failure names the mixer), those of stepping the prompt through
``LM.decode`` token by token. Shapes are tiny: prompts of 13 tokens span two chunks of 8 and wrap
the sliding window of 8.
"""

from __future__ import annotations

import json
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_arch import generate as gen
from efficient_arch.config import finalize
from efficient_arch.models import registry
from efficient_arch.models.lm import new_model

from conftest import make_tiny_config

MIXERS = registry.mixer_names()
SMALL = dict(model__chunk_size=8, model__window_size=8, model__state_size=16, model__feature_dim=8,
             model__n_kv_heads=2, model__seq_len=32)
# One hybrid holding every registered mixer once; its last block has an MoE FFN (moe_every = group
# length) and the LM head is untied. capacity_factor = E / k: capacity = T, nothing dropped, so a
# token's output does not depend on the other tokens of its sequence (with drops, the forward pass
# and 1-token decode steps differ by design: dropping is a property of the batch).
# The forward pass runs the recurrent training form (mixer_form="recurrent"; sliding-window and
# softmax attention their usual forms): an independent computation from the prefill, which always
# runs the chunked form, and from the decode steps; and half the compile time of the chunked form.
CASES = {"every_mixer_moe": dict(model__layer_pattern=tuple(MIXERS), model__n_layers=len(MIXERS), model__ffn="moe",
                                 model__moe__moe_every=len(MIXERS), model__moe__n_experts=4, model__moe__top_k=2,
                                 model__moe__capacity_factor=2.0, model__moe__d_ff_expert=64,
                                 model__tie_embeddings=False, model__mixer_form="recurrent")}
B, T, N = 2, 13, 6
TOL = 2e-4


def _model(**overrides):
    """A tiny LM (``SMALL`` + overrides) with parameters drawn by numpy (skips compiling the PRNG
    init); weights N(0, 0.05^2) so the logits are not all near-ties."""
    cfg = finalize(make_tiny_config(**{**SMALL, **overrides}))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: new_model(cfg.model, 0)))
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)

    def fill(path, s):
        key = jax.tree_util.keystr(path)
        if "A_log" in key:
            x = np.log(rng.uniform(1.0, 16.0, s.shape))
        elif "dt_bias" in key:
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), s.shape))
            x = dt + np.log(-np.expm1(-dt))
        elif "scale" in key or "'D'" in key or "norm" in key or key.endswith("'ba']"):
            x = np.ones(s.shape)
        elif "bias" in key:
            x = np.zeros(s.shape)
        elif "conv" in key:
            x = 0.3 * rng.standard_normal(s.shape)
        else:
            x = 0.05 * rng.standard_normal(s.shape)
        return jnp.asarray(x, s.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, params))
    return nnx.merge(graphdef, state)


def _prompt(seed=1):
    return np.random.default_rng(seed).integers(0, 256, (B, T)).astype(np.int32)


_RESULTS: dict = {}


def _results(case):
    """Everything both per-model tests check, computed once per model: greedy generation with its
    logits, the full forward pass over prompt + generated tokens, the caches right after the
    prefill, and the caches from stepping the prompt through ``LM.decode``."""
    if case in _RESULTS:
        return _RESULTS[case]
    model = _model(**CASES[case])
    prompt = _prompt()
    g = gen.generate_tokens(model, prompt, N, temperature=0.0, return_logits=True)
    # the prefill alone (same program: same max_len and flags), returning the cache after the prompt
    p = gen.generate_tokens(model, prompt, 1, temperature=0.0, return_logits=True, max_len=T + N)
    graphdef, state = nnx.split(model)

    @jax.jit
    def reference(state, full, prompt):
        m = nnx.merge(graphdef, state)
        logits, _ = m(full)

        def step(c, xt):
            tok, pos = xt
            return m.decode(tok[:, None], c, position=pos)[1], None

        cache, _ = jax.lax.scan(step, m.init_cache(B, T + N), (prompt.T, jnp.arange(T)))
        return logits, cache

    full = np.concatenate([prompt, g.tokens], axis=1)
    logits, stepped = reference(state, full, prompt)
    _RESULTS[case] = dict(gen=g, prefill_cache=p.cache, forward=np.asarray(logits), stepped=stepped, model=model)
    return _RESULTS[case]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_forward(case):
    r = _results(case)
    g, fwd = r["gen"], r["forward"][:, T - 1:T - 1 + N]  # logits that predict each generated token
    assert g.tokens.shape == (B, N) and g.logits.shape == fwd.shape
    np.testing.assert_allclose(g.logits, fwd, rtol=TOL, atol=TOL, err_msg=case)
    np.testing.assert_allclose(g.prompt_logits, r["forward"][:, :T], rtol=TOL, atol=TOL, err_msg=case)
    np.testing.assert_array_equal(g.tokens, np.argmax(g.logits, -1))  # greedy = argmax of its logits
    # the argmax of the forward pass, except where its top two are closer than the tolerance
    top2 = np.sort(fwd, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 10 * TOL
    assert clear.mean() > 0.5, case  # the comparison is not vacuous
    np.testing.assert_array_equal(g.tokens[clear], np.argmax(fwd, -1)[clear], err_msg=case)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_cache_equals_token_by_token(case):
    r = _results(case)
    pre, step = r["prefill_cache"], r["stepped"]
    assert jax.tree.structure(pre) == jax.tree.structure(step)
    kinds = {name: [type(b.mixer).__name__ for b in stack.blocks] for name, stack in r["model"]._stacks()}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(pre), jax.tree.leaves(step)):
        where = f"{case}: {kinds[path[0].key][path[1].idx]} {jax.tree_util.keystr(path)}"  # {stack: [block]}
        assert a.shape == b.shape and a.dtype == b.dtype, where
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=TOL, atol=TOL,
                                   err_msg=where)


def test_mixer_without_prefill_fails_loudly(monkeypatch):
    from efficient_arch.models.mixers.attention import Attention

    model = _model()
    monkeypatch.delattr(Attention, "prefill")
    with pytest.raises(AttributeError, match="Attention has no prefill"):
        model.prefill(jnp.zeros((1, 4), jnp.int32), model.init_cache(1, 8))


def test_prompt_longer_than_the_cache_is_an_error():
    model = _model()
    with pytest.raises(ValueError, match="prompt has 9 tokens but the KV cache holds 8"):
        model.prefill(jnp.zeros((1, 9), jnp.int32), model.init_cache(1, 8))
    model = _model(model__mixer="sliding_window")  # ring buffer of min(window 8, max_len 4) = 4 < window
    with pytest.raises(ValueError, match="cache holds 4 < window_size=8"):
        model.prefill(jnp.zeros((1, 6), jnp.int32), model.init_cache(1, 4))


# ------------------------------------------------------------------------------------ sampling

def test_top_p_keeps_the_minimal_nucleus():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = np.log(probs)
    # row 1: token 1 filtered before (-inf): renormalized 3 -> 0.5, 4 -> 0.25, 2 -> 0.167, 0 -> 0.083
    two = jnp.asarray(np.stack([logits, np.where(np.arange(5) == 1, -np.inf, logits)]), jnp.float32)
    top_p = jax.jit(gen.top_p_mask)  # p traced: one program
    for p, kept in [(0.35, {1}), (0.5, {1, 3}), (0.75, {1, 3, 4}), (0.9, {1, 3, 4, 2}), (0.97, set(range(5))),
                    (1.0, set(range(5)))]:
        mask = np.asarray(top_p(two, p))[0]
        assert set(np.flatnonzero(mask)) == kept, (p, mask)
    mask = np.asarray(top_p(two, 0.6))  # filtered entries never come back
    assert set(np.flatnonzero(mask[0])) == {1, 3} and set(np.flatnonzero(mask[1])) == {3, 4}


def test_top_k_mask_and_sampling_filters():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((64, 50)), jnp.float32)
    top_k = jax.jit(gen.top_k_mask)
    mask = np.asarray(top_k(logits, 5))
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    assert all(set(np.flatnonzero(m)) == set(t) for m, t in zip(mask, top5))
    assert np.asarray(top_k(logits, 0)).all()
    greedy = np.argmax(np.asarray(logits), -1)
    np.testing.assert_array_equal(np.asarray(gen.sample_logits(logits, None, temperature=0)), greedy)
    # the traced path the decode loop runs: one program for every setting
    sample = jax.jit(lambda x, key, t, k, p: gen.sample_logits(x, key, temperature=t, top_k=k, top_p=p))
    key = jax.random.key(3)
    np.testing.assert_array_equal(np.asarray(sample(logits, key, 0.0, 0, 1.0)), greedy)
    for temperature in (0.5, 1.0, 5.0):  # top_k = 1 is greedy at any temperature
        np.testing.assert_array_equal(np.asarray(sample(logits, key, temperature, 1, 1.0)), greedy)
    draws = [np.asarray(sample(logits, jax.random.key(i), 1.0, 5, 0.9)) for i in range(4)]
    nucleus = np.asarray(jax.jit(gen.top_p_mask)(jnp.where(mask, logits, -jnp.inf), 0.9)) & mask
    assert all(np.take_along_axis(nucleus, d[:, None], axis=1).all() for d in draws)  # top 5, then top-p
    assert len({tuple(d) for d in draws}) > 1  # and actually random


def test_sampling_seeds_and_top_k_one_in_generation():
    """Sampling settings are traced: these runs reuse the greedy programs of the model above."""
    r = _results("every_mixer_moe")
    model, prompt, greedy = r["model"], _prompt(), r["gen"].tokens
    kw = dict(return_logits=True)
    top1 = gen.generate_tokens(model, prompt, N, temperature=1.0, top_k=1, seed=5, **kw)
    np.testing.assert_array_equal(top1.tokens, greedy)
    assert top1.prefill_compile_s < 0.1 and top1.decode_compile_s < 0.1  # no new program
    a = gen.generate_tokens(model, prompt, N, temperature=1.5, top_p=0.95, seed=7, **kw)
    b = gen.generate_tokens(model, prompt, N, temperature=1.5, top_p=0.95, seed=7, **kw)
    c = gen.generate_tokens(model, prompt, N, temperature=1.5, top_p=0.95, seed=8, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens, greedy)


def test_generation_input_errors():
    model = _model()  # max_seq_len 32
    with pytest.raises(gen.GenerateError, match=r"--max_new_tokens=20: .*13 \+ 20 exceeds .*max_seq_len=32.*<=19"):
        gen.generate_tokens(model, _prompt(), 20)
    with pytest.raises(gen.GenerateError, match="--prompt is empty"):
        gen.generate_tokens(model, np.zeros((1, 0), np.int32), 4)
    with pytest.raises(gen.GenerateError, match="--max_new_tokens=0"):
        gen.generate_tokens(model, _prompt(), 0)
    with pytest.raises(gen.GenerateError, match="vocabulary"):
        gen.generate_tokens(model, np.full((1, 3), 999, np.int32), 2)
    for kw, flag in [({"temperature": -0.1}, "--temperature"), ({"temperature": float("nan")}, "--temperature"),
                     ({"top_p": 0.0}, "--top_p"), ({"top_p": 1.01}, "--top_p"), ({"top_k": -1}, "--top_k")]:
        with pytest.raises(gen.GenerateError, match=flag):
            gen.generate_tokens(model, _prompt(), 2, **kw)


def test_decode_traffic_counts_params_and_state():
    cfg = finalize(make_tiny_config(**SMALL))
    from efficient_arch.models.lm import count_params

    t = gen.decode_traffic(cfg.model, 1, 20)
    assert t["weights"] == 4 * count_params(cfg.model)["n_params"]  # float32, tied embeddings: all read
    # attention: the whole allocated KV cache is read; one position of k and v written per layer
    kv = cfg.model.n_layers * 2 * cfg.model.n_kv_heads * cfg.model.head_dim * 4
    assert t["state_read"] == 20 * kv and t["state_written"] == kv
    assert t["per_token"] == t["total"] == t["weights"] + t["state_read"] + t["state_written"]
    rec = gen.decode_traffic(finalize(make_tiny_config(**SMALL, model__mixer="gla")).model, 2, 20)
    assert rec["state_read"] == rec["state_written"]  # constant-size state: read and written whole


# ---------------------------------------------------------------------------------------- CLI

WORDS = "alpha beta gamma delta import return value state print class".split()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny attention run trained 8 steps of the shared train step on text, with checkpoints at
    steps 4 and 8 written by the run's ``Checkpointer`` (the layout of ``efficient-arch train``:
    state, data-iterator state, finalized config). Built from ``train.build`` rather than
    ``run_training``, which also compiles the PRNG init, the eval step and the FLOP audit
    (~20 s more on a cold compilation cache)."""
    from efficient_arch import parallel, train
    from efficient_arch.checkpoint import Checkpointer
    from efficient_arch.data import tokenizer

    from conftest import numpy_init_state

    rng = random.Random(5)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(400))
    ids = tokenizer.encode(text).astype(np.int32)
    cfg = finalize(make_tiny_config(train__steps=8, train__batch_size=4, train__lr=1e-2, train__warmup_steps=0), 1)
    workdir = tmp_path_factory.mktemp("gen_run") / "run"
    mesh = parallel.make_mesh(cfg, devices=jax.devices()[:1])
    t, b = cfg.model.seq_len, cfg.train.batch_size
    with jax.set_mesh(mesh), Checkpointer(workdir, keep=5, save_every=4) as ckpt:
        run = train.build(cfg, mesh)
        state = numpy_init_state(run)
        for step in range(1, 9):
            starts = np.random.default_rng(step).integers(0, len(ids) - t - 1, b)
            rows = np.stack([ids[s:s + t + 1] for s in starts])
            batch = parallel.global_batch({"inputs": rows[:, :-1], "targets": rows[:, 1:]}, mesh, b)
            state, metrics = run.train_step(state, batch)
            ckpt.save(step, state, {"step": step}, cfg.to_dict())
    assert np.isfinite(float(metrics["loss"]))
    return workdir


def _cli(argv, capsys):
    from efficient_arch.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_generate_end_to_end(trained_run, tmp_path, capsys):
    out_json = tmp_path / "g.json"
    argv = ["generate", f"--workdir={trained_run}", "--prompt=alpha be", "--max_new_tokens=7",
            "--temperature=0.8", "--top_k=20", "--top_p=0.9", "--seed=3", f"--json={out_json}"]
    rc, out, err = _cli(argv, capsys)
    assert rc == 0, err
    r = json.loads(out_json.read_text())
    assert r["step"] == 8 and r["prompt_tokens"] == 8 and r["new_tokens"] == 7 and len(r["tokens"]) == 7
    assert r["text"].startswith("alpha be") and r["text"] in out
    for row in ("prefill tokens/s", "decode tokens/s", "bytes / decoded token", "bandwidth utilization"):
        assert row in out, row
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["decode_steps"] == 6
    assert r["bytes"]["per_token"] > r["bytes"]["weights"] > 0
    assert r["quant"] == "none" and r["precision"] == "params float32, compute float32"
    if jax.devices()[0].platform == "cpu":
        assert r["bandwidth_utilization"] is None and "none known for a CPU" in r["bandwidth_source"]
    # same seed, same text; --hbm_bandwidth gives a utilization; --step picks an older checkpoint
    rc, _, err = _cli(argv[:-1] + [f"--json={tmp_path / 'h.json'}", "--hbm_bandwidth=1e11", "--step=4"], capsys)
    assert rc == 0, err
    r4 = json.loads((tmp_path / "h.json").read_text())
    assert r4["step"] == 4 and r4["bandwidth_bytes_per_s"] == 1e11
    assert r4["bandwidth_utilization"] == pytest.approx(r4["implied_bytes_per_s"] / 1e11)
    rc, _, _ = _cli(argv[:-1] + [f"--json={tmp_path / 'i.json'}"], capsys)
    assert json.loads((tmp_path / "i.json").read_text())["tokens"] == r["tokens"]


@pytest.mark.parametrize("args,message", [
    (["--prompt=x"], "--workdir is required"),
    (["--workdir={missing}", "--prompt=x"], "does not exist"),
    (["--workdir={empty}", "--prompt=x"], "has no committed checkpoint"),
    (["--workdir={run}"], "--prompt is empty"),
    (["--workdir={run}", "--prompt="], "--prompt is empty"),
    (["--workdir={run}", "--prompt=x", "--temperature=-1"], "--temperature=-1.0: must be a finite number >= 0"),
    (["--workdir={run}", "--prompt=x", "--top_p=0"], r"--top_p=0.0: must lie in \(0, 1\]"),
    (["--workdir={run}", "--prompt=x", "--top_p=2"], r"--top_p=2.0: must lie in \(0, 1\]"),
    (["--workdir={run}", "--prompt=x", "--top_k=-3"], "--top_k=-3"),
    (["--workdir={run}", "--prompt=x", "--max_new_tokens=0"], "--max_new_tokens=0: must be an integer >= 1"),
    (["--workdir={run}", "--prompt=x", "--max_new_tokens=500"], r"--max_new_tokens=500: .*max_seq_len=16"),
    (["--workdir={run}", "--prompt=x", "--step=3"], r"--step=3: .*committed steps: \[4, 8\]"),
    (["--workdir={run}", "--prompt=x", "--temperature=hot"], "argument --temperature: invalid float value"),
])
def test_cli_generate_bad_input(args, message, trained_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    subs = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "run": trained_run}
    rc, out, err = _cli(["generate"] + [a.format(**subs) for a in args], capsys)
    assert rc == 2, (out, err)
    assert "Traceback" not in err, err
    assert re.search(message, err.strip().splitlines()[-1]), err  # the last line says what is wrong
