"""Tests for efficient_arch.data: tokenizer, sources, splits, caching, grain pipelines."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from efficient_arch.config import default_config
from efficient_arch.data import (
    EOS,
    VOCAB_NEEDED,
    decode,
    encode,
    load_source,
    make_eval_batches,
    make_train_iterator,
    n_windows,
    split_is_val,
    stdlib_files,
    text_files,
    window,
)


def make_cfg(cache_dir, **overrides):
    """default_config() with data.cache_dir set and dotted overrides, e.g. model__seq_len=8."""
    cfg = default_config()
    cfg.data.cache_dir = str(cache_dir)
    for k, v in overrides.items():
        section, field = k.split("__")
        cfg[section][field] = v
    return cfg


def split_docs(stream):
    """Decode a byte stream into its EOS-terminated documents."""
    ids = np.asarray(stream).astype(np.int64)
    ends = np.flatnonzero(ids == EOS)
    docs, start = [], 0
    for e in ends:
        docs.append(decode(ids[start:e]))
        start = e + 1
    assert start == len(ids), "stream must end with EOS"
    return docs


@pytest.fixture(scope="session")
def stdlib_source(tmp_path_factory):
    cache = tmp_path_factory.mktemp("stdlib_cache")
    cfg = make_cfg(cache)
    return cfg, load_source(cfg)


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(40):
        (d / ("sub" if i % 3 else "") / f"doc{i:02d}.txt").write_text(f"document number {i}\n" + "héllo wörld " * (i + 5))
    return d


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip():
    s = "hello, wörld — ✓ 漢字\n"
    ids = encode(s)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert len(ids) == len(s.encode("utf-8"))
    assert decode(ids) == s
    assert decode(np.concatenate([[257], ids, [EOS, 258]])) == s  # specials skipped
    assert np.array_equal(encode(s.encode("utf-8")), ids)
    assert decode(encode(b"\xff")) == "\ufffd"  # errors="replace"
    assert VOCAB_NEEDED == 259 and EOS == 256


# ----------------------------------------------------------------------------- stdlib


def test_stdlib_files_deterministic():
    a, b = stdlib_files(), stdlib_files()
    assert a == b and len(a) > 100
    rels = [r for r, _ in a]
    assert rels == sorted(rels)
    assert all(r.endswith(".py") and "site-packages" not in r and "dist-packages" not in r for r in rels)


def test_stdlib_source_cached_and_stable(stdlib_source):
    cfg, src = stdlib_source
    info = src.info
    assert info["n_files"] == len(stdlib_files())
    assert info["n_train_tokens"] + info["n_val_tokens"] == info["n_bytes"] + info["n_files"]
    assert info["n_train_docs"] > 0 and info["n_val_docs"] > 0
    assert len(info["fingerprint"]) == 16 and info["python_version"]
    assert isinstance(src.train_tokens, np.memmap) and src.train_tokens.dtype == np.uint16
    assert src.train_tokens[-1] == EOS and src.val_tokens[-1] == EOS
    json.dumps(info)
    mtime = os.path.getmtime(info["cache_files"]["train"])
    again = load_source(cfg)  # second call: same fingerprint, cache reused (not rewritten)
    assert again.info["fingerprint"] == info["fingerprint"]
    assert os.path.getmtime(again.info["cache_files"]["train"]) == mtime
    assert np.array_equal(again.val_tokens, src.val_tokens)


def test_stdlib_split_disjoint_and_deterministic(stdlib_source):
    _, src = stdlib_source
    rels = [r for r, _ in stdlib_files()]
    is_val = split_is_val(rels, 0.05)
    assert np.array_equal(is_val, split_is_val(rels, 0.05))
    assert np.array_equal(split_is_val(rels[::-1], 0.05), is_val[::-1])  # independent of order
    assert src.info["n_val_docs"] == is_val.sum() and src.info["n_train_docs"] == (~is_val).sum()
    assert 0.01 < is_val.mean() < 0.1


def test_vocab_too_small_for_bytes(tmp_path):
    cfg = make_cfg(tmp_path, model__vocab_size=256)
    with pytest.raises(ValueError, match="model.vocab_size"):
        load_source(cfg)


# ----------------------------------------------------------------------------- text


def test_text_source_directory_split(text_dir, tmp_path):
    cfg = make_cfg(tmp_path / "cache", data__source="text", data__path=str(text_dir), data__val_fraction=0.2)
    src = load_source(cfg)
    train_docs, val_docs = split_docs(src.train_tokens), split_docs(src.val_tokens)
    expected = {p.read_text() for p in text_dir.rglob("*.txt")}
    assert train_docs and val_docs
    assert not set(train_docs) & set(val_docs)  # no document in both splits
    assert set(train_docs) | set(val_docs) == expected and len(train_docs) + len(val_docs) == 40
    assert src.info["n_files"] == 40 and src.info["source"] == "text"
    # deterministic: a fresh cache gives identical streams
    src2 = load_source(make_cfg(tmp_path / "cache2", data__source="text", data__path=str(text_dir),
                                data__val_fraction=0.2))
    assert np.array_equal(src2.train_tokens, src.train_tokens)
    assert src2.info["fingerprint"] == src.info["fingerprint"]
    # glob and single file
    g = load_source(make_cfg(tmp_path / "cache", data__source="text", data__path=str(text_dir / "**" / "*.txt")))
    assert g.info["n_files"] == 40
    one = load_source(make_cfg(tmp_path / "cache", data__source="text", data__path=str(text_dir / "doc00.txt")))
    assert len(one.val_tokens) > 0 and len(one.train_tokens) > 0  # single document split at its tail
    assert decode(np.concatenate([one.train_tokens, one.val_tokens])) == (text_dir / "doc00.txt").read_text()


def test_text_val_never_empty(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    (d / "a.txt").write_text("aaaa")
    (d / "b.txt").write_text("bbbb")
    src = load_source(make_cfg(tmp_path / "c", data__source="text", data__path=str(d), data__val_fraction=1e-9))
    assert split_docs(src.val_tokens) == ["bbbb"] and split_docs(src.train_tokens) == ["aaaa"]


def test_text_binary_file_error(text_dir, tmp_path):
    (text_dir / "sub" / "blob.bin").write_bytes(b"abc\x00\x01\x02")
    cfg = make_cfg(tmp_path / "c", data__source="text", data__path=str(text_dir))
    with pytest.raises(ValueError, match=r"blob\.bin.*exclude"):
        load_source(cfg)
    (text_dir / "sub" / "blob.bin").write_bytes(b"caf\xe9")  # latin-1, no NUL
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_source(cfg)


def test_text_missing_path_error(tmp_path):
    for path in (None, str(tmp_path / "nope"), str(tmp_path / "*.none")):
        with pytest.raises(ValueError, match="data.path"):
            load_source(make_cfg(tmp_path, data__source="text", data__path=path))
    with pytest.raises(ValueError, match="data.path"):
        text_files("")


# ----------------------------------------------------------------------------- memmap


@pytest.mark.parametrize("fmt", ["bin", "npy"])
@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_memmap_single_file(tmp_path, fmt, dtype):
    toks = (np.arange(1000) * 7 % 300).astype(dtype)
    path = tmp_path / f"tokens.{fmt}"
    if fmt == "bin":
        toks.tofile(path)
    else:
        np.save(path, toks)
    cfg = make_cfg(tmp_path, data__source="memmap", data__path=str(path), data__memmap_dtype=dtype,
                   data__val_fraction=0.1, model__vocab_size=300)
    src = load_source(cfg)
    assert src.train_tokens.dtype == np.dtype(dtype)
    assert len(src.val_tokens) == 100 and len(src.train_tokens) == 900
    assert np.array_equal(np.concatenate([src.train_tokens, src.val_tokens]), toks)  # contiguous, no overlap
    assert src.info["max_id"] == 299 and src.info["n_files"] == 1
    json.dumps(src.info)


def test_memmap_train_val_dir(tmp_path):
    tr, va = np.arange(500, dtype=np.uint16) % 50, np.arange(60, dtype=np.uint16) % 50
    tr.tofile(tmp_path / "train.bin")
    va.tofile(tmp_path / "val.bin")
    src = load_source(make_cfg(tmp_path, data__source="memmap", data__path=str(tmp_path)))
    assert np.array_equal(src.train_tokens, tr) and np.array_equal(src.val_tokens, va)
    assert src.info["layout"] == "train_val_files"
    (tmp_path / "val.bin").unlink()
    with pytest.raises(ValueError, match="val.bin"):
        load_source(make_cfg(tmp_path, data__source="memmap", data__path=str(tmp_path)))


def test_memmap_id_out_of_vocab(tmp_path):
    toks = np.zeros(100, dtype=np.uint32)
    toks[37] = 70000
    toks.tofile(tmp_path / "t.bin")
    cfg = make_cfg(tmp_path, data__source="memmap", data__path=str(tmp_path / "t.bin"), data__memmap_dtype="uint32")
    with pytest.raises(ValueError, match=r"70000.*model.vocab_size|model.vocab_size.*70000"):
        load_source(cfg)
    with pytest.raises(ValueError, match="data.path"):
        load_source(make_cfg(tmp_path, data__source="memmap", data__path=str(tmp_path / "missing.bin")))


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture
def small_memmap(tmp_path):
    toks = np.random.default_rng(0).integers(0, 264, size=5000).astype(np.uint16)
    toks.tofile(tmp_path / "t.bin")
    cfg = make_cfg(tmp_path, data__source="memmap", data__path=str(tmp_path / "t.bin"), data__val_fraction=0.1,
                   model__seq_len=16, train__batch_size=8, train__seed=3)
    return cfg, load_source(cfg)


def test_windows_and_targets_shift(small_memmap):
    cfg, src = small_memmap
    T, stream = cfg.model.seq_len, np.asarray(src.train_tokens)
    assert n_windows(stream, T) == (len(stream) - 1) // T
    it = make_train_iterator(cfg, src)
    seen = set()
    for _ in range(3):
        b = next(it)
        assert b["inputs"].shape == b["targets"].shape == (8, T)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        assert np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        for x, y in zip(b["inputs"], b["targets"]):
            (i,) = np.flatnonzero([np.array_equal(window(stream, j, T)[:-1], x) for j in range(n_windows(stream, T))])
            assert np.array_equal(stream[i * T:i * T + T + 1], np.concatenate([x, y[-1:]]))
            seen.add(i)
    assert len(seen) == 24  # shuffled without replacement within the epoch


def test_train_iterator_epochs_cover_all_windows(tmp_path):
    toks = np.arange(1, 42, dtype=np.uint16)  # 41 tokens -> 10 windows of T=4
    (tmp_path / "train.bin").write_bytes(toks.tobytes())
    (tmp_path / "val.bin").write_bytes(toks.tobytes())
    cfg = make_cfg(tmp_path, data__source="memmap", data__path=str(tmp_path), model__seq_len=4, train__batch_size=5)
    it = make_train_iterator(cfg, load_source(cfg))
    firsts = [(next(it)["inputs"][:, 0] - 1) // 4 for _ in range(4)]  # window index of each row
    e1, e2 = np.concatenate(firsts[:2]), np.concatenate(firsts[2:])
    assert sorted(e1) == list(range(10)) == sorted(e2)
    assert not np.array_equal(e1, e2)  # reshuffled each epoch


def test_iterator_state_round_trip(small_memmap):
    cfg, src = small_memmap
    it = make_train_iterator(cfg, src)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    it2 = make_train_iterator(cfg, src)
    it2.set_state(state)
    for e in expected:
        got = next(it2)
        assert np.array_equal(got["inputs"], e["inputs"]) and np.array_equal(got["targets"], e["targets"])
    cfg.train.seed = 4
    with pytest.raises(ValueError, match="seed"):
        make_train_iterator(cfg, src).set_state(state)


def test_process_sharding_matches_global(small_memmap):
    cfg, src = small_memmap
    glob_it = make_train_iterator(cfg, src)
    shards = [make_train_iterator(cfg, src, process_index=p, process_count=2) for p in range(2)]
    for _ in range(4):
        g = next(glob_it)
        parts = [next(s) for s in shards]
        assert parts[0]["inputs"].shape == (4, 16)
        for k in ("inputs", "targets"):
            assert np.array_equal(np.concatenate([p[k] for p in parts]), g[k])
    # a state saved with 2 processes restores under 1
    state = shards[0].get_state()
    one = make_train_iterator(cfg, src)
    one.set_state(state)
    assert np.array_equal(next(one)["inputs"], next(glob_it)["inputs"])
    with pytest.raises(ValueError, match="batch_size"):
        make_train_iterator(cfg, src, process_index=0, process_count=3)


def test_eval_batches_deterministic(small_memmap):
    cfg, src = small_memmap
    T = cfg.model.seq_len
    a = make_eval_batches(cfg, src, 6)  # 499 val tokens -> 31 windows < 6*8: wraps around
    b = make_eval_batches(cfg, src, 6)
    assert len(a) == 6
    val = np.asarray(src.val_tokens)
    nw = n_windows(val, T)
    for k, (x, y) in enumerate(zip(a, b)):
        assert np.array_equal(x["inputs"], y["inputs"]) and x["inputs"].shape == (8, T)
        for r in range(8):
            w = window(val, (k * 8 + r) % nw, T)
            assert np.array_equal(x["inputs"][r], w[:-1]) and np.array_equal(x["targets"][r], w[1:])
    halves = [make_eval_batches(cfg, src, 2, process_index=p, process_count=2) for p in range(2)]
    assert np.array_equal(np.concatenate([h[1]["targets"] for h in halves]), a[1]["targets"])
    assert len(make_eval_batches(cfg, src)) == cfg.train.eval_batches
    cfg.model.seq_len = 600
    with pytest.raises(ValueError, match=r"model.seq_len.*data.val_fraction"):
        make_eval_batches(cfg, src, 1)


def test_stdlib_pipeline_smoke(stdlib_source):
    cfg, src = stdlib_source
    b = next(make_train_iterator(cfg, src))
    assert b["inputs"].shape == (cfg.train.batch_size, cfg.model.seq_len)
    assert b["inputs"].max() < cfg.model.vocab_size
