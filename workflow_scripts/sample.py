#!/usr/bin/env python
"""Sample one named sample set from ldm.pt and write its latents.h5 (unscaled, ready to decode).

The volumes depend only on the sample set's settings: the same seed gives the same volumes.
Refuses a vae.pt other than the one the diffusion model was trained against.
An inpaint set (`task: inpaint`) fills the masks of the real rows of a split (--real: the
autoencoder's latents.h5), `draws` latents per row, each row keeping its source's id, class,
split, affine and mask.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medldm.data import h5layout
from medldm.diffusion import inpainting
from medldm.diffusion import process as diffusion
from medldm.errors import InputError, run_cli
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings, require

log = logging.getLogger("sample")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ldm", required=True, type=Path, help="ldm.pt from train_ldm")
    parser.add_argument("--vae", required=True, type=Path, help="the vae.pt that will decode the samples")
    parser.add_argument("--settings", required=True, help="the config's sample_sets.<name> section (JSON or YAML)")
    parser.add_argument("--name", default="samples", help="sample set name (recorded in the file)")
    parser.add_argument("--real", type=Path, help="the autoencoder's latents.h5 with masks (inpaint sets)")
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
    run = {"sampler": sampler, "steps": require(settings, "steps", where),
           "guidance_scale": require(settings, "guidance_scale", where), "seed": require(settings, "seed", where),
           "batch_size": require(settings, "batch_size", where), "device": device}
    header = h5layout.Header(
        grid_affine=ldm.grid_affine, grid_shape=ldm.grid_shape, class_names=ldm.class_names,
        label_names=ldm.label_names, scale_factor=ldm.scale_factor, vae_sha256=ldm.vae_sha256,
        settings={"sample_set": args.name, **settings, "sampler": sampler, "ldm": str(args.ldm),
                  "ldm_latents_sha256": ldm.latents_sha256},
    )
    if settings.get("task", "generate") == "inpaint":
        latents = write_inpaint_set(ldm, settings, args.real, header, args.out, run, where)
    else:
        latents = write_generated_set(ldm, settings, header, args.out, run, where)
    log.info("wrote %d latents (%s, %d steps, guidance %s) to %s", len(latents), sampler, settings["steps"],
             settings["guidance_scale"], args.out)
    return 0


def write_generated_set(ldm, settings, header, out, run, where):
    classes = diffusion.allocate_classes(require(settings, "n", where), ldm.class_names,
                                         settings.get("class"), settings.get("class_proportions"))
    latents = diffusion.generate(ldm, classes, **run)
    with h5layout.create_latents(out, len(latents), ldm.latent_shape, header, with_logvar=False) as writer:
        for i, (latent, cls) in enumerate(zip(latents, classes, strict=True)):
            # no source subject: affine=None places the volume on the grid's reference affine
            writer.append(f"syn-{i:05d}", int(cls), "synthetic", affine=None, mu=latent)
        set_stats(writer, latents, ldm)
    return latents


def write_inpaint_set(ldm, settings, real, header, out, run, where):
    """Rows `<source id>-inp<k>`, with the source's id, class, split, affine and mask."""
    if real is None:
        raise InputError(f"{where} has task inpaint: give the autoencoder's latents.h5 with --real")
    done = inpainting.inpaint_set(ldm, real, method=require(settings, "method", where),
                                  split=require(settings, "split", where), draws=require(settings, "draws", where),
                                  repaint_settings=settings.get("repaint"), **run)
    with h5layout.open_latents(real) as f, h5layout.create_latents(
            out, len(done.latents), ldm.latent_shape, header, with_logvar=False, mask_shape=f.mask.shape[1:],
            with_source=True) as writer:
        for latent, j, k in zip(done.latents, done.source_rows, done.draws, strict=True):
            source = f.subject_ids[j]
            writer.append(f"{source}-inp{k}", int(f.class_index[j]), f.splits[j], affine=f.affines[j],
                          source_id=source, mu=latent, mask=f.mask[j])
        set_stats(writer, done.latents, ldm)
    return done.latents


def set_stats(writer, latents, ldm):
    axes = (0, *range(2, latents.ndim))
    writer.set_latent_stats(latents.mean(axis=axes), latents.std(axis=axes), ldm.scale_factor)


if __name__ == "__main__":
    run_cli(main)
