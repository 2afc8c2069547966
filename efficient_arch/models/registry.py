"""Name -> sequence-mixer / FFN class. Adding an architecture = one file + one line here.

Entries are ``"module:Class"`` strings imported on first use, so importing the registry is cheap
and config validation can list the known names without building anything.
"""

from __future__ import annotations

import importlib

MIXERS: dict[str, str] = {
    "attention": "efficient_arch.models.mixers.attention:Attention",
    "linear_attention": "efficient_arch.models.mixers.linear_attention:LinearAttention",
    "retnet": "efficient_arch.models.mixers.retnet:Retention",
    "gla": "efficient_arch.models.mixers.gla:GLA",
    "mamba2": "efficient_arch.models.mixers.mamba2:Mamba2",
    "deltanet": "efficient_arch.models.mixers.deltanet:DeltaNet",
    "gated_deltanet": "efficient_arch.models.mixers.gated_deltanet:GatedDeltaNet",
    "based": "efficient_arch.models.mixers.based:Based",
    "sliding_window": "efficient_arch.models.mixers.sliding_window:SlidingWindowAttention",
}

FFNS: dict[str, str] = {
    "mlp": "efficient_arch.models.layers:MLP",
    "moe": "efficient_arch.models.moe:MoE",
}


def _load(table: dict[str, str], kind: str, name: str):
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered: {sorted(table)}")
    module, cls = table[name].split(":")
    return getattr(importlib.import_module(module), cls)


def mixer_names() -> list[str]:
    """Registered sequence-mixer names (values of ``config.model.mixer`` / ``layer_pattern``)."""
    return list(MIXERS)


def ffn_names() -> list[str]:
    """Registered FFN names (values of ``config.model.ffn``)."""
    return list(FFNS)


def get_mixer(name: str):
    """Return the mixer class for ``name``; KeyError listing the registered names if unknown."""
    return _load(MIXERS, "sequence mixer", name)


def get_ffn(name: str):
    """Return the FFN class for ``name``; KeyError listing the registered names if unknown."""
    return _load(FFNS, "ffn", name)
