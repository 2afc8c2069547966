"""MQAR at CPU size: attention vs Gated DeltaNet vs Based at two widths (a small Zoology Figure 2).

    efficient-arch sweep experiments/sweeps/mqar_tiny.py --workdir runs/mqar_tiny [--parallel 2]

Each architecture starts from its ``tiny`` config (2 layers, the families' own mixer settings;
``d_ff`` re-derived from ``d_model``) and trains 80 steps of 16 x 64 tokens on MQAR (Arora et al.
2023): vocab 64, 4 key-value pairs, each queried once with Zoology's power-law gaps. Loss and
accuracy count only the 4 answer positions per sequence; chance accuracy is 1/32, guessing among
the context's values 1/4. Six points, 9-17 s each on 2 idle CPU cores (80 s in all). At this
budget the models learn the task format (answers are values from the context) before recall
itself (measured: 3-13% validation accuracy); ``results.csv`` lists every point's.
"""

BASE = "experiments/configs/transformer.py:tiny"

OVERRIDES = {
    "data.source": "mqar",
    "data.n_kv_pairs": 4,
    "model.vocab_size": 64,  # = data.task_vocab (None: the model's vocabulary)
    "model.seq_len": 64,
    "model.d_ff": None,  # re-derived from d_model (8/3 d, rounded up to 64)
    "train.steps": 80,
    "train.batch_size": 16,
    "train.lr": 3e-3,
    "train.warmup_steps": 8,
    "train.log_every": 10,
    "train.eval_every": 40,
    "train.eval_batches": 4,
    "train.ckpt_every": 40,
}

POINTS = [
    {"config": "experiments/configs/transformer.py:tiny"},
    {"config": "experiments/configs/gated_deltanet.py:tiny"},
    {"config": "experiments/configs/based.py:tiny"},
]

GRID = {"model.d_model": [32, 64]}
