#!/usr/bin/env python
"""Encode every prepared subject (train, val and test) into one latents HDF5 file.

Stores the posterior mu and logvar (unscaled), subject ids, class, split, label maps when
present, each subject's own prepared affine, per-channel mean/std of mu over all latent voxels
of the training split, the scale factor 1/std (all channels together), the prepared grid and the
sha256 of vae.pt. With inpainting masks in the manifest: the prepared masks and ``voided_mu``,
the posterior mean of each image with its mask region set to 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medldm.autoencoder import networks as ae
from medldm.data import cohort, h5layout
from medldm.data.cohort import load_prepared
from medldm.errors import InputError, run_cli
from medldm.provenance import sha256_file
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings


def voided_latents(net, images, labels, masks, n_labels: int, device, inference: dict,
                   only_labels: bool = False) -> np.ndarray:
    """Posterior means (b, C, d, h, w) of ``images`` with their ``masks`` voxels set to 0 (paired
    label maps too: label 0 there; the label maps alone for a label-map autoencoder)."""
    keep = 1 - masks.to(images.dtype)
    labels = None if labels is None else labels * (1 - masks).to(labels.dtype)
    images = None if only_labels else images * keep[:, None]
    return next(ae.encode_set(net, images, labels, n_labels, device, inference, progress=False))[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vae", required=True, type=Path, help="vae.pt from train_vae")
    parser.add_argument("--manifest", required=True, type=Path, help="results/prepared/manifest.tsv")
    parser.add_argument("--settings", required=True, help="the vae's inference section (JSON or YAML file)")
    parser.add_argument("--batching", help="inference batch sizes overriding --settings' (JSON; the workflow "
                        "passes them apart as they do not change the latents)")
    parser.add_argument("--out", required=True, type=Path, help="latents.h5 to write")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    setup_logging()
    inference = load_settings(args.settings) | (load_settings(args.batching) if args.batching else {})
    device = pick_device(args.device)
    net, vae = ae.load_vae(args.vae, device)
    paired, only_labels = vae["settings"]["paired_labels"], ae.labels_only(vae["settings"])

    data = load_prepared(args.manifest, vae["classes"])
    if only_labels and data.labels is None:
        raise InputError(f"{args.vae} encodes label maps (vae inputs: labels) but {args.manifest} has none: "
                         "add a label column to the sample sheet")
    if list(data.shape) != list(vae["grid_shape"]):
        raise InputError(
            f"{args.manifest}: prepared shape {list(data.shape)} differs from the {vae['grid_shape']} "
            f"{args.vae} was trained on; retrain the autoencoder after changing prepare settings"
        )
    if data.channel_names != ae.image_channel_names(vae):
        raise InputError(
            f"{args.manifest}: image channels {data.channel_names} differ from {ae.image_channel_names(vae)} "
            f"{args.vae} was trained on; retrain the autoencoder after changing image_channels"
        )
    header = h5layout.Header(
        grid_affine=data.affine, grid_shape=data.shape, class_names=vae["classes"], label_names=vae["labels"],
        settings={"vae": vae["settings"], "prepare": vae["prepare"]}, vae_sha256=sha256_file(args.vae),
        image_channels=data.channel_names if len(data.channel_names) > 1 else [],
    )
    stats = ae.LatentStats(vae["latent_shape"][0])
    n_labels = len(vae["labels"])
    masks = data.masks
    with h5layout.create_latents(args.out, len(data), vae["latent_shape"], header,
                                 label_shape=None if data.labels is None else data.shape,
                                 mask_shape=None if masks is None else data.shape,
                                 with_voided=masks is not None) as writer:
        size = inference["batch_size"]
        for start, images, labels in tqdm(cohort.batches(data, size), total=-(-len(data) // size), desc="encoding",
                                          unit="batch", disable=None):  # one batch of subjects in memory
            encoder_labels = labels if paired or only_labels else None
            _, mu, logvar = next(ae.encode_set(net, None if only_labels else images, encoder_labels, n_labels,
                                               device, inference, progress=False))
            if masks is not None:
                mask = torch.stack([masks[i] for i in range(start, start + len(images))])
                voided = voided_latents(net, images, encoder_labels, mask, n_labels, device, inference, only_labels)
            for j in range(len(mu)):
                i = start + j
                label = None if labels is None else labels[j].numpy()
                extra = {} if masks is None else {"mask": mask[j].numpy(), "voided_mu": voided[j]}
                writer.append(data.subject_ids[i], int(data.class_index[i]), data.splits[i],
                              affine=data.affines[i], mu=mu[j], logvar=logvar[j], label=label, **extra)
                if data.splits[i] == "train":
                    stats.add(mu[j : j + 1])
        mean, std, scale = stats.result()
        writer.set_latent_stats(mean, std, scale)
    print(f"{args.out}: {len(data)} latents of shape {vae['latent_shape']}; "
          f"train channel mean {np.round(mean, 4).tolist()}, std {np.round(std, 4).tolist()}, "
          f"scale factor {scale:.4f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
