#!/usr/bin/env python
"""Score an inpainted set inside its masks against the original prepared volumes: SSIM, PSNR and
MSE per volume (mean and bootstrap 95 % interval), the same for two baselines (the autoencoder's
decoding of the voided image, and a fill with the mean known foreground intensity, both pasted
back like the set), and the largest change outside the masks (0 with paste-back).
See medldm/evaluation/inpainting.py."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np

from medldm.autoencoder import networks as ae
from medldm.data import h5layout
from medldm.data.cohort import load_prepared
from medldm.data.masks import paste_back
from medldm.errors import InputError, run_cli
from medldm.evaluation.inpainting import masked_metrics, mean_fill, score_methods
from medldm.io import atomic_path, write_json
from medldm.provenance import check_autoencoder, provenance
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings

log = logging.getLogger("evaluate_inpainting")
METHODS = ("inpainted", "autoencoder", "mean_fill")


def decode_voided(vae_path: Path, latents_path: Path, sources: list[str], inference: dict, device) -> dict:
    """{source_id: the autoencoder's decoding of that row's voided image} from the real latents."""
    net, _ = ae.load_vae(vae_path, device)
    with h5layout.open_latents(latents_path) as latents:
        check_autoencoder(vae_path, latents.header.vae_sha256, latents.path, "pass the autoencoder that encoded it")
        if latents.voided_mu is None:
            raise InputError(f"{latents_path}: no voided_mu (latents of the voided images); the prepared data has no "
                             "masks, or the file predates them: re-run export_latents")
        row_of = {sid: i for i, sid in enumerate(latents.subject_ids)}
        missing = [s for s in sources if s not in row_of]
        if missing:
            raise InputError(f"{latents_path}: no row for source_id {missing[:5]}; re-run export_latents")
        voided = np.stack([latents.voided_mu[row_of[s]] for s in sources])
    images = np.concatenate([batch for _, batch, _ in ae.decode_set(net, voided, inference, device)])
    return dict(zip(sources, images, strict=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", required=True, type=Path, help="the inpainted set's volumes.h5 (decode)")
    parser.add_argument("--latents", required=True, type=Path, help="the autoencoder's latents.h5 (with voided_mu)")
    parser.add_argument("--vae", required=True, type=Path, help="vae.pt that encoded --latents")
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--settings", required=True,
                        help='JSON or YAML: {"inference": the vae\'s inference section, "blend_voxels": int, '
                             '"bootstrap": replicates, "seed": int}')
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out-json", required=True, type=Path)
    parser.add_argument("--out-csv", required=True, type=Path, help="per-volume metrics of every method")
    args = parser.parse_args(argv)
    setup_logging()
    settings = load_settings(args.settings)
    blend = int(settings.get("blend_voxels", 0))
    with h5layout.open_volumes(args.volumes) as volumes:
        if volumes.mask is None or volumes.source_ids is None:
            raise InputError(f"{args.volumes}: not an inpainted set (no mask or source_id); inpainting is scored only "
                             "for sample sets with task: inpaint")
        ids, sources = volumes.subject_ids, volumes.source_ids
        inpainted, masks = volumes.channel(0)[:], volumes.mask[:]
        class_names = volumes.header.class_names
    if not ids:
        raise InputError(f"{args.volumes}: no volumes to score")
    real = load_prepared(args.manifest, class_names, with_labels=False)
    row_of = {sid: i for i, sid in enumerate(real.subject_ids)}
    missing = sorted(set(sources) - set(row_of))
    if missing:
        raise InputError(f"{args.volumes}: source_id {missing[:5]} not in {args.manifest}; sample the set again")
    unique = list(dict.fromkeys(sources))
    voided = decode_voided(args.vae, args.latents, unique, settings["inference"], pick_device(args.device))

    per_volume: dict[str, list[dict]] = {m: [] for m in METHODS}
    for i, (sid, src) in enumerate(zip(ids, sources, strict=True)):
        original, mask = real.volume(row_of[src]), masks[i]
        fills = {"inpainted": inpainted[i],
                 "autoencoder": paste_back(voided[src], original, mask, blend),
                 "mean_fill": paste_back(mean_fill(original, mask), original, mask, blend)}
        for method, volume in fills.items():
            per_volume[method].append({"volume": sid, "source_id": src, "mask_voxels": int(mask.sum()),
                                       **masked_metrics(volume, original, mask)})
    result = {
        "n_volumes": len(ids), "n_sources": len(unique), "blend_voxels": blend,
        "methods": score_methods(per_volume, int(settings.get("bootstrap", 1000)), int(settings.get("seed", 0))),
        "provenance": provenance(settings, {"volumes": args.volumes, "latents": args.latents, "vae": args.vae}),
    }
    write_json(args.out_json, result)
    with atomic_path(args.out_csv) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, ["method", *per_volume["inpainted"][0]])
        writer.writeheader()
        for method, rows in per_volume.items():
            writer.writerows({"method": method, **row} for row in rows)
    for method, m in result["methods"].items():
        log.info("%-11s inside the mask: SSIM %.4f (%.4f-%.4f), PSNR %.2f dB, MSE %.5f; outside max |diff| %g",
                 method, m["ssim"]["mean"], m["ssim"]["ci_low"], m["ssim"]["ci_high"], m["psnr"]["mean"],
                 m["mse"]["mean"], m["outside_max_abs"])
    return 0


if __name__ == "__main__":
    run_cli(main)
