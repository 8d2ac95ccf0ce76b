"""Recipe sections of the training stages: stages, latent space, hardware; and the Lightning strategy they pick."""

from __future__ import annotations

import pytest

from components.config import RecipeError, load_recipe
from components.training import lightning_strategy


def test_demo_recipe_pretrains_in_stages_in_a_4x_latent_space():
    recipe = load_recipe("demo")
    assert recipe.latent_factors() == (4, 4, 8)
    stages = recipe.pretrain.resolved_stages()
    assert [(s.name, s.media) for s in stages] == [("t2i", "image"), ("joint", "joint")]
    joint = recipe.pretrain.train_config("joint")
    assert joint.lr == 5e-4 and joint.batch_size == recipe.pretrain.batch_size  # stage override, section default


def test_no_stages_means_one_image_stage_with_the_section_values():
    recipe = load_recipe("tiny", {"pretrain.stages": [], "pretrain.steps": 11})
    (stage,) = recipe.pretrain.resolved_stages()
    assert (stage.name, stage.media) == ("t2i", "image")
    assert recipe.pretrain.train_config("t2i").steps == 11
    with pytest.raises(ValueError, match="no pretrain stage 'joint'"):
        recipe.pretrain.stage("joint")


@pytest.mark.parametrize("overrides, message", [
    ({"pretrain.stages": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"pretrain.stages": [{"name": "big", "resolution": 64}]}, "above curate.resolution"),
    ({"pretrain.stages": [{"name": "odd", "resolution": 10}]}, "multiple of 4"),
    ({"pretrain.stages": [{"name": "v", "media": "video", "frames": 4}]}, "frames 4 must be 1 \\+ a multiple"),
    ({"pretrain.stages": [{"name": "Bad Name"}]}, "pattern"),
    ({"autoencoder.kind": "pixel"}, "in_channels 4 conflicts"),
    ({"model.overrides": {"in_channels": 4, "image_size": 16, "patch_size": 2}}, "image_size 16"),
    ({"autoencoder.overrides": {"latent_chanels": 4}}, "unknown AutoencoderConfig"),
    ({"pretrain.strategy": "fsdp", "pretrain.accelerator": "cpu"}, "fsdp needs GPUs"),
    ({"pretrain.devices": 2}, "need strategy ddp or fsdp"),
    ({"quality_tune.val_every": 0}, "needs val_every"),
])
def test_inconsistent_training_settings_fail_naming_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("tiny", overrides)


def test_strategies_map_to_lightning_with_fsdp_sharding_every_block():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from models.dit.model import DiTBlock

    assert lightning_strategy(load_recipe("tiny").pretrain) == "auto"
    ddp = lightning_strategy(load_recipe("tiny", {"pretrain.strategy": "ddp", "pretrain.devices": 2}).pretrain)
    assert isinstance(ddp, DDPStrategy)
    fsdp = lightning_strategy(load_recipe("tiny", {"pretrain.strategy": "fsdp", "pretrain.devices": 8,
                                                   "pretrain.num_nodes": 4}).pretrain)
    assert isinstance(fsdp, FSDPStrategy)
    assert fsdp._state_dict_type == "full"  # checkpoints stay one safetensors file set, loadable on one device
    policy = fsdp.kwargs["auto_wrap_policy"] if "auto_wrap_policy" in fsdp.kwargs else fsdp.auto_wrap_policy
    assert DiTBlock in getattr(policy, "_module_classes", policy)
