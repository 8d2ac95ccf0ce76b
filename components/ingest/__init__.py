"""Ingest stage: pull raw files and captions from a source into raw tar shards + a manifest."""
