"""Curate stage: decode, validate, filter, dedup, resize and shard; a funnel report explains it all."""
