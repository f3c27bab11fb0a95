"""Per-model recipes: the named model selects one; flags and config keys still win; it is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from nestpatch.assets import get_asset
from nestpatch.errors import InputError
from nestpatch.train.config import TrainConfig
from nestpatch.train.recipes import RECIPES, apply_recipe, config_file_keys, recipe_for

Q05 = "qwen2.5-coder-0.5b"


def test_every_recipe_names_an_asset_and_real_fields() -> None:
    fields = set(TrainConfig().to_dict())
    for name, rec in RECIPES.items():
        assert get_asset(name).kind == "model"
        assert set(rec.settings) <= fields, set(rec.settings) - fields
        TrainConfig(model=name, out="x.nestpatch", **rec.settings).validate()


def test_the_named_model_or_its_file_selects_the_recipe() -> None:
    assert recipe_for(Q05) == Q05
    assert recipe_for(f"/somewhere/{get_asset(Q05).filename}") == Q05
    assert recipe_for("smollm2") is None
    assert recipe_for("/models/other.gguf") is None


def test_recipe_fills_defaults_but_not_explicit_values() -> None:
    settings = RECIPES[Q05].settings
    key = next(iter(settings))
    cfg, rec = apply_recipe(TrainConfig(model=Q05), explicit=set())
    assert cfg.recipe == Q05 and rec["name"] == Q05
    assert {k: getattr(cfg, k) for k in settings} == settings and rec["applied"] == settings
    # an explicit value wins even when it equals the plain default
    default = getattr(TrainConfig(), key)
    cfg2, rec2 = apply_recipe(TrainConfig(model=Q05), explicit={key})
    assert getattr(cfg2, key) == default and rec2["overridden"] == [key] and key not in rec2["applied"]


def test_library_callers_get_explicit_fields_from_non_default_values() -> None:
    settings = RECIPES[Q05].settings
    key, value = next(iter(settings.items()))
    other = value + 1 if isinstance(value, int) and not isinstance(value, bool) else (not value if isinstance(value, bool) else value)
    cfg, _ = apply_recipe(TrainConfig(model=Q05, **{key: other}))
    assert getattr(cfg, key) == other


def test_none_unknown_and_no_recipe() -> None:
    cfg = TrainConfig(model=Q05, recipe="none")
    assert apply_recipe(cfg)[0] == cfg
    with pytest.raises(InputError, match="--recipe"):
        apply_recipe(TrainConfig(model=Q05, recipe="nope"))
    cfg, rec = apply_recipe(TrainConfig(model="smollm2"))
    assert cfg.recipe == "none" and rec["applied"] == {}
    assert cfg.max_length == TrainConfig().max_length


def test_resolved_config_round_trips_without_reapplying(tmp_path: Path) -> None:
    cfg, _ = apply_recipe(TrainConfig(model=Q05, out="x.nestpatch", seed=1), explicit={"model", "out", "seed"})
    p = tmp_path / "saved.train.toml"
    p.write_text(cfg.to_toml(), encoding="utf-8")
    again = TrainConfig.from_toml(p)
    assert again == cfg
    again2, rec = apply_recipe(again, explicit=config_file_keys(p))
    assert again2 == cfg and rec["applied"] == {}


def test_config_file_keys_reads_top_level_and_train_table(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('model = "m"\n[train]\nmax-length = 64\n', encoding="utf-8")
    assert config_file_keys(p) == {"model", "max_length"}
