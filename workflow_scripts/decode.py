#!/usr/bin/env python
"""Decode a latents HDF5 file (export_latents' real latents, or sampled ones) with vae.pt.

Writes volumes.h5 (a volumes file: all images, and label maps in paired-label mode; label maps
alone for a label-map autoencoder, ``inputs: labels``) and one NIfTI per volume,
<nifti-dir>/<id>/image.nii.gz (+ label.nii.gz, uint8), each with its row's affine (multi-channel
subjects: one NIfTI per channel, <nifti-dir>/<id>/<channel>.nii.gz; 2D images also as 8-bit
<id>/<channel>.png, see ``medldm.io.save_png``): a real subject's
reconstruction sits where that subject's prepared image sits; a generated volume (no source
subject) uses the prepared grid's reference affine (the first subject's). Label maps name their
labels in <nifti-dir>/labels.json ({"0": "background", ...}) and in each label.nii.gz header's
``descrip`` ("labels: 0=background 1=CSF ...", cut at 80 bytes).

Inpainted sets (latents with ``mask`` and ``source_id``): each decoded volume gets its source's
prepared voxels pasted back outside its mask (read through ``--manifest``), blended over
``blend_voxels`` (in ``--settings``) voxel layers inside the mask only, so the known tissue is exactly the input;
volumes.h5 keeps ``mask`` and ``source_id``.

Spatially conditioned sets (latents with ``label``: the maps the volumes were conditioned on):
volumes.h5 and <id>/label.nii.gz get those maps (rather than a paired-label decoder's own).

Scaling: every latents file holds UNSCALED latents (posterior mu, or samples already divided by
the scale factor once by the sampler when it wrote them), so decode feeds ``mu`` to the decoder
as stored and never multiplies or divides by ``scale_factor``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from medldm.autoencoder import networks as ae
from medldm.data import h5layout
from medldm.data.cohort import load_prepared
from medldm.data.masks import paste_back
from medldm.errors import InputError, run_cli
from medldm.io import save_nifti, save_png, write_json
from medldm.provenance import check_autoencoder
from medldm.runtime import pick_device, setup_logging
from medldm.settings import load_settings

log = logging.getLogger("decode")


def check_match(latents: h5layout.H5File, vae: dict, vae_path: Path) -> None:
    """The latents must come from this autoencoder (same hash when recorded, same shapes)."""
    recorded = latents.header.vae_sha256
    check_autoencoder(vae_path, recorded, latents.path,
                      "decode it with the vae.pt that encoded it, or re-run export_latents")
    if not recorded:
        log.warning("%s records no vae_sha256: cannot check it matches %s", latents.path, vae_path)
    if list(latents.mu.shape[1:]) != list(vae["latent_shape"]):
        raise InputError(
            f"{latents.path}: latent shape {list(latents.mu.shape[1:])} differs from {vae['latent_shape']} "
            f"of {vae_path}"
        )
    if list(latents.header.grid_shape) != list(vae["grid_shape"]):
        raise InputError(
            f"{latents.path}: grid_shape {list(latents.header.grid_shape)} differs from {vae['grid_shape']} "
            f"of {vae_path}"
        )


def source_volumes(latents: h5layout.H5File, manifest: Path | None, with_labels: bool):
    """{source_id: (prepared image (X, Y, Z), prepared label map or None)} of an inpainted set's sources."""
    if manifest is None:
        raise InputError(f"{latents.path}: inpainted volumes (mask and source_id) need --manifest, whose prepared "
                         "images are pasted back outside the masks")
    real = load_prepared(manifest, latents.header.class_names, with_labels=with_labels)
    row_of = {sid: i for i, sid in enumerate(real.subject_ids)}
    missing = sorted(set(latents.source_ids) - set(row_of))
    if missing:
        raise InputError(f"{latents.path}: source_id {missing[:5]} not in {manifest}; sample the set again from "
                         "this prepared data")
    return {sid: (real.volume(row_of[sid]),
                  None if real.labels is None else real.labels[row_of[sid]].numpy()) for sid in set(latents.source_ids)}


