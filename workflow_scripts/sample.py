#!/usr/bin/env python
"""Sample one named sample set from ldm.pt and write its latents.h5 (unscaled, ready to decode).

The volumes depend only on the sample set's settings: the same seed gives the same volumes.
Refuses a vae.pt other than the one the diffusion model was trained against.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medldm.data import h5layout
from medldm.diffusion import process as diffusion
from medldm.errors import run_cli
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings, require

log = logging.getLogger("sample")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ldm", required=True, type=Path, help="ldm.pt from train_ldm")
    parser.add_argument("--vae", required=True, type=Path, help="the vae.pt that will decode the samples")
    parser.add_argument("--settings", required=True, help="the config's sample_sets.<name> section (JSON or YAML)")
    parser.add_argument("--name", default="samples", help="sample set name (recorded in the file)")
    parser.add_argument("--out", required=True, type=Path, help="latents.h5 to write")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    setup_logging()
    settings = load_settings(args.settings)
    where = f"sample set {args.name!r}"
    device = pick_device(args.device)
    ldm = diffusion.load_ldm(args.ldm, vae_path=args.vae, device=device)
    sampler = require(settings, "sampler", where)
    if sampler == "auto":
        sampler = "ddim" if ldm.strategy.name == "ddpm" else "rflow"
    classes = diffusion.allocate_classes(require(settings, "n", where), ldm.class_names,
                                         settings.get("class"), settings.get("class_proportions"))
    latents = diffusion.generate(
        ldm, classes, sampler=sampler, steps=require(settings, "steps", where),
        guidance_scale=require(settings, "guidance_scale", where), seed=require(settings, "seed", where),
        batch_size=require(settings, "batch_size", where), device=device,
    )
    header = h5layout.Header(
        grid_affine=ldm.grid_affine, grid_shape=ldm.grid_shape, class_names=ldm.class_names,
        label_names=ldm.label_names, scale_factor=ldm.scale_factor, vae_sha256=ldm.vae_sha256,
        settings={"sample_set": args.name, **settings, "sampler": sampler, "ldm": str(args.ldm),
                  "ldm_latents_sha256": ldm.latents_sha256},
    )
    with h5layout.create_latents(args.out, len(latents), ldm.latent_shape, header, with_logvar=False) as writer:
        for i, (latent, cls) in enumerate(zip(latents, classes, strict=True)):
            # no source subject: affine=None places the volume on the grid's reference affine
            writer.append(f"syn-{i:05d}", int(cls), "synthetic", affine=None, mu=latent)
        axes = (0, *range(2, latents.ndim))
        writer.set_latent_stats(latents.mean(axis=axes), latents.std(axis=axes), ldm.scale_factor)
    log.info("wrote %d latents (%s, %d steps, guidance %s) to %s", len(latents), sampler, settings["steps"],
             settings["guidance_scale"], args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
