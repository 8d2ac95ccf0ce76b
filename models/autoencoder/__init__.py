"""Causal convolutional VAE (Movie Gen's temporal autoencoder): images are 1-frame videos."""

from models.autoencoder.model import PRESETS, Autoencoder, AutoencoderConfig, build, parameter_count

__all__ = ["PRESETS", "Autoencoder", "AutoencoderConfig", "build", "parameter_count"]
