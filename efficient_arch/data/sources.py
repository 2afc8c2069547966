"""Token sources: each turns ``cfg.data`` into one 1-D token stream per split.

A source returns a :class:`Source` holding ``train_tokens`` and ``val_tokens`` (1-D unsigned-int
arrays, ``np.memmap`` where they come from disk) and an ``info`` dict (JSON-serializable) that a run
records. Sources are looked up by ``cfg.data.source`` in :data:`SOURCES`; a new source (e.g. the
synthetic MQAR / induction-heads / selective-copy tasks) is one function decorated with
:func:`register_source`.

Byte-level sources (``stdlib``, ``text``) treat every file as one document: its bytes followed by
``EOS`` (see :mod:`efficient_arch.data.tokenizer`). Documents are assigned to train or validation
by a hash of their relative path, so the split is deterministic, independent of file order and
never puts a document in both splits. The tokenized streams are cached as ``uint16`` ``.bin`` files
in ``data.cache_dir`` keyed by a content fingerprint and ``val_fraction``.

``memmap`` reads pre-tokenized token files in the nanoGPT layout (raw ``.bin`` or ``.npy``).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import sysconfig
import uuid
from typing import Callable

import numpy as np

from efficient_arch.data import tokenizer

CACHE_FORMAT = "v1"
MEMMAP_DTYPES = ("uint16", "uint32")
_MAX_CHUNK = 1 << 24  # elements per chunk for range checks over big memmaps
_FINGERPRINT_SAMPLE = 1 << 20  # bytes hashed at each end of a memmap file


@dataclasses.dataclass(frozen=True)
class Source:
    """Token streams of one data source.

    Attributes:
      name: the source name (``cfg.data.source``).
      train_tokens: ``uint16`` or ``uint32`` array of shape ``[n_train_tokens]`` (often an
        ``np.memmap``, read-only).
      val_tokens: same dtype, shape ``[n_val_tokens]``. The two splits share no document / token.
      info: JSON-serializable dict; always has ``source``, ``path``, ``n_train_tokens``,
        ``n_val_tokens``, ``fingerprint``; byte sources add ``n_files``, ``n_bytes``,
        ``n_train_docs``, ``n_val_docs`` and ``cache_files``.
      task: for the synthetic tasks (``mqar``, ``induction``, ``selective_copy``) the
        :class:`efficient_arch.data.synthetic.Task` that generates the examples (the token streams
        are then empty and the pipeline draws batches from the task); None for token streams.
    """

    name: str
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    info: dict
    task: object = None

    def split(self, name: str) -> np.ndarray:
        """Return the token stream of split ``"train"`` or ``"val"``; ValueError otherwise."""
        if name == "train":
            return self.train_tokens
        if name in ("val", "validation"):
            return self.val_tokens
        raise ValueError(f"unknown split {name!r}; use 'train' or 'val'")


SOURCES: dict[str, Callable] = {}


def register_source(name: str):
    """Decorator registering ``fn(cfg) -> Source`` under ``name`` (the ``cfg.data.source`` value)."""

    def deco(fn):
        SOURCES[name] = fn
        return fn

    return deco


def load_source(cfg) -> Source:
    """Build the token streams described by ``cfg.data`` (dispatching on ``cfg.data.source``).

    Args:
      cfg: the run config (``ml_collections.ConfigDict``); reads ``cfg.data.*`` and
        ``cfg.model.vocab_size``.

    Returns:
      A :class:`Source`.

    Raises:
      ValueError: unknown ``data.source``; or any error of the chosen source (bad path, binary
        file in a text corpus, token ids >= ``model.vocab_size``, ...), naming the config field.
    """
    name = cfg.data.source
    if name not in SOURCES:
        raise ValueError(f"config.data.source={name!r}: unknown data source; choose one of {sorted(SOURCES)}")
    return SOURCES[name](cfg)


# ----------------------------------------------------------------------------- helpers


def default_cache_dir() -> str:
    """The cache directory used when ``data.cache_dir`` is None: ``~/.cache/efficient_arch/data``."""
    return os.path.join(os.path.expanduser("~"), ".cache", "efficient_arch", "data")


def _cache_dir(cfg) -> str:
    d = cfg.data.cache_dir
    return os.path.abspath(os.path.expanduser(d)) if d else default_cache_dir()


def _check_val_fraction(cfg) -> float:
    vf = cfg.data.val_fraction
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 1:
        raise ValueError(f"config.data.val_fraction={vf!r}: must lie strictly between 0 and 1")
    return float(vf)


def _check_byte_vocab(cfg) -> None:
    v = cfg.model.vocab_size
    if v < tokenizer.VOCAB_NEEDED:
        raise ValueError(
            f"config.model.vocab_size={v}: the byte-level data source {cfg.data.source!r} needs at least "
            f"{tokenizer.VOCAB_NEEDED} ids (256 bytes + EOS/BOS/PAD); set model.vocab_size >= "
            f"{tokenizer.VOCAB_NEEDED} (e.g. 264)")


def split_is_val(relpaths: list[str], val_fraction: float) -> np.ndarray:
    """Assign documents to splits by hashing their relative paths.

    Document ``i`` goes to validation iff ``sha256(relpaths[i])`` read as a uniform number in
    ``[0, 1)`` is below ``val_fraction``. Deterministic and independent of list order. No fix-ups
    for empty splits are applied here (see :func:`_balanced_split`).

    Returns:
      ``bool[len(relpaths)]``, True = validation.
    """
    out = np.zeros(len(relpaths), dtype=bool)
    for i, rel in enumerate(relpaths):
        h = hashlib.sha256(rel.encode("utf-8", errors="surrogateescape")).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2.0**64 < val_fraction
    return out


def _balanced_split(relpaths: list[str], val_fraction: float) -> np.ndarray:
    """split_is_val, then guarantee both splits non-empty (needs >= 2 documents)."""
    is_val = split_is_val(relpaths, val_fraction)
    if not is_val.any():
        is_val[-1] = True  # move the last document (sorted order) to validation
    if is_val.all():
        is_val[0] = False
    return is_val


def fingerprint_of(entries: list[tuple[str, str]]) -> str:
    """sha256 over the sorted ``(relpath, content sha256 hex)`` pairs; first 16 hex chars."""
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(rel.encode("utf-8", errors="surrogateescape"))
        h.update(b"\0")
        h.update(digest.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _open_tokens(path: str, dtype) -> np.ndarray:
    """Read-only memmap of a raw token file (an empty file gives an empty in-memory array)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# ----------------------------------------------------------------------------- byte sources


