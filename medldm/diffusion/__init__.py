"""The latent diffusion stage: processes, backbones, EMA, training and sampling."""
