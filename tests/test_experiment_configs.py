"""Every experiments/configs file builds at every size, validates, and matches the transformer's
*active* parameter count within 10% (the families are compared at equal size; for dense models
active = total, MoE configs are compared at equal active parameters)."""

import pytest

from conftest import REPO_ROOT

from efficient_arch.config import finalize, load_config
from efficient_arch.models.lm import count_params

CONFIGS = sorted(p.name for p in (REPO_ROOT / "experiments/configs").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_matches_transformer_params(name, size):
    cfg = finalize(load_config(REPO_ROOT / "experiments/configs" / name, size), 1)
    ref = finalize(load_config(REPO_ROOT / "experiments/configs/transformer.py", size), 1)
    n, n_ref = count_params(cfg.model)["n_active_params"], count_params(ref.model)["n_params"]
    assert abs(n / n_ref - 1) <= 0.10, (name, size, n, n_ref)


def test_unknown_size_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        load_config(REPO_ROOT / "experiments/configs/gla.py", "huge")