def stdlib_files() -> list[tuple[str, str]]:
    """The ``.py`` files of the running interpreter's standard library.

    Walks ``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages`` / ``dist-packages``
    directories and anything under the active virtual environment (``sys.prefix`` when it differs
    from ``sys.base_prefix``).

    Returns:
      ``[(relpath, abspath), ...]`` sorted by relpath (``/``-separated, relative to the stdlib root).
    """
    root = os.path.realpath(sysconfig.get_paths()["stdlib"])
    venv = os.path.realpath(sys.prefix) if sys.prefix != sys.base_prefix else None
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages")]
        if venv is not None and (os.path.realpath(d) + os.sep).startswith(venv + os.sep):
            dirs[:] = []
            continue
        for fn in files:
            if not fn.endswith(".py"):
                continue
            full = os.path.join(d, fn)
            if not os.path.isfile(full):
                continue
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            out.append((rel, full))
    out.sort()
    return out


def text_files(path: str | None) -> list[tuple[str, str]]:
    """Resolve ``data.path`` of the ``text`` source to a sorted file list.

    ``path`` may be a file, a directory (all regular files below it, recursively; hidden files and
    directories, i.e. names starting with ``.``, are skipped) or a glob (``**`` allowed).

    Returns:
      ``[(relpath, abspath), ...]`` sorted by relpath. Relpaths are relative to the directory, to the
      file's parent, or to the common parent directory of the glob's matches.

    Raises:
      ValueError: naming ``data.path`` if it is unset, does not exist, or matches no file.
    """
    if not path:
        raise ValueError("config.data.path is not set: data.source='text' needs a file, directory or glob "
                         "of UTF-8 text files (e.g. --config.data.path=/data/corpus/**/*.txt)")
    p = os.path.expanduser(path)
    if os.path.isfile(p):
        full = os.path.abspath(p)
        files, root = [full], os.path.dirname(full)
    elif os.path.isdir(p):
        root = os.path.abspath(p)
        files = []
        for d, dirs, fns in os.walk(root):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            for fn in fns:
                full = os.path.join(d, fn)
                if not fn.startswith(".") and os.path.isfile(full):
                    files.append(full)
    elif glob.has_magic(p):
        files = [os.path.abspath(f) for f in glob.glob(p, recursive=True) if os.path.isfile(f)]
        root = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""
    else:
        raise ValueError(f"config.data.path={path!r} does not exist (expected a text file, a directory "
                         "or a glob); fix data.path")
    if not files:
        raise ValueError(f"config.data.path={path!r} matches no files; fix data.path")
    out = sorted((os.path.relpath(f, root).replace(os.sep, "/"), f) for f in files)
    return out


