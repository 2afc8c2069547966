"""Config schema, defaults and validation: the only place defaults live.

A run is described by one ``ml_collections.ConfigDict`` with five sections plus ``flops``
(field names follow ``shared/DESIGN.md``)::

    model  architecture (mixer, ffn, sizes, remat, dtypes)
    train  optimisation and loop cadence
    data   where tokens come from
    mesh   device-mesh axis sizes (data, fsdp, tensor, expert; -1 = the remaining devices)
    distributed  multi-host settings (coordinator, process count / id; None = environment)
    flops  peak FLOP/s override and the attention counting convention

``experiments/configs/*.py`` start from :func:`default_config` and override fields; the CLI
applies ``--config.a.b=value`` overrides on top; :func:`finalize` fills derived fields
(``n_kv_heads``, ``head_dim``, ``d_ff`` ...) and validates everything *before* anything is
built or compiled, raising :class:`ConfigError` that names the field and the fix.
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

REMAT_POLICIES = ("none", "full", "dots")
MIXER_FORMS = ("chunked", "recurrent", "quadratic")
FEATURE_MAPS = ("identity", "elu", "taylor")
DTYPES = ("float32", "bfloat16", "float16")
QUANT_MODES = ("none", "fp8")  # models/layers.py: matmul precision beyond the compute dtype
ATTENTION_IMPLS = ("auto", "xla", "cudnn")  # models/layers.py: attention_implementation
ATTENTION_CONVENTIONS = ("causal", "full")
# flops_per_token(attention=...): the config's conventions, plus the FLOPs the XLA form executes
FLOP_ATTENTION_CONVENTIONS = ATTENTION_CONVENTIONS + ("executed",)


def check_flop_attention(attention: str) -> None:
    """Raise ValueError unless ``attention`` is one of :data:`FLOP_ATTENTION_CONVENTIONS` (the
    ``attention=`` argument of every mixer's ``flops_per_token``)."""
    if attention not in FLOP_ATTENTION_CONVENTIONS:
        raise ValueError(f"attention convention {attention!r}: choose one of {FLOP_ATTENTION_CONVENTIONS}")
TASK_SOURCES = ("mqar", "induction", "selective_copy")  # synthetic tasks (data/synthetic.py)
DATA_SOURCES = ("stdlib", "text", "memmap") + TASK_SOURCES
MESH_AXES = ("data", "fsdp", "tensor", "expert")
MOE_ROUTERS = ("softmax", "sigmoid")
MOE_DISPATCHES = ("capacity", "dropless")
NAN_POLICIES = ("stop", "skip")


class ConfigError(ValueError):
    """A config field has an invalid value; the message names the field and the fix."""


def default_config() -> ml_collections.ConfigDict:
    """Return the full default config (a locked ConfigDict: unknown field names raise).

    None-able fields are typed placeholders, so ``--config.model.n_kv_heads=2`` parses as int
    and ``--config.model.n_kv_heads=None`` restores the derived default.
    """
    c = ml_collections.ConfigDict()

    m = c.model = ml_collections.ConfigDict()
    m.mixer = "attention"  # sequence mixer registered in models/registry.py
    m.ffn = "mlp"  # channel mixer ("mlp" | "moe")
    m.layer_pattern = config_dict.placeholder(tuple)  # None | mixer names repeated to n_layers
    m.vocab_size = 264  # byte-level: 256 bytes + specials, padded to a multiple of 8
    m.seq_len = 256  # training context length (tokens)
    m.max_seq_len = config_dict.placeholder(int)  # None -> seq_len; bounds RoPE / caches
    m.d_model = 256
    m.n_layers = 4
    m.n_heads = 4
    m.n_kv_heads = config_dict.placeholder(int)  # None -> n_heads (MHA); 1 -> MQA
    m.head_dim = config_dict.placeholder(int)  # None -> d_model // n_heads
    m.d_ff = config_dict.placeholder(int)  # None -> 8/3 d_model rounded up to a multiple of 64
    m.tie_embeddings = True
    m.chunk_size = 64  # chunk length of chunked linear-recurrence forms
    m.mixer_form = "chunked"  # training form of recurrent mixers: "chunked" | "recurrent" | "quadratic"
    m.feature_map = "elu"  # linear attention feature map: "identity" | "elu" | "taylor"
    m.normalize = True  # linear attention: divide by q . sum(k) (Katharopoulos et al. 2020)
    m.feature_dim = 16  # Based: q/k projection size fed to the 2nd-order Taylor map
    m.window_size = 64  # sliding-window softmax attention (sliding_window, based)
    m.state_size = 64  # Mamba-2 SSM state size N (d_state)
    m.expand = 2  # Mamba-2 inner width = expand * d_model
    m.conv_width = 4  # short causal depthwise convolution width (Mamba-2, DeltaNet family)
    m.remat = "none"  # "none" | "full" | "dots"
    m.scan_layers = True  # False unrolls the layer loop (same numbers, compile grows with depth)
    m.dtype = "float32"  # compute dtype
    m.param_dtype = "float32"
    m.quant = "none"  # "none" | "fp8": projection/MLP matmuls in FP8 (E4M3 fwd, E5M2 grads; qwix)
    m.attention_impl = "auto"  # "auto" (cuDNN fused on GPU when it qualifies) | "xla" | "cudnn"
    m.rope_theta = 10000.0
    m.norm_eps = 1e-6
    m.init_std = 0.02
    mo = m.moe = ml_collections.ConfigDict()  # used when ffn == "moe" (models/moe.py)
    mo.n_experts = 8  # routed experts E
    mo.top_k = 2  # routed experts per token k
    mo.n_shared_experts = 0  # always-active experts (DeepSeekMoE, Llama-4)
    mo.d_ff_expert = config_dict.placeholder(int)  # None -> d_ff; hidden size of each expert
    mo.router = "softmax"  # "softmax" (Switch/Mixtral) | "sigmoid" (DeepSeek-V3)
    mo.norm_top_k = False  # divide the top-k weights by their sum (Mixtral; DeepSeek-V3 sigmoid)
    mo.route_scale = 1.0  # multiplies the routed weights (DeepSeek-V3: 2.5)
    mo.dispatch = "capacity"  # "capacity" (drop over capacity) | "dropless" (sorted + ragged_dot)
    mo.capacity_factor = 1.25  # slots per expert per sequence = ceil(cf * T * k / E), <= T
    mo.aux_loss_coef = 0.01  # Switch load-balancing loss weight (0 disables)
    mo.z_loss_coef = 1e-3  # router z-loss weight (ST-MoE; 0 disables)
    mo.bias_update_rate = 0.0  # aux-loss-free balancing step gamma (DeepSeek-V3: 1e-3; 0 disables)
    mo.moe_every = 1  # 2 = every other layer is MoE (Llama-4 interleaving); others dense
    mo.first_k_dense = 0  # the first k layers use the dense MLP (DeepSeek-V3: 3)

    t = c.train = ml_collections.ConfigDict()
    t.steps = 200
    t.batch_size = 16  # global batch, sequences
    t.grad_accum = 1  # microbatches per step (batch_size / grad_accum sequences each)
    # LM head + cross-entropy fused and chunked along the sequence (ops/cross_entropy.py): the
    # [B, T, vocab] logits are never materialized; 0 = unfused (full logits, autodiff)
    t.ce_chunk_size = 0
    t.lr = 3e-3
    t.warmup_steps = 20
    t.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
    t.weight_decay = 0.1
    t.clip_norm = 1.0  # global-norm clipping; 0 disables
    t.b1 = 0.9
    t.b2 = 0.95
    t.eps = 1e-8
    t.seed = 0
    t.log_every = 10
    t.eval_every = 100
    t.eval_batches = 4
    t.ckpt_every = 100
    t.keep_ckpts = 2
    t.nan_policy = "stop"  # non-finite loss or grad norm: "stop" the run | "skip" the step's update
    t.max_skipped_steps = 10  # nan_policy="skip": stop after this many consecutive skipped steps

    d = c.data = ml_collections.ConfigDict()
    d.source = "stdlib"  # "stdlib" | "text" | "memmap" | "mqar" | "induction" | "selective_copy"
    d.path = config_dict.placeholder(str)  # text file / dir / glob, or a token memmap
    d.val_fraction = 0.05
    d.memmap_dtype = "uint16"  # dtype of a raw .bin memmap ("uint16" | "uint32")
    d.cache_dir = config_dict.placeholder(str)  # None -> ~/.cache/efficient_arch/data
    # synthetic tasks (data.source in TASK_SOURCES; efficient_arch/data/synthetic.py)
    d.seed = 0  # seed of the example streams (train.seed seeds init / shuffles, not these)
    d.task_vocab = config_dict.placeholder(int)  # token ids the task uses; None -> model.vocab_size
    d.n_kv_pairs = 8  # mqar: key-value pairs per example, each queried once (Zoology)
    d.power_a = 0.01  # mqar: query gaps g drawn with p(g) ~ (g + 1) ** (power_a - 1) (Zoology)
    d.n_copy_tokens = 16  # selective_copy: data tokens to copy (Mamba Sec. 4.1)

    me = c.mesh = ml_collections.ConfigDict()
    me.data = -1
    me.fsdp = 1
    me.tensor = 1
    me.expert = 1

    di = c.distributed = ml_collections.ConfigDict()  # multi-host (parallel.init_distributed)
    di.coordinator_address = config_dict.placeholder(str)  # "host:port" of process 0; None -> $JAX_COORDINATOR_ADDRESS
    di.num_processes = config_dict.placeholder(int)  # None -> $JAX_NUM_PROCESSES, else cluster auto-detection
    di.process_id = config_dict.placeholder(int)  # None -> $JAX_PROCESS_ID, else cluster auto-detection
    di.auto_detect = True  # SLURM / Open MPI / multi-host TPU with > 1 process: initialize automatically
    di.timeout_s = 300  # seconds to wait for all processes to connect

    f = c.flops = ml_collections.ConfigDict()
    f.peak_flops = config_dict.placeholder(float)  # FLOP/s per device; None -> table / calibration
    f.attention = "causal"  # MFU convention for the attention term: "causal" | "full"

    c.lock()
    return c


def _fail(field: str, value, fix: str):
    raise ConfigError(f"config.{field}={value!r}: {fix}")


def _positive(cfg, section: str, names, allow_zero=()):
    node = cfg
    for part in section.split("."):
        node = node[part]
    for n in names:
        v = node[n]
        is_number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not is_number or not (v >= 0 if n in allow_zero else v > 0):
            _fail(f"{section}.{n}", v, "must be a " + ("non-negative" if n in allow_zero else "positive") + " number")


def mesh_shape(cfg: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
    """Resolve ``cfg.mesh`` (sizes, at most one -1) against ``n_devices``.

    Returns ``{"data": int, "fsdp": int, "tensor": int, "expert": int}`` whose product is
    ``n_devices``. Raises ConfigError if sizes are not positive, more than one is -1, or the
    product does not divide / equal the device count.
    """
    sizes = {a: cfg.mesh[a] for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    for a, s in sizes.items():
        if s != -1 and (not isinstance(s, int) or s < 1):
            _fail(f"mesh.{a}", s, "mesh sizes must be positive integers or -1 (= the remaining devices)")
    if len(free) > 1:
        _fail(f"mesh.{free[1]}", -1, f"only one mesh axis may be -1 (both {free} are)")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            others = " x ".join(f"mesh.{a}={s}" for a, s in sizes.items() if s != -1)
            _fail(f"mesh.{free[0]}", -1, f"the other axes ({others}) multiply to {fixed}, which does not "
                  f"divide the {n_devices} available devices; change those mesh sizes")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        _fail("mesh", dict(sizes), f"axis sizes multiply to {fixed} but {n_devices} devices are "
              "available; set one axis to -1 or make the product equal the device count")
    return sizes


def _check_task(m, d) -> None:
    """Validate the synthetic-task fields of ``data`` (layouts: efficient_arch/data/synthetic.py)."""
    if d.path:
        _fail("data.path", d.path, f"is ignored by the synthetic task data.source={d.source!r}; drop data.path")
    if isinstance(d.seed, bool) or not isinstance(d.seed, int) or d.seed < 0:
        _fail("data.seed", d.seed, "must be a non-negative integer")
    vocab = m.vocab_size if d.task_vocab is None else d.task_vocab
    if d.task_vocab is not None and (not isinstance(d.task_vocab, int) or d.task_vocab > m.vocab_size):
        _fail("data.task_vocab", d.task_vocab, f"must be an integer <= model.vocab_size={m.vocab_size} (the "
              "model embeds every task token); lower it or raise model.vocab_size")
    T = m.seq_len
    if d.source == "mqar":
        n = d.n_kv_pairs
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            _fail("data.n_kv_pairs", n, "must be a positive integer")
        if 4 * n > T + 1:
            _fail("data.n_kv_pairs", n, f"MQAR needs 4 * n_kv_pairs <= model.seq_len + 1 = {T + 1} (2n context "
                  "tokens, then n query/answer pairs in the gaps); lower data.n_kv_pairs or raise model.seq_len")
        if vocab < 2 * n + 2:
            _fail("data.task_vocab", vocab, f"MQAR draws n_kv_pairs={n} distinct keys from [1, V/2) and values "
                  f"from [V/2, V): needs V >= {2 * n + 2}; raise data.task_vocab (or model.vocab_size)")
        if isinstance(d.power_a, bool) or not isinstance(d.power_a, (int, float)) or not d.power_a > 0:
            _fail("data.power_a", d.power_a, "must be a positive number (0.01 in Zoology; 1 = uniform gaps)")
    elif d.source == "induction":
        if T < 4:
            _fail("model.seq_len", T, "the induction task needs seq_len >= 4 (trigger, answer, filler, "
                  "final trigger)")
        if vocab < 3:
            _fail("data.task_vocab", vocab, "the induction task needs >= 3 ids (the trigger + 2 content tokens)")
    elif d.source == "selective_copy":
        n = d.n_copy_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            _fail("data.n_copy_tokens", n, "must be a positive integer")
        if 2 * n > T:
            _fail("data.n_copy_tokens", n, f"selective copying needs 2 * n_copy_tokens <= model.seq_len = {T} "
                  "(n data tokens among noise, then n markers); lower it or raise model.seq_len")
        if vocab < 3:
            _fail("data.task_vocab", vocab, "selective copying needs >= 3 ids (noise, marker, >= 1 data token)")


def finalize(cfg: ml_collections.ConfigDict, n_devices: int | None = None) -> ml_collections.ConfigDict:
    """Fill derived fields and validate; returns a new locked ConfigDict (input untouched).

    Derived: ``model.n_kv_heads`` (None -> n_heads), ``model.head_dim`` (None -> d_model //
    n_heads), ``model.d_ff`` (None -> 8/3 d_model rounded up to 64), ``model.max_seq_len``
    (None -> seq_len). If ``n_devices`` is given the mesh and batch divisibility are checked too.

    Raises:
      ConfigError: naming the offending field and how to fix it.
    """
    from efficient_arch.models import registry  # late import: registry imports models

    cfg = ml_collections.ConfigDict(cfg.to_dict(), type_safe=False)
    m, t, d = cfg.model, cfg.train, cfg.data

    _positive(cfg, "model", ["vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "chunk_size",
                             "rope_theta", "norm_eps", "init_std"])
    for n in ("n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
        if m[n] is not None and (not isinstance(m[n], int) or m[n] < 1):
            _fail(f"model.{n}", m[n], "must be a positive integer or None (derived)")
    if m.n_kv_heads is None:
        m.n_kv_heads = m.n_heads
    if m.head_dim is None:
        if m.d_model % m.n_heads:
            _fail("model.d_model", m.d_model, f"must be divisible by model.n_heads={m.n_heads} "
                  "(or set model.head_dim explicitly)")
        m.head_dim = m.d_model // m.n_heads
    if m.n_heads % m.n_kv_heads:
        _fail("model.n_heads", m.n_heads, f"must be divisible by model.n_kv_heads={m.n_kv_heads} "
              "(GQA groups query heads evenly over key/value heads)")
    if m.d_ff is None:
        m.d_ff = 64 * math.ceil(8 * m.d_model / 3 / 64)
    if m.max_seq_len is None:
        m.max_seq_len = m.seq_len
    if m.seq_len > m.max_seq_len:
        _fail("model.seq_len", m.seq_len, f"exceeds model.max_seq_len={m.max_seq_len}; raise max_seq_len "
              "or shorten seq_len")
    _positive(cfg, "model", ["feature_dim", "window_size", "state_size", "expand", "conv_width"])
    if m.mixer_form not in MIXER_FORMS:
        _fail("model.mixer_form", m.mixer_form, f"choose one of {MIXER_FORMS}")
    if m.feature_map not in FEATURE_MAPS:
        _fail("model.feature_map", m.feature_map, f"choose one of {FEATURE_MAPS}")
    if m.remat not in REMAT_POLICIES:
        _fail("model.remat", m.remat, f"choose one of {REMAT_POLICIES}")
    for n in ("dtype", "param_dtype"):
        if m[n] not in DTYPES:
            _fail(f"model.{n}", m[n], f"choose one of {DTYPES}")
    if m.quant not in QUANT_MODES:
        _fail("model.quant", m.quant, f"choose one of {QUANT_MODES} ('fp8': FP8 training of the projection and "
              "MLP matmuls; the compute dtype model.dtype covers the rest)")
    if m.quant == "fp8":
        if m.param_dtype != "float32":
            _fail("model.param_dtype", m.param_dtype, "model.quant='fp8' keeps float32 master weights (FP8 copies "
                  "are made per step); set --config.model.param_dtype=float32")
        try:
            import qwix  # noqa: F401  (the FP8 dot is qwix's quantized-training dot_general)
        except ImportError as e:
            _fail("model.quant", m.quant, f"needs the qwix package ({e}); pip install 'qwix>=0.1.8,<0.2' "
                  "or set --config.model.quant=none")
    if m.attention_impl not in ATTENTION_IMPLS:
        _fail("model.attention_impl", m.attention_impl, f"choose one of {ATTENTION_IMPLS} ('auto': cuDNN fused "
              "attention on a GPU where it qualifies, else XLA; 'xla': always XLA; 'cudnn': cuDNN or an error)")
    if m.attention_impl == "cudnn" and n_devices is not None:
        import jax

        if jax.default_backend() != "gpu":
            _fail("model.attention_impl", m.attention_impl, f"cuDNN fused attention needs a GPU and this "
                  f"process runs on {jax.default_backend()!r}; use --config.model.attention_impl=auto "
                  "(cuDNN where it can run, XLA elsewhere) or xla")
    mixers = registry.mixer_names()
    pattern = list(m.layer_pattern) if m.layer_pattern is not None else [m.mixer]
    for name in pattern:
        if name not in mixers:
            field = "model.layer_pattern" if m.layer_pattern is not None else "model.mixer"
            _fail(field, name, f"unknown sequence mixer; registered mixers: {sorted(mixers)}")
    for name in dict.fromkeys(pattern):
        forms = getattr(registry.get_mixer(name), "forms", None)  # mixers without every form say so
        if forms is not None and m.mixer_form not in forms:
            _fail("model.mixer_form", m.mixer_form, f"mixer {name!r} runs the forms {tuple(forms)}; "
                  "choose one of them")
    if "mamba2" in pattern and (m.expand * m.d_model) % m.head_dim:
        _fail("model.head_dim", m.head_dim, f"Mamba-2 splits its inner width expand*d_model="
              f"{m.expand * m.d_model} into heads of head_dim; choose a divisor")
    if m.ffn not in registry.ffn_names():
        _fail("model.ffn", m.ffn, f"unknown FFN; registered FFNs: {sorted(registry.ffn_names())}")
    mo = m.moe
    if m.ffn == "moe":
        _positive(cfg, "model.moe", ["n_experts", "top_k", "capacity_factor", "moe_every", "route_scale"])
        for n in ("n_shared_experts", "first_k_dense"):
            if not isinstance(mo[n], int) or mo[n] < 0:
                _fail(f"model.moe.{n}", mo[n], "must be a non-negative integer")
        for n in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if not mo[n] >= 0:
                _fail(f"model.moe.{n}", mo[n], "must be >= 0 (0 disables it)")
        if mo.top_k > mo.n_experts:
            _fail("model.moe.top_k", mo.top_k, f"cannot exceed model.moe.n_experts={mo.n_experts}")
        if mo.router not in MOE_ROUTERS:
            _fail("model.moe.router", mo.router, f"choose one of {MOE_ROUTERS}")
        if mo.dispatch not in MOE_DISPATCHES:
            _fail("model.moe.dispatch", mo.dispatch, f"choose one of {MOE_DISPATCHES}")
        if mo.d_ff_expert is not None and (not isinstance(mo.d_ff_expert, int) or mo.d_ff_expert < 1):
            _fail("model.moe.d_ff_expert", mo.d_ff_expert, "must be a positive integer or None (= model.d_ff)")
    if mo.d_ff_expert is None:
        mo.d_ff_expert = m.d_ff
    glen = group_len(m)
    what = (f"the layer group length lcm(len(layer_pattern)={len(pattern)}, moe.moe_every={mo.moe_every})"
            if m.ffn == "moe" else f"len(model.layer_pattern)={len(pattern)}")
    dense = mo.first_k_dense if m.ffn == "moe" else 0
    if dense % glen:
        _fail("model.moe.first_k_dense", dense, f"must be a multiple of {what} = {glen}")
    if dense >= m.n_layers:
        _fail("model.moe.first_k_dense", dense, f"must be below model.n_layers={m.n_layers} (else no MoE layer)")
    if (m.n_layers - dense) % glen:
        _fail("model.n_layers", m.n_layers, f"n_layers - first_k_dense must be a multiple of {what} = {glen}")

    _positive(cfg, "train", ["steps", "batch_size", "grad_accum", "lr", "log_every", "eval_every",
                             "eval_batches", "ckpt_every", "keep_ckpts"])
    _positive(cfg, "train", ["warmup_steps", "weight_decay", "clip_norm", "min_lr_ratio", "eps", "ce_chunk_size"],
              allow_zero=("warmup_steps", "weight_decay", "clip_norm", "min_lr_ratio", "eps", "ce_chunk_size"))
    if t.min_lr_ratio > 1:
        _fail("train.min_lr_ratio", t.min_lr_ratio, "must lie in [0, 1]")
    for n in ("b1", "b2"):
        if not 0 <= t[n] < 1:
            _fail(f"train.{n}", t[n], "Adam betas must lie in [0, 1)")
    if not isinstance(t.ce_chunk_size, int) or isinstance(t.ce_chunk_size, bool):
        _fail("train.ce_chunk_size", t.ce_chunk_size, "must be an integer (sequence positions per chunk; 0 = off)")
    if t.batch_size % t.grad_accum:
        _fail("train.batch_size", t.batch_size, f"must be divisible by train.grad_accum={t.grad_accum}")
    if t.nan_policy not in NAN_POLICIES:
        _fail("train.nan_policy", t.nan_policy, f"choose one of {NAN_POLICIES} ('stop': a non-finite loss or "
              "gradient norm stops the run; 'skip': that step's update is discarded)")
    if isinstance(t.max_skipped_steps, bool) or not isinstance(t.max_skipped_steps, int) or t.max_skipped_steps < 1:
        _fail("train.max_skipped_steps", t.max_skipped_steps, "must be a positive integer (the run stops after "
              "this many consecutive skipped steps under train.nan_policy='skip')")

    if d.source not in DATA_SOURCES:
        _fail("data.source", d.source, f"choose one of {DATA_SOURCES}")
    if d.source == "stdlib" and d.path:
        _fail("data.path", d.path, "is ignored by data.source='stdlib'; set --config.data.source=text "
              "(or memmap) to train on it, or drop data.path")
    if d.source in ("text", "memmap") and not d.path:
        _fail("data.path", d.path, f"data.source={d.source!r} needs a path (file, directory or glob)")
    if not 0 < d.val_fraction < 1:
        _fail("data.val_fraction", d.val_fraction, "must lie strictly between 0 and 1")
    if d.memmap_dtype not in ("uint16", "uint32"):
        _fail("data.memmap_dtype", d.memmap_dtype, "choose 'uint16' or 'uint32'")
    if d.source in TASK_SOURCES:
        _check_task(m, d)

    di = cfg.distributed
    for n in ("num_processes", "timeout_s"):
        if di[n] is not None and (isinstance(di[n], bool) or not isinstance(di[n], int) or di[n] < 1):
            _fail(f"distributed.{n}", di[n], "must be a positive integer" + (" or None" if n != "timeout_s" else ""))
    if di.process_id is not None and (isinstance(di.process_id, bool) or not isinstance(di.process_id, int)
                                      or di.process_id < 0):
        _fail("distributed.process_id", di.process_id, "must be a non-negative integer or None")
    if di.process_id is not None and di.num_processes is not None and di.process_id >= di.num_processes:
        _fail("distributed.process_id", di.process_id, f"must be below distributed.num_processes="
              f"{di.num_processes} (processes are numbered 0 .. num_processes - 1)")
    if di.coordinator_address is not None and not _is_host_port(di.coordinator_address):
        _fail("distributed.coordinator_address", di.coordinator_address, "must be 'host:port' of process 0 "
              "(e.g. '10.0.0.1:1234')")

    if cfg.flops.attention not in ATTENTION_CONVENTIONS:
        _fail("flops.attention", cfg.flops.attention, f"choose one of {ATTENTION_CONVENTIONS}")
    if cfg.flops.peak_flops is not None and not cfg.flops.peak_flops > 0:
        _fail("flops.peak_flops", cfg.flops.peak_flops, "must be positive FLOP/s per device, or None")

    if n_devices is not None:
        sizes = mesh_shape(cfg, n_devices)
        for a in MESH_AXES:
            cfg.mesh[a] = sizes[a]
        dp = sizes["data"] * sizes["fsdp"] * sizes["expert"]
        micro = t.batch_size // t.grad_accum
        if micro % dp:
            _fail("train.batch_size", t.batch_size, f"the microbatch of {micro} sequences (batch_size / "
                  f"grad_accum) must be divisible by the data-parallel size data*fsdp*expert={dp}")
        checks = [("model.d_model", m.d_model, "fsdp"), ("model.n_heads", m.n_heads, "tensor"),
                  ("model.n_kv_heads", m.n_kv_heads, "tensor"), ("model.d_ff", m.d_ff, "tensor"),
                  ("model.vocab_size", m.vocab_size, "tensor")]
        if m.ffn == "moe":
            checks += [("model.moe.n_experts", mo.n_experts, "expert"),
                       ("model.moe.d_ff_expert", mo.d_ff_expert, "tensor")]
        for field, value, axis in checks:
            if value % sizes[axis]:
                _fail(field, value, f"must be divisible by mesh.{axis}={sizes[axis]} (it is sharded over "
                      f"that axis); change the value or the mesh")
    cfg.lock()
    return cfg


def _is_host_port(address) -> bool:
    """True for ``host:port`` / ``[ipv6]:port`` with a port in 1..65535."""
    if not isinstance(address, str) or ":" not in address:
        return False
    host, port = address.rsplit(":", 1)
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def group_len(mcfg) -> int:
    """Blocks per repeated layer group: ``lcm(len(layer_pattern), moe.moe_every)`` (``moe_every``
    only counts when ``ffn == "moe"``). Groups are stacked and scanned, so they must be identical."""
    plen = len(mcfg.layer_pattern) if mcfg.layer_pattern is not None else 1
    return math.lcm(plen, mcfg.moe.moe_every) if mcfg.ffn == "moe" else plen


def load_config(path, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file at ``path``, as ``--config=path:arg`` would load it.

    Lets one experiment config start from another (e.g. every family from ``transformer.py``'s
    sizes) without copying it.
    """
    import importlib.util
    import pathlib

    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"_efficient_arch_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def pick_size(family: str, table: dict, arg: str | None, default: str = "small") -> str:
    """The size name ``arg`` (``default`` when None) after checking it is a key of ``table``.

    Raises:
      ValueError: unknown size, listing the known ones.
    """
    size = arg or default
    if size not in table:
        raise ValueError(f"unknown {family} size {size!r}; choose one of {sorted(table)}")
    return size