def label_names_text(names: list[str]) -> str:
    """The label names as a NIfTI ``descrip``: "labels: 0=background 1=CSF ..."."""
    return "labels: " + " ".join(f"{i}={name}" for i, name in enumerate(names))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", required=True, type=Path, help="vae.pt from train_vae")
    parser.add_argument("--latents", required=True, type=Path, help="latents.h5 (export_latents or sample)")
    parser.add_argument("--settings", required=True,
                        help="the vae's inference section (JSON or YAML file); for an inpainted set also "
                             "blend_voxels, the paste-back blend width inside the mask (default 0: a hard paste)")
    parser.add_argument("--out", required=True, type=Path, help="volumes.h5 to write")
    parser.add_argument("--nifti-dir", required=True, type=Path, help="folder for one NIfTI per volume")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="results/prepared/manifest.tsv: the sources pasted back into inpainted volumes")
    args = parser.parse_args(argv)
    setup_logging()
    inference = load_settings(args.settings)
    blend = int(inference.get("blend_voxels", 0))
    device = pick_device(args.device)
    net, vae = ae.load_vae(args.vae, device)
    only_labels = ae.labels_only(vae["settings"])
    paired = vae["settings"]["paired_labels"] or only_labels  # label maps come out
    channels = ae.image_channel_names(vae)

    with h5layout.open_latents(args.latents) as latents:
        check_match(latents, vae, args.vae)
        src = latents.header
        conditioned = latents.label is not None and latents.source_ids is not None and latents.mask is None
        with_labels = paired or conditioned
        header = h5layout.Header(
            grid_affine=src.grid_affine, grid_shape=src.grid_shape, class_names=src.class_names,
            label_names=src.label_names if with_labels else [],
            settings={"latents": str(args.latents), "latents_settings": src.settings,
                      "vae_sha256": src.vae_sha256},
            image_channels=channels if len(channels) > 1 else [],
        )
        inpainted = latents.mask is not None and latents.source_ids is not None
        if inpainted and len(channels) > 1:
            raise InputError(f"{args.latents}: inpainting multi-channel subjects ({channels}) is not supported")
        sources = source_volumes(latents, args.manifest, paired) if inpainted else {}
        descrip = label_names_text(header.label_names) if with_labels else ""
        if with_labels:
            write_json(args.nifti_dir / "labels.json", dict(enumerate(header.label_names)))
        with h5layout.create_volumes(args.out, len(latents), header, with_labels=with_labels,
                                     with_image=not only_labels,
                                     with_masks=latents.mask is not None,
                                     with_source=latents.source_ids is not None) as writer:
            for start, images, labels in ae.decode_set(net, latents.mu, inference, device, only_labels=only_labels,
                                                       image_channels=len(channels)):
                for j in range(len(labels if only_labels else images)):
                    image = None if only_labels else images[j]
                    i = start + j
                    sid = latents.subject_ids[i]
                    label, affine = None if labels is None else labels[j], latents.affines[i]
                    if conditioned:
                        label = latents.label[i]
                    mask = None if latents.mask is None else latents.mask[i]
                    source_id = None if latents.source_ids is None else latents.source_ids[i]
                    if inpainted:
                        original, original_label = sources[source_id]
                        image = None if image is None else paste_back(image, original, mask, blend)
                        if label is not None and original_label is not None:
                            label = np.where(mask > 0, label, original_label).astype(np.uint8)
                    if image is not None:
                        for name, volume in zip(channels, image[None] if len(channels) == 1 else image, strict=True):
                            save_nifti(args.nifti_dir / sid / f"{name}.nii.gz", volume, affine)
                            if volume.ndim == 2:  # 2D images also as PNG
                                save_png(args.nifti_dir / sid / f"{name}.png", volume)
                    if label is not None:
                        save_nifti(args.nifti_dir / sid / "label.nii.gz", label, affine, descrip)
                    writer.append(sid, int(latents.class_index[i]), latents.splits[i], affine=affine,
                                  source_id=source_id, image=image, label=label, mask=mask)
    pasted = f", source voxels pasted back outside the masks (blend {blend})" if inpainted else ""
    print(f"{args.out}: decoded {writer.count} volumes{' with label maps' if with_labels else ''}{pasted} "
          f"of shape {list(header.grid_shape)}; NIfTI in {args.nifti_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