def _check_text(data: bytes, path: str, cfg_path: str) -> None:
    reason = None
    if b"\0" in data:
        reason = "it contains NUL bytes (binary file)"
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            reason = f"it is not valid UTF-8 ({e.reason} at byte {e.start})"
    if reason:
        raise ValueError(
            f"config.data.path={cfg_path!r}: file {path!r} is not a UTF-8 text file: {reason}. The 'text' "
            "source reads text only; exclude the file by narrowing data.path to a glob that skips it "
            "(e.g. '<dir>/**/*.txt') or by moving it out of the directory. Pre-tokenized token files "
            "belong to data.source='memmap'.")


def _byte_source(cfg, name: str, cfg_path: str | None, files: list[tuple[str, str]], check_text: bool,
                 extra_info: dict) -> Source:
    """Tokenize ``files`` (one document each) into cached train/val uint16 streams."""
    _check_byte_vocab(cfg)
    vf = _check_val_fraction(cfg)

    # Pass 1: content hashes (fingerprint) and, for user text, the UTF-8 check.
    entries, sizes = [], []
    for rel, full in files:
        data = _read(full)
        if check_text:
            _check_text(data, full, cfg_path)
        entries.append((rel, hashlib.sha256(data).hexdigest()))
        sizes.append(len(data))
    fp = fingerprint_of(entries)
    n_bytes = int(sum(sizes))
    if len(files) == 1 and sizes[0] == 0:
        raise ValueError(f"config.data.path={cfg_path!r}: the only file {files[0][1]!r} is empty; fix data.path")

    cache_dir = _cache_dir(cfg)
    key = f"{name}-{CACHE_FORMAT}-{fp}-vf{vf!r}"
    paths = {s: os.path.join(cache_dir, f"{key}.{s}.bin") for s in ("train", "val")}
    meta_path = os.path.join(cache_dir, f"{key}.json")

    meta = None
    if os.path.exists(meta_path) and all(os.path.exists(p) for p in paths.values()):
        with open(meta_path) as f:
            meta = json.load(f)
        itemsize = np.dtype(tokenizer.TOKEN_DTYPE).itemsize
        if (os.path.getsize(paths["train"]) != meta["n_train_tokens"] * itemsize
                or os.path.getsize(paths["val"]) != meta["n_val_tokens"] * itemsize):
            meta = None  # truncated / foreign files: rebuild
    if meta is None:
        meta = _write_byte_cache(files, entries, sizes, vf, paths, cfg_path)
        meta.update(fingerprint=fp, val_fraction=vf, n_files=len(files), n_bytes=n_bytes)
        os.makedirs(cache_dir, exist_ok=True)
        _atomic_write_json(meta_path, meta)

    info = {
        "source": name,
        "path": cfg_path,
        "fingerprint": fp,
        "n_files": len(files),
        "n_bytes": n_bytes,
        "n_train_tokens": meta["n_train_tokens"],
        "n_val_tokens": meta["n_val_tokens"],
        "n_train_docs": meta["n_train_docs"],
        "n_val_docs": meta["n_val_docs"],
        "val_fraction": vf,
        "tokenizer": "bytes",
        "cache_files": dict(paths),
    }
    info.update(extra_info)
    train = _open_tokens(paths["train"], tokenizer.TOKEN_DTYPE)
    val = _open_tokens(paths["val"], tokenizer.TOKEN_DTYPE)
    return Source(name=name, train_tokens=train, val_tokens=val, info=info)


