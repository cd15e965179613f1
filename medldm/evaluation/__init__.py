"""Evaluation: FID/KID, MS-SSIM and reconstruction metrics, train-on-synthetic classifier."""
