"""Byte-level tokenizer: token ids 0..255 are raw bytes, followed by three special ids.

    0..255  the byte values of the UTF-8 (or raw) text
    256     EOS, the document separator (every document in a byte stream ends with it)
    257     BOS (reserved; the stream builders do not emit it)
    258     PAD (reserved for padding / synthetic tasks)

``model.vocab_size`` must be at least :data:`VOCAB_NEEDED` (= 259) for byte-level sources; the
default config pads it to 264 (a multiple of 8).
"""

from __future__ import annotations

import numpy as np

N_BYTES = 256
EOS = 256
BOS = 257
PAD = 258
VOCAB_NEEDED = 259
SPECIAL_NAMES = {EOS: "<eos>", BOS: "<bos>", PAD: "<pad>"}

TOKEN_DTYPE = np.uint16  # dtype of encoded streams and of the on-disk cache


def encode(text: str | bytes | bytearray | memoryview) -> np.ndarray:
    """Encode text as byte ids.

    Args:
      text: a ``str`` (encoded as UTF-8) or a bytes-like object (taken as is).

    Returns:
      ``uint16[len(bytes)]`` with values in ``[0, 255]``; no BOS/EOS is added.

    Raises:
      TypeError: if ``text`` is neither ``str`` nor bytes-like.
    """
    if isinstance(text, str):
        data = text.encode("utf-8")
    elif isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
    else:
        raise TypeError(f"encode() takes str or bytes, got {type(text).__name__}")
    return np.frombuffer(data, dtype=np.uint8).astype(TOKEN_DTYPE)


def decode(ids) -> str:
    """Decode byte ids back to text.

    Args:
      ids: any integer array-like of shape ``[n]`` (e.g. ``uint16``/``int32``); a multi-dim array
        is flattened.

    Returns:
      The UTF-8 decoding of the byte ids (invalid sequences become U+FFFD, ``errors="replace"``).
      Special ids (EOS, BOS, PAD) and any id outside ``[0, 255]`` are skipped.
    """
    arr = np.asarray(ids).reshape(-1)
    if arr.size == 0:
        return ""
    arr = arr.astype(np.int64)
    keep = arr[(arr >= 0) & (arr < N_BYTES)].astype(np.uint8)
    return keep.tobytes().decode("utf-8", errors="replace")
