"""Tests for efficient_arch.config: derived fields, validation errors, locking and CLI overrides."""

from __future__ import annotations

import math
import pathlib
import re

import pytest

from efficient_arch import cli
from efficient_arch.config import ConfigError, default_config, finalize, mesh_shape

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def expect_error(cfg, field, n_devices=None, match=None):
    """finalize must raise ConfigError whose message starts by naming ``config.<field>=``."""
    with pytest.raises(ConfigError) as e:
        finalize(cfg, n_devices)
    msg = str(e.value)
    assert msg.startswith(f"config.{field}="), msg
    if match:
        assert re.search(match, msg), msg
    return msg


# ----------------------------------------------------------------------------- derived fields

def test_default_config_finalizes_and_derives(tiny_config):
    c = tiny_config(model__d_ff=None)
    f = finalize(c)
    m = f.model
    assert m.n_kv_heads == m.n_heads == 4
    assert m.head_dim == m.d_model // m.n_heads == 16
    assert m.max_seq_len == m.seq_len == 16
    assert m.d_ff == 192  # 8/3 * 64 = 170.7 -> next multiple of 64
    # the input is untouched and both are locked
    assert c.model.n_kv_heads is None and c.model.head_dim is None and c.model.d_ff is None
    assert c.model.max_seq_len is None
    with pytest.raises((AttributeError, KeyError)):
        f.model.not_a_field = 1
    # finalizing twice changes nothing
    assert finalize(f).to_dict() == f.to_dict()
    # the untouched default config validates too
    finalize(default_config())


@pytest.mark.parametrize("d_model", [8, 24, 48, 64, 96, 100, 128, 200, 256, 384, 512, 1000, 1024])
def test_d_ff_is_smallest_multiple_of_64_at_least_8_thirds_d_model(tiny_config, d_model):
    m = finalize(tiny_config(model__d_model=d_model, model__n_heads=1, model__d_ff=None)).model
    assert m.d_ff % 64 == 0
    assert 3 * m.d_ff >= 8 * d_model  # >= 8/3 d_model (exact integer arithmetic)
    assert 3 * (m.d_ff - 64) < 8 * d_model  # and the smallest such multiple
    assert m.head_dim == d_model


def test_explicit_values_are_kept(tiny_config):
    m = finalize(tiny_config(model__n_kv_heads=1, model__head_dim=8, model__d_ff=96,
                             model__max_seq_len=64)).model
    assert (m.n_kv_heads, m.head_dim, m.d_ff, m.max_seq_len) == (1, 8, 96, 64)
    # an explicit head_dim lifts the divisibility requirement on d_model
    m = finalize(tiny_config(model__d_model=60, model__n_heads=8, model__head_dim=8)).model
    assert m.head_dim == 8


def test_mesh_is_resolved_with_n_devices(tiny_config):
    f = finalize(tiny_config(mesh__data=-1, mesh__tensor=2, train__batch_size=8), 8)
    assert (f.mesh.data, f.mesh.fsdp, f.mesh.tensor, f.mesh.expert) == (4, 1, 2, 1)
    c = tiny_config(mesh__data=2, mesh__fsdp=-1, mesh__tensor=2)
    assert mesh_shape(c, 8) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    assert mesh_shape(c, 4) == {"data": 2, "fsdp": 1, "tensor": 2, "expert": 1}
    assert math.prod(mesh_shape(tiny_config(), 8).values()) == 8
    # without n_devices the mesh is left as written
    assert finalize(c).mesh.fsdp == -1


# ----------------------------------------------------------------------------- validation

def test_d_model_not_divisible_by_n_heads(tiny_config):
    expect_error(tiny_config(model__d_model=60, model__n_heads=8), "model.d_model", match="n_heads")


def test_n_heads_not_divisible_by_n_kv_heads(tiny_config):
    expect_error(tiny_config(model__n_heads=4, model__n_kv_heads=3), "model.n_heads", match="n_kv_heads")


