"""Recipes are data: every shipped recipe loads, and mistakes fail loudly, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.config import Recipe, RecipeError, available_recipes, load_recipe


@pytest.mark.parametrize("name", available_recipes())
def test_every_shipped_recipe_loads_and_round_trips(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert Recipe.from_json(recipe.to_json()) == recipe
    spatial, _, channels = recipe.latent_factors()
    model = recipe.model_config_dict()
    assert model["image_size"] * spatial == recipe.curate.resolution and model["in_channels"] == channels


def test_demo_and_tiny_are_shipped() -> None:
    assert {"demo", "tiny"} <= set(available_recipes())


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_misspelled_key_names_the_key_and_suggests_the_right_one(tmp_path: Path) -> None:
    path = _write(tmp_path, {"name": "x", "pretrain": {"stepz": 10}})
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert str(path) in message
    assert "pretrain.stepz: unknown key" in message
    assert "did you mean 'pretrain.steps'" in message


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="pretrian: unknown key .*did you mean 'pretrain'"):
        load_recipe(_write(tmp_path, {"name": "x", "pretrian": {}}))


def test_bad_value_names_the_key_and_the_value(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"curate\.val_fraction: .*less than 1.*got 1\.5"):
        load_recipe(_write(tmp_path, {"name": "x", "curate": {"val_fraction": 1.5}}))


def test_conflicting_values_fail_with_both_keys(tmp_path: Path) -> None:
    data = {"name": "x", "curate": {"resolution": 64}, "model": {"preset": "demo"}}
    with pytest.raises(RecipeError, match="image_size 32 x autoencoder downsampling 1 conflicts with curate.resolution 64"):
        load_recipe(_write(tmp_path, data))


def test_unknown_model_override_is_rejected(tmp_path: Path) -> None:
    data = {"name": "x", "model": {"preset": "demo", "overrides": {"widht": 128}}}
    with pytest.raises(RecipeError, match=r"unknown DiTConfig field\(s\) \['widht'\]"):
        load_recipe(_write(tmp_path, data))


def test_unknown_recipe_name_lists_the_available_ones() -> None:
    with pytest.raises(RecipeError, match="no recipe named 'dmeo'; available: .*demo"):
        load_recipe("dmeo")


def test_dotted_overrides_apply_and_are_validated() -> None:
    assert load_recipe("tiny", {"pretrain.steps": 3}).pretrain.steps == 3
    with pytest.raises(RecipeError, match="pretrain.steps"):
        load_recipe("tiny", {"pretrain.steps": -1})


def test_flat_params_cover_every_leaf() -> None:
    params = load_recipe("demo").flat_params("pretrain")
    assert params["pretrain.steps"] == str(load_recipe("demo").pretrain.steps)
    assert params["pretrain.precision"] == "auto"
