"""Evaluation: image-quality, diversity and prompt-alignment metrics for generated samples."""