def test_seq_len_exceeds_max_seq_len(tiny_config):
    expect_error(tiny_config(model__seq_len=32, model__max_seq_len=16), "model.seq_len", match="max_seq_len")
    finalize(tiny_config(model__seq_len=16, model__max_seq_len=16))  # equal is fine


@pytest.mark.parametrize("field, value", [
    ("model.vocab_size", 0), ("model.seq_len", -1), ("model.d_model", 0), ("model.n_layers", 0),
    ("model.n_heads", -4), ("model.chunk_size", 0), ("model.rope_theta", 0.0), ("model.norm_eps", -1e-6),
    ("model.init_std", 0.0),
    ("model.n_kv_heads", 0), ("model.head_dim", -8), ("model.d_ff", 0), ("model.max_seq_len", 0),
    ("train.steps", 0), ("train.batch_size", 0), ("train.grad_accum", 0), ("train.lr", 0.0),
    ("train.log_every", 0), ("train.eval_every", -1), ("train.eval_batches", 0),
    ("train.ckpt_every", 0), ("train.keep_ckpts", 0),
    ("train.warmup_steps", -1), ("train.weight_decay", -0.1), ("train.clip_norm", -1.0),
    ("train.min_lr_ratio", -0.1), ("train.min_lr_ratio", 1.5), ("train.eps", -1e-8),
    ("train.b1", 1.0), ("train.b2", -0.1),
    ("data.val_fraction", 0.0), ("data.val_fraction", 1.0),
    ("flops.peak_flops", 0.0), ("flops.peak_flops", -1e12),
])
def test_nonpositive_and_out_of_range_values(tiny_config, field, value):
    section, name = field.split(".")
    expect_error(tiny_config(**{f"{section}__{name}": value}), field)


@pytest.mark.parametrize("field", ["train.warmup_steps", "train.weight_decay", "train.clip_norm",
                                   "train.min_lr_ratio", "train.eps"])
def test_zero_allowed_where_documented(tiny_config, field):
    section, name = field.split(".")
    finalize(tiny_config(**{f"{section}__{name}": 0}))


@pytest.mark.parametrize("field, value", [
    ("model.mixer", "mamba9000"), ("model.ffn", "kan"), ("model.remat", "some"),
    ("model.dtype", "float8"), ("model.param_dtype", "int8"), ("data.source", "web"),
    ("data.memmap_dtype", "int64"), ("flops.attention", "half"),
])
def test_unknown_choices(tiny_config, field, value):
    section, name = field.split(".")
    msg = expect_error(tiny_config(**{f"{section}__{name}": value}), field)
    assert repr(value) in msg


def test_unknown_mixer_in_layer_pattern_and_pattern_length(tiny_config):
    expect_error(tiny_config(model__layer_pattern=("attention", "nope")), "model.layer_pattern")
    expect_error(tiny_config(model__layer_pattern=("attention", "attention"), model__n_layers=3),
                 "model.n_layers", match="layer_pattern")
    finalize(tiny_config(model__layer_pattern=("attention", "attention"), model__n_layers=4))


def test_batch_not_divisible_by_grad_accum(tiny_config):
    expect_error(tiny_config(train__batch_size=6, train__grad_accum=4), "train.batch_size", match="grad_accum")


def test_microbatch_not_divisible_by_data_parallel_size(tiny_config):
    # 8 devices, data=-1 -> dp = 8; microbatch = 16 / 4 = 4 sequences
    msg = expect_error(tiny_config(train__batch_size=16, train__grad_accum=4, mesh__data=-1),
                       "train.batch_size", n_devices=8, match="data-parallel")
    assert "4" in msg and "8" in msg
    # fine on fewer devices, or with accumulation that leaves 8 per microbatch
    finalize(tiny_config(train__batch_size=16, train__grad_accum=4, mesh__data=-1), 4)
    finalize(tiny_config(train__batch_size=16, train__grad_accum=2, mesh__data=-1), 8)
    # fsdp and expert count as data parallel too
    expect_error(tiny_config(train__batch_size=4, mesh__data=1, mesh__fsdp=4, mesh__expert=2),
                 "train.batch_size", n_devices=8)


