"""Pretrain stage: flow-matching text-to-image training (Lightning) on curated shards."""
