"""Transformer LM (GQA attention + SwiGLU MLP) at named sizes.

    --config=experiments/configs/transformer.py:SIZE     SIZE in tiny | small | base | bench

tiny   seconds on a CPU; tests and smoke runs.
small  the README's main job: trains on the default corpus (Python stdlib bytes) on a 2-core CPU
       in a few minutes with validation bits-per-byte clearly falling.
base   GPT-2-small shape (d_model 768, 12 layers) for accelerators.
bench  the performance issue's CPU reference config (d_model 512, 8 layers, vocab 8192,
       seq_len 512, batch 8).
"""

from efficient_arch.config import default_config, pick_size

SIZES = {
    #        d_model n_layers n_heads n_kv d_ff  seq_len batch steps  lr
    "tiny": (64, 2, 4, 2, 192, 64, 8, 40, 3e-3),
    "small": (192, 4, 6, 2, 512, 128, 16, 300, 3e-3),
    "base": (768, 12, 12, 4, 2048, 1024, 64, 5000, 6e-4),
    "bench": (512, 8, 8, 8, 2048, 512, 8, 20, 1e-3),
}


def get_config(arg: str | None = None):
    """Return the transformer config for size ``arg`` (default ``small``).

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = pick_size('transformer', SIZES, arg)
    d, n_layers, heads, kv, d_ff, seq, batch, steps, lr = SIZES[size]
    c = default_config()
    m = c.model
    m.mixer, m.ffn = "attention", "mlp"
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.seq_len = d, n_layers, heads, kv, d_ff, seq
    c.train.batch_size, c.train.steps, c.train.lr = batch, steps, lr
    c.train.warmup_steps = max(steps // 20, 1)
    c.train.log_every = max(steps // 30, 1)
    c.train.eval_every = max(steps // 6, 1)
    c.train.ckpt_every = max(steps // 3, 1)
    if size == "bench":
        m.vocab_size = 8192
        m.tie_embeddings = False
    return c
