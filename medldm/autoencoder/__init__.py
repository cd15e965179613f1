"""The autoencoder stage: networks, losses, encode/decode, training."""
