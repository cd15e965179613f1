#!/usr/bin/env python
"""Prepare one subject: RAS, resampled, cropped/padded, intensity-normalised image (+ label map,
+ inpainting mask, both nearest neighbour on the image's grid). A multi-channel subject (--channel
for each further channel, --channel-names for all) is written as one 4D NIfTI (X, Y, Z, C).
With ``slices`` in the settings (2D mode) the prepared volume is cut into that many 2D slices,
one file per slice and output (--out-image etc. take one path per slice, in slice order).
With 2-entry spacing and shape (2D mode without slices) the inputs are 2D images (NIfTI, PNG or
TIFF) and the outputs 2D NIfTI."""

from __future__ import annotations

import argparse

import numpy as np

from medldm.data.prepare import SLICE_AXES, prepare_subject, slice_positions, take_slice
from medldm.errors import run_cli
from medldm.io import save_nifti, write_json
from medldm.settings import load_settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", required=True, help="input NIfTI image (2D: also PNG or TIFF)")
    parser.add_argument("--label", default="", help="input NIfTI label map (optional)")
    parser.add_argument("--settings", required=True,
                        help="the config's `prepare` section as JSON, or a YAML/JSON file")
    parser.add_argument("--label-values", default="",
                        help="comma-separated original label values, in the order of the config's labels")
    parser.add_argument("--out-image", required=True, nargs="+", help="one path, or one per slice")
    parser.add_argument("--out-label", nargs="*", default=[], help="required when --label is given")
    parser.add_argument("--mask", default="", help="input NIfTI inpainting mask, 1 = region to fill (optional)")
    parser.add_argument("--out-mask", nargs="*", default=[], help="required when --mask is given")
    parser.add_argument("--channel", action="append", default=[],
                        help="input NIfTI of a further image channel, on --image's grid (repeat, in channel order)")
    parser.add_argument("--channel-names", default="", help="comma-separated names of all channels (with --channel)")
    parser.add_argument("--out-info", required=True, help="JSON with shape, spacing and percentiles")
    args = parser.parse_args(argv)
    settings = load_settings(args.settings)
    if args.label and not args.out_label:
        parser.error("--out-label is required with --label")
    if args.mask and not args.out_mask:
        parser.error("--out-mask is required with --mask")
    label_values = [int(v) for v in args.label_values.split(",") if v != ""]
    prepared = prepare_subject(
        args.image, args.label,
        spacing=settings["spacing"], shape=settings["shape"], percentiles=settings["percentiles"],
        foreground_threshold=settings["foreground_threshold"], label_values=label_values,
        intensity=settings.get("intensity"), mask_path=args.mask or None, channel_paths=args.channel,
        pixel_spacing=settings.get("pixel_spacing"),
    )
    names = [n for n in args.channel_names.split(",") if n]
    if args.channel and len(names) != 1 + len(args.channel):
        parser.error(f"--channel-names must name all {1 + len(args.channel)} channels")
    image = prepared.image if prepared.channels is None else np.stack(prepared.channels, axis=-1)
    arrays = {"image": (image, args.out_image), "label": (prepared.label, args.out_label),
              "mask": (prepared.mask, args.out_mask)}
    slices = settings.get("slices")
    positions = [None] if not slices else slice_positions(
        prepared.image, slices["axis"], slices["n"], slices["central_fraction"]).tolist()
    for kind, (data, paths) in arrays.items():
        if data is None:
            continue
        if len(paths) != len(positions):
            parser.error(f"--out-{kind} takes {len(positions)} path(s) (one per slice), got {len(paths)}")
        for path, index in zip(paths, positions, strict=True):
            part, affine = (data, prepared.affine) if index is None else take_slice(
                data, prepared.affine, slices["axis"], index)
            save_nifti(path, part, affine)
    kept = [a for a in range(len(settings["spacing"]))  # the files' voxel axes
            if not slices or a != SLICE_AXES[slices["axis"]]]
    write_json(args.out_info, {
        "shape": [prepared.image.shape[a] for a in kept],
        "spacing": [float(settings["spacing"][a]) for a in kept],
        "p_low": prepared.p_low,
        "p_high": prepared.p_high,
        **({"channels": names, "channel_range": prepared.channel_range} if prepared.channels else {}),
        **({"slices": {"axis": slices["axis"], "index": positions}} if slices else {}),
    })
    return 0


if __name__ == "__main__":
    run_cli(main)
