"""Model code for reelforge: the DiT generator, flow matching, text encoder, checkpoints and Lightning training."""