def _write_byte_cache(files, entries, sizes, vf, paths, cfg_path) -> dict:
    """Pass 2: stream documents into tmp files, then os.replace them into place."""
    os.makedirs(os.path.dirname(paths["train"]), exist_ok=True)
    suffix = f".tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmps = {s: p + suffix for s, p in paths.items()}
    eos = np.array([tokenizer.EOS], dtype=tokenizer.TOKEN_DTYPE).tobytes()
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    single = len(files) == 1
    is_val = None if single else _balanced_split([r for r, _ in files], vf)
    handles = {s: open(t, "wb") for s, t in tmps.items()}
    try:
        for i, (rel, full) in enumerate(files):
            data = _read(full)
            if hashlib.sha256(data).hexdigest() != entries[i][1]:
                raise RuntimeError(f"file {full!r} changed while the data cache was being built; retry")
            toks = tokenizer.encode(data).tobytes() + eos
            if single:
                n = sizes[0] + 1
                n_val = min(max(int(round(n * vf)), 1), n - 1)
                cut = (n - n_val) * np.dtype(tokenizer.TOKEN_DTYPE).itemsize
                handles["train"].write(toks[:cut])
                handles["val"].write(toks[cut:])
                counts["train"], counts["val"] = n - n_val, n_val
                docs["train"], docs["val"] = 1, 1  # one document split at its tail
            else:
                s = "val" if is_val[i] else "train"
                handles[s].write(toks)
                counts[s] += sizes[i] + 1
                docs[s] += 1
        for h in handles.values():
            h.close()
        for s in paths:
            os.replace(tmps[s], paths[s])
    finally:
        for h in handles.values():
            h.close()
        for t in tmps.values():
            if os.path.exists(t):
                os.remove(t)
    return {"n_train_tokens": counts["train"], "n_val_tokens": counts["val"],
            "n_train_docs": docs["train"], "n_val_docs": docs["val"]}


@register_source("stdlib")
def load_stdlib(cfg) -> Source:
    """The default corpus: the running Python's standard library ``.py`` files as bytes.

    Returns:
      A :class:`Source` with ``uint16`` memmapped streams; ``info`` adds ``python_version`` and
      ``stdlib_root``.

    Raises:
      ValueError: ``model.vocab_size`` < 259 or ``data.val_fraction`` outside (0, 1).
    """
    files = stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    extra = {"python_version": ".".join(map(str, sys.version_info[:3])), "stdlib_root": root}
    return _byte_source(cfg, "stdlib", root, files, check_text=False, extra_info=extra)


@register_source("text")
def load_text(cfg) -> Source:
    """UTF-8 text files named by ``data.path`` (file, directory or glob), one document per file.

    Returns:
      A :class:`Source` with ``uint16`` memmapped streams.

    Raises:
      ValueError: ``data.path`` unset / missing / matching nothing; a file that contains NUL bytes
        or is not valid UTF-8 (the message names the file and how to exclude it);
        ``model.vocab_size`` < 259; ``data.val_fraction`` outside (0, 1).
    """
    _check_byte_vocab(cfg)
    files = text_files(cfg.data.path)
    return _byte_source(cfg, "text", cfg.data.path, files, check_text=True, extra_info={})


# ----------------------------------------------------------------------------- memmap source


def token_range(tokens: np.ndarray, chunk: int = _MAX_CHUNK) -> tuple[int, int]:
    """(min, max) token id of a 1-D array, computed chunk by chunk (safe for huge memmaps).

    Returns ``(0, -1)`` for an empty array.
    """
    lo, hi = None, None
    for i in range(0, len(tokens), chunk):
        c = np.asarray(tokens[i:i + chunk])
        cl, ch = int(c.min()), int(c.max())
        lo = cl if lo is None else min(lo, cl)
        hi = ch if hi is None else max(hi, ch)
    return (0, -1) if lo is None else (lo, hi)


def _open_token_file(path: str, dtype_name: str) -> np.ndarray:
    if path.endswith(".npy"):
        arr = np.load(path, mmap_mode="r")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"config.data.path: {path!r} holds {arr.dtype} values; token files must hold "
                             "integer ids (uint16 / uint32)")
        return arr.reshape(-1)
    if dtype_name not in MEMMAP_DTYPES:
        raise ValueError(f"config.data.memmap_dtype={dtype_name!r}: choose one of {MEMMAP_DTYPES}")
    itemsize = np.dtype(dtype_name).itemsize
    size = os.path.getsize(path)
    if size % itemsize:
        raise ValueError(f"config.data.memmap_dtype={dtype_name!r}: {path!r} is {size} bytes, not a multiple "
                         f"of {itemsize}; the file was written with another dtype, fix data.memmap_dtype")
    return _open_tokens(path, np.dtype(dtype_name))


