"""Diffusion backbones that MONAI does not provide."""
