"""medldm: latent-diffusion synthesis of 3D medical images."""

__version__ = "0.1.0"
