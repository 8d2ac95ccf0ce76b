"""Retraining from the registry's champion (pipelines/retraining.py)."""
