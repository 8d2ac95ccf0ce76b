"""Distill stage: a few-step, guidance-free student from an ensemble of teachers."""
