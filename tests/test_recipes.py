"""explorer.recipes: the per-model default recovery recipes chosen by bench/recipe.py."""
from __future__ import annotations

from dataclasses import fields

import pytest

from explorer.config import RECOVERY, PruneConfig, validate
from explorer.recipes import RECIPES, recipe_for

PRUNE_FIELDS = {f.name for f in fields(PruneConfig)}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_fields_are_valid_prune_config(name):
    recipe = recipe_for(name)
    assert recipe, name
    assert set(recipe) <= PRUNE_FIELDS, set(recipe) - PRUNE_FIELDS
    assert recipe["recovery"] in RECOVERY
    validate(PruneConfig(**recipe))  # choices and ranges of every field


def test_builtin_models_have_recipes():
    assert {"minilm-rt", "smollm2-135m"} <= set(RECIPES)


def test_unknown_model_has_no_recipe():
    assert recipe_for("no-such-model") == {}
    assert recipe_for("") == {}


def test_recipe_for_returns_a_copy():
    r = recipe_for("minilm-rt")
    r["lr"] = 123.0
    assert recipe_for("minilm-rt").get("lr") != 123.0


def test_recipe_for_normalises_the_name():
    assert recipe_for("MiniLM-RT") == recipe_for("minilm-rt")
    assert recipe_for(" smollm2-135m ") == recipe_for("smollm2-135m")


def test_extra_fallbacks_are_valid_prune_config():
    from explorer.recipes import EXTRA
    for name, extra in EXTRA.items():
        for recipe in extra.values():
            assert set(recipe) <= PRUNE_FIELDS
            validate(PruneConfig(**recipe))