def test_mesh_product_mismatch(tiny_config):
    expect_error(tiny_config(mesh__data=2, mesh__fsdp=2), "mesh", n_devices=8, match="8")
    expect_error(tiny_config(mesh__data=-1, mesh__tensor=3), "mesh.data", n_devices=8)  # 3 does not divide 8
    with pytest.raises(ConfigError, match="mesh"):
        mesh_shape(tiny_config(mesh__data=4), 8)


def test_two_free_mesh_axes(tiny_config):
    msg = expect_error(tiny_config(mesh__data=-1, mesh__fsdp=-1), "mesh.fsdp", n_devices=8)
    assert "-1" in msg
    expect_error(tiny_config(mesh__data=0), "mesh.data", n_devices=8)
    expect_error(tiny_config(mesh__tensor=-2), "mesh.tensor", n_devices=8)


def test_n_heads_not_divisible_by_tensor(tiny_config):
    expect_error(tiny_config(model__d_model=96, model__n_heads=6, model__d_ff=128, mesh__data=-1,
                             mesh__tensor=4), "model.n_heads", n_devices=8, match="mesh.tensor")
    expect_error(tiny_config(model__n_kv_heads=1, mesh__data=-1, mesh__tensor=2),
                 "model.n_kv_heads", n_devices=8, match="mesh.tensor")
    expect_error(tiny_config(model__d_model=48, model__n_heads=4, mesh__data=1, mesh__fsdp=-1,
                             train__batch_size=32),
                 "model.d_model", n_devices=32, match="mesh.fsdp")
    expect_error(tiny_config(model__vocab_size=258, model__d_ff=128, mesh__data=-1, mesh__tensor=4),
                 "model.vocab_size", n_devices=8)
    finalize(tiny_config(mesh__data=-1, mesh__tensor=4), 8)  # 4 heads over 4 devices is fine


@pytest.mark.parametrize("source", ["text", "memmap"])
def test_data_source_needs_path(tiny_config, source):
    expect_error(tiny_config(data__source=source), "data.path", match=source)
    finalize(tiny_config(data__source=source, data__path="/tmp/x.txt"))


# ----------------------------------------------------------------------------- locking

def test_locked_config_rejects_unknown_fields_and_wrong_types():
    c = default_config()
    with pytest.raises(AttributeError):
        c.model.n_layer = 3  # typo
    with pytest.raises(KeyError):
        c.model["n_layer"] = 3
    with pytest.raises(AttributeError):
        c.not_a_section = {}
    with pytest.raises(TypeError):
        c.model.d_model = "64"
    with pytest.raises(TypeError):
        c.model.n_kv_heads = "2"  # typed placeholder: int or None
    c.model.n_kv_heads = 2
    c.model.n_kv_heads = None  # None-able
    c.train.lr = 1  # int is accepted for a float field
    assert isinstance(c.train.lr, (int, float))


# ----------------------------------------------------------------------------- CLI overrides

CONFIG_FILE = '''
def get_config(arg=None):
    from efficient_arch.config import default_config
    c = default_config()
    if arg == "tiny":
        c.model.d_model = 64
        c.model.n_layers = 2
        c.model.seq_len = 32
    return c
'''


def parse_cli(argv):
    """Parse argv exactly as ``efficient-arch train`` does (argv[0] is the program name)."""
    return cli.parse_args("train", argv[1:]).config


@pytest.fixture
def config_file(tmp_path):
    p = tmp_path / "cfg.py"
    p.write_text(CONFIG_FILE)
    return str(p)