def _memmap_fingerprint(paths: list[str]) -> str:
    """Cheap fingerprint: sha256 over (name, size, first and last 1 MiB) of each file; 16 hex chars."""
    h = hashlib.sha256()
    for p in paths:
        size = os.path.getsize(p)
        h.update(f"{os.path.basename(p)}\0{size}\n".encode())
        with open(p, "rb") as f:
            h.update(f.read(_FINGERPRINT_SAMPLE))
            if size > _FINGERPRINT_SAMPLE:
                f.seek(max(size - _FINGERPRINT_SAMPLE, _FINGERPRINT_SAMPLE))
                h.update(f.read())
    return h.hexdigest()[:16]


def _check_ids(tokens: np.ndarray, path: str, vocab_size: int) -> int:
    lo, hi = token_range(tokens)
    if lo < 0:
        raise ValueError(f"config.data.path: {path!r} contains a negative token id ({lo}); token ids must "
                         "be non-negative")
    if hi >= vocab_size:
        raise ValueError(f"config.model.vocab_size={vocab_size}: {path!r} contains token id {hi} (max id); "
                         f"set model.vocab_size >= {hi + 1}, or check data.memmap_dtype / data.path")
    return hi


@register_source("memmap")
def load_memmap(cfg) -> Source:
    """Pre-tokenized token files (nanoGPT layout).

    ``data.path`` is either a directory holding ``train.bin`` and ``val.bin`` (or ``.npy``), used as
    the two splits, or one token file (raw ``.bin`` of ``data.memmap_dtype``, or ``.npy``) whose last
    ``data.val_fraction`` of tokens (contiguous) is the validation split.

    Returns:
      A :class:`Source` whose streams are read-only memmaps of the file dtype (uint16 / uint32).

    Raises:
      ValueError: ``data.path`` unset / missing / a directory without train and val files; a raw file
        whose size does not fit ``data.memmap_dtype``; a non-integer ``.npy``; a token id >=
        ``model.vocab_size`` (names the max id); a stream too short to split.
    """
    path = cfg.data.path
    if not path:
        raise ValueError("config.data.path is not set: data.source='memmap' needs a token file (.bin / .npy) "
                         "or a directory with train.bin and val.bin")
    p = os.path.abspath(os.path.expanduser(path))
    vocab = cfg.model.vocab_size
    dtype_name = cfg.data.memmap_dtype
    info = {"source": "memmap", "path": path, "tokenizer": "pre-tokenized"}
    if os.path.isdir(p):
        found = {}
        for s in ("train", "val"):
            for ext in (".bin", ".npy"):
                if os.path.isfile(os.path.join(p, s + ext)):
                    found[s] = os.path.join(p, s + ext)
                    break
        if len(found) < 2:
            raise ValueError(f"config.data.path={path!r} is a directory but lacks "
                             f"{' and '.join(s + '.bin' for s in ('train', 'val') if s not in found)}; "
                             "point data.path at a single token file or add the split files")
        train = _open_token_file(found["train"], dtype_name)
        val = _open_token_file(found["val"], dtype_name)
        max_id = max(_check_ids(train, found["train"], vocab), _check_ids(val, found["val"], vocab))
        files = [found["train"], found["val"]]
        info["layout"] = "train_val_files"
    elif os.path.isfile(p):
        vf = _check_val_fraction(cfg)
        stream = _open_token_file(p, dtype_name)
        n = len(stream)
        if n < 2:
            raise ValueError(f"config.data.path={path!r} holds {n} tokens; need at least 2 to split")
        max_id = _check_ids(stream, p, vocab)
        n_val = min(max(int(round(n * vf)), 1), n - 1)
        train, val = stream[: n - n_val], stream[n - n_val:]
        files = [p]
        info["layout"] = "single_stream"
        info["val_fraction"] = vf
    else:
        raise ValueError(f"config.data.path={path!r} does not exist; fix data.path")
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"config.data.path={path!r}: the train or val split is empty")
    info.update(
        dtype=str(train.dtype),
        files=files,
        n_files=len(files),
        n_bytes=int(sum(os.path.getsize(f) for f in files)),
        max_id=int(max_id),
        fingerprint=_memmap_fingerprint(files),
        n_train_tokens=int(len(train)),
        n_val_tokens=int(len(val)),
    )
    return Source(name="memmap", train_tokens=train, val_tokens=val, info=info)
