"""Recipes shipped with reelforge: YAML data, one file per recipe (see components.config)."""