def test_cli_overrides_parse_typed_fields(config_file):
    cfg = parse_cli(["prog", f"--config={config_file}:tiny", "--config.model.n_layers=3",
                     "--config.model.n_kv_heads=2", "--config.flops.peak_flops=1e12",
                     "--config.data.source=memmap", "--config.data.path=/data/x.bin",
                     "--config.model.tie_embeddings=false",
                     "--config.train.lr=1e-3"])
    assert cfg.model.d_model == 64 and cfg.model.seq_len == 32  # from get_config("tiny")
    assert cfg.model.n_layers == 3 and type(cfg.model.n_layers) is int
    assert cfg.model.n_kv_heads == 2 and type(cfg.model.n_kv_heads) is int  # typed placeholder
    assert cfg.flops.peak_flops == 1e12 and type(cfg.flops.peak_flops) is float
    assert cfg.data.path == "/data/x.bin"
    assert cfg.model.tie_embeddings is False
    assert cfg.train.lr == 1e-3
    f = finalize(cfg)
    assert f.model.n_kv_heads == 2 and f.model.head_dim == 16
    # an int literal for a float placeholder still becomes a float
    assert type(parse_cli(["prog", f"--config={config_file}", "--config.flops.peak_flops=5"]).flops.peak_flops) is float


def test_cli_tuple_placeholder(config_file):
    cfg = parse_cli(["prog", f"--config={config_file}", "--config.model.layer_pattern=('attention','attention')"])
    assert cfg.model.layer_pattern == ("attention", "attention")
    assert finalize(cfg).model.n_layers == 4


def test_cli_rejects_unknown_fields_and_bad_values(config_file, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(["prog", f"--config={config_file}", "--config.model.n_layer=3"])
    assert exc.value.code == 2
    assert re.search(r"unknown config field 'n_layer' in --config.model.n_layer\b", capsys.readouterr().err)
    with pytest.raises(SystemExit) as exc:
        parse_cli(["prog", f"--config={config_file}", "--config.model.n_layers=three"])
    assert exc.value.code == 2 and "n_layers" in capsys.readouterr().err


def test_cli_none_restores_placeholder(config_file):
    cfg = parse_cli(["prog", f"--config={config_file}", "--config.model.n_kv_heads=2",
                     "--config.model.n_kv_heads=None", "--config.flops.peak_flops=None"])
    assert cfg.model.n_kv_heads is None and cfg.flops.peak_flops is None
    assert finalize(cfg).model.n_kv_heads == cfg.model.n_heads  # derived default restored


def test_cli_none_for_str_placeholder_is_none(config_file):
    cfg = parse_cli(["prog", f"--config={config_file}", "--config.data.path=/x", "--config.data.path=None"])
    assert cfg.data.path is None


def test_cli_none_for_non_placeholder_is_rejected_by_validation(config_file):
    cfg = parse_cli(["prog", f"--config={config_file}", "--config.model.n_heads=None"])
    with pytest.raises(ConfigError, match="model.n_heads"):
        finalize(cfg)


@pytest.mark.skipif(not (REPO_ROOT / "experiments/configs/transformer.py").exists(),
                    reason="experiments/configs/transformer.py not written yet")
def test_cli_with_repo_transformer_config():
    cfg = parse_cli(["prog", f"--config={REPO_ROOT}/experiments/configs/transformer.py:tiny",
                     "--config.model.n_layers=3", "--config.model.n_kv_heads=2",
                     "--config.flops.peak_flops=1e12"])
    assert cfg.model.n_layers == 3 and cfg.model.n_kv_heads == 2 and cfg.flops.peak_flops == 1e12
    f = finalize(cfg)
    assert f.model.n_heads % f.model.n_kv_heads == 0


def test_mixer_form_a_mixer_does_not_run(tiny_config):
    c = tiny_config(model__mixer="deltanet", model__mixer_form="quadratic")
    with pytest.raises(ConfigError, match=r"model.mixer_form.*deltanet"):
        finalize(c)


def test_cudnn_attention_off_gpu_is_a_config_error(tiny_config):
    """Refused before anything compiles or any workdir exists (it used to fail while tracing)."""
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN can run here")
    with pytest.raises(ConfigError, match="config.model.attention_impl='cudnn'.*needs a GPU"):
        finalize(tiny_config(model__attention_impl="cudnn"), 1)
