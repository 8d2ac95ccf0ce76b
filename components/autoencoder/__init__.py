"""Autoencoder stage: the latent space the generator trains in (Movie Gen TAE)."""
