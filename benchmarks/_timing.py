"""Shared by the benchmark scripts: compile and time a built train step."""

from __future__ import annotations

import resource
import statistics
import time


def time_train_step(run, x, *, warmup: int, runs: int) -> dict:
    """Compile ``run.train_step`` and time it on one fixed batch (call inside ``jax.set_mesh``).

    Args:
      run: ``efficient_arch.train.build(cfg, mesh)``; x: int32 numpy ``[batch, seq_len + 1]``
        tokens (inputs / targets are its shifted views).
      warmup: untimed calls after compiling (>= 1 excludes first-call effects).
      runs: timed calls.
    Returns:
      dict with ``compiled`` (the executable), ``compile_s``, ``peak_rss_after_compile_bytes`` (the
      process's peak RSS so far: imports, anything before the call, the compile), ``step_times_s`` (each call,
      seconds), ``step_time_s`` (their median) and ``metrics`` (the last step's metrics).
    """
    import jax

    from efficient_arch import parallel

    t0 = time.perf_counter()
    compiled = run.train_step.lower(run.abstract_state, run.abstract_batch()).compile()
    compile_s = time.perf_counter() - t0
    rss_after_compile = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    state = run.init_state()
    batch = parallel.global_batch({"inputs": x[:, :-1], "targets": x[:, 1:]}, run.mesh, run.cfg.train.batch_size)
    m = None
    for _ in range(warmup):
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return {"compiled": compiled, "compile_s": compile_s, "peak_rss_after_compile_bytes": rss_after_compile,
            "step_times_s": times,
            "step_time_s": statistics.median(times), "metrics": m}
