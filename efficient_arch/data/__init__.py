"""Data: byte tokenizer, token sources (stdlib / text / memmap), synthetic tasks (mqar / induction /
selective_copy, batches with a ``loss_mask``) and grain batch pipelines.

Typical use::

    source = load_source(cfg)                       # token streams + info dict
    it = make_train_iterator(cfg, source, process_index=p, process_count=P)
    batch = next(it)                                # {"inputs", "targets"}: int32[B/P, T]
    state = it.get_state(); it.set_state(state)     # JSON-serializable, for checkpoints
    evals = make_eval_batches(cfg, source, cfg.train.eval_batches)
"""

from efficient_arch.data import tokenizer
from efficient_arch.data.pipeline import (
    TrainIterator,
    gather_batch,
    make_eval_batches,
    make_train_iterator,
    n_windows,
    window,
)
from efficient_arch.data.sources import (
    SOURCES,
    Source,
    default_cache_dir,
    load_memmap,
    load_source,
    load_stdlib,
    load_text,
    register_source,
    split_is_val,
    stdlib_files,
    text_files,
)
from efficient_arch.data.tokenizer import BOS, EOS, PAD, VOCAB_NEEDED, decode, encode
from efficient_arch.data import synthetic  # registers the mqar / induction / selective_copy sources
from efficient_arch.data.synthetic import TaskIterator

__all__ = [
    "BOS", "EOS", "PAD", "VOCAB_NEEDED", "SOURCES", "Source", "TrainIterator", "decode",
    "default_cache_dir", "encode", "gather_batch", "load_memmap", "load_source", "load_stdlib",
    "load_text", "make_eval_batches", "make_train_iterator", "n_windows", "register_source",
    "split_is_val", "stdlib_files", "synthetic", "TaskIterator", "text_files", "tokenizer", "window",
]
