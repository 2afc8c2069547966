"""Run outputs in the workdir: metrics.jsonl (one JSON object per log step) and TensorBoard events.

Written by process 0 only; every value is converted to a Python float/int/str so the JSONL is
readable without JAX.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def to_python(v: Any):
    """Convert numpy / JAX scalars to JSON-safe Python values (non-finite floats -> None)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """Append metrics to ``workdir/metrics.jsonl`` and TensorBoard event files in ``workdir/tb``.

    Args:
      workdir: run directory (created if missing).
      enabled: False on processes other than 0 (then every call is a no-op).
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # TensorBoard output is optional; metrics.jsonl is always written
            self._tb = None

    def rewind(self, step: int) -> int:
        """Move the rows of steps after ``step`` out of ``metrics.jsonl`` (a resume from the
        checkpoint of ``step`` recomputes them; they were logged by a run killed before its next
        checkpoint committed). They are appended to ``metrics.abandoned.jsonl``, never dropped.

        Returns:
          The number of rows moved (0 on processes other than 0).
        """
        if not self.enabled:
            return 0
        path = self._jsonl.name
        self._jsonl.close()
        keep, moved = [], []
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    late = int(json.loads(line).get("step", 0)) > step
                except (ValueError, AttributeError):  # a torn last line of a killed run
                    late = True
                (moved if late else keep).append(line if line.endswith("\n") else line + "\n")
        if moved:
            with open(os.path.join(os.path.dirname(path), "metrics.abandoned.jsonl"), "a") as f:
                f.writelines(moved)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)
        self._jsonl = open(path, "a", buffering=1)
        return len(moved)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` (name -> scalar) for ``step``; None values are skipped in TensorBoard."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
