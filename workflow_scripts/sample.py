#!/usr/bin/env python
"""Sample one named sample set from ldm.pt and write its latents.h5 (unscaled, ready to decode).

The volumes depend only on the sample set's settings: the same seed gives the same volumes.
Refuses a vae.pt other than the one the diffusion model was trained against.
An inpaint set (`task: inpaint`) fills the masks of the real rows of a split (--real: the
autoencoder's latents.h5), `draws` latents per row, each row keeping its source's id, class,
split, affine and mask.
A spatially conditioned model's set (`conditions`) takes its maps from the real rows of a split
(--real, `from: test`) or from another set's decoded label maps (--source, its volumes.h5: the
chain), `per_subject` volumes per map, named `<source id>-c<k>`; the set's latents.h5 keeps each
row's `label` map (decode writes it to volumes.h5) and `source_id`.
A ControlNet set (--controlnet, trained on --ldm) takes its maps from the same sources, at image
resolution, and steers the base with them times `conditioning_scale`.
"""

from __future__ import annotations

import argparse
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medldm.data import h5layout
from medldm.diffusion import inpainting, spatial
from medldm.diffusion import process as diffusion
from medldm.diffusion.controlnet import controlled_sample, load_controlnet
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
    parser.add_argument("--real", type=Path, help="the autoencoder's latents.h5: with masks (inpaint sets), "
                        "or the real rows whose maps condition a set (`conditions: {from: <split>}`)")
    parser.add_argument("--source", type=Path, help="volumes.h5 of the set whose label maps condition this one "
                        "(`conditions: {from: <set>}`)")
    parser.add_argument("--controlnet", type=Path, help="controlnet.pt trained on --ldm (a set with `controlnet`)")
    parser.add_argument("--out", required=True, type=Path, help="latents.h5 to write")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    setup_logging()
    settings = load_settings(args.settings)
    where = f"sample set {args.name!r}"
    device = pick_device(args.device)
    control = None
    if args.controlnet:
        if not settings.get("conditions"):
            raise InputError(f"{where} names a controlnet but has no `conditions`: give it `conditions: {{from: "
                             "test}` (or `from: <a set with label maps>`), the maps that steer it")
        control = load_controlnet(args.controlnet, args.ldm, vae_path=args.vae, device=device,
                                  scale=settings.get("conditioning_scale", 1.0))
        ldm = control.ldm
    else:
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
    conditions = settings.get("conditions")
    if control is not None:
        latents = write_conditioned_set(ldm, settings, args.real, args.source, header, args.out, run, where, control)
    elif settings.get("task", "generate") == "inpaint":
        latents = write_inpaint_set(ldm, settings, args.real, header, args.out, run, where)
    elif spatial.check_model_conditions(ldm.conditioning if ldm.task == "generate" else None, conditions, where,
                                        args.ldm):
        latents = write_conditioned_set(ldm, settings, args.real, args.source, header, args.out, run, where)
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


SPLITS = ("train", "val", "test")


@dataclass
class ConditionSource:
    """The maps a conditioned set is made from, one row per source volume or subject."""

    ids: list[str]
    class_index: np.ndarray  # (n,) -1: none
    class_names: list[str]
    affines: np.ndarray
    label: object  # (n, X, Y, Z) readable by row index arrays, or None
    mask: object
    path: Path

    def rows_of(self, kind, idx):
        return getattr(self, kind)[np.sort(idx)] if len(idx) else None


def condition_source(ldm, source_from: str, real: Path | None, source: Path | None, stack: ExitStack,
                     where: str) -> ConditionSource:
    """The real rows of split ``source_from`` (``real``: the autoencoder's latents.h5), or the
    decoded label maps of another set (``source``: its volumes.h5)."""
    if source_from in SPLITS:
        if real is None:
            raise InputError(f"{where}: conditions from split {source_from!r} need the autoencoder's latents.h5 (--real)")
        f = stack.enter_context(h5layout.open_latents(real))
        if f.header.vae_sha256 != ldm.vae_sha256:
            raise InputError(f"{real}: these latents are not from the autoencoder the ldm was trained on; give "
                             "the latents.h5 of the ldm's own `vae`")
        rows = f.indices(source_from)
        if len(rows) == 0:
            raise InputError(f"{where}: conditions.from {source_from!r}: {real} has no subjects in split "
                             f"{source_from!r}; choose another split (split.test_fraction/val_fraction) or source")
        label = None if f.label is None else _Rows(f.label, rows)
        mask = None if f.mask is None else _Rows(f.mask, rows)
        return ConditionSource([f.subject_ids[i] for i in rows], f.class_index[rows], list(f.header.class_names),
                               f.affines[rows], label, mask, real)
    if source is None:
        raise InputError(f"{where}: conditions from set {source_from!r} need its volumes.h5 (--source)")
    f = stack.enter_context(h5layout.open_volumes(source))
    if f.label is None:
        raise InputError(f"{where}: conditions.from names set {source_from!r}, whose {source} has no `label` maps; "
                         "name a set with label maps (a label-map generator's, a paired-label or a conditioned set)")
    if tuple(f.header.grid_shape) != tuple(ldm.grid_shape):
        raise InputError(f"{where}: label maps of {source} are on grid {tuple(f.header.grid_shape)}, the ldm's on "
                         f"{tuple(ldm.grid_shape)}; condition on a set made from the same prepared data")
    return ConditionSource(list(f.subject_ids), f.class_index, list(f.header.class_names), f.affines,
                           f.label, None, source)


class _Rows:
    """A dataset seen through a subset of its rows (``view[i]`` is row ``rows[i]``)."""

    def __init__(self, data, rows):
        self.data, self.rows = data, np.asarray(rows)

    def __getitem__(self, idx):
        return self.data[np.sort(self.rows[idx])]


def write_conditioned_set(ldm, settings, real, source, header, out, run, where, control=None):
    """Rows `<source id>-c<k>`: `per_subject` volumes per source map, each keeping its label map.
    ``control``: a loaded ControlNet (its maps at image resolution steer ``ldm``'s base)."""
    conditions = settings["conditions"]
    kinds = [control.maps] if control else ldm.conditioning["maps"]
    with ExitStack() as stack:
        src = condition_source(ldm, str(require(conditions, "from", f"{where} conditions")), real, source, stack,
                               where)
        missing = [kind for kind in kinds if getattr(src, kind) is None]
        if missing:
            raise InputError(f"{where}: {src.path} has no {missing} maps, which {header.settings['ldm']} was "
                             f"conditioned on ({kinds}); condition on a source that has them")
        k = int(conditions.get("per_subject", 1))
        each = np.repeat(np.arange(len(src.ids)), k)
        classes = condition_classes(ldm, settings, src, each, where)
        if control:
            rows = np.arange(len(src.ids))
            maps = torch.cat([control.control_maps(src.rows_of(control.maps, rows[i:i + 16]), str(src.path))
                              for i in range(0, len(rows), 16)])
            latents = diffusion.generate(ldm, classes, rows={"control": maps[each]}, reverse=controlled_sample, **run)
        else:
            maps = spatial.read_latent_maps(src.rows_of, kinds, ldm.latent_shape[1:], ldm.conditioning["pooling"],
                                            len(ldm.label_names), np.arange(len(src.ids)), where=str(src.path))
            latents = diffusion.generate(ldm, classes, rows={"cond": maps[each]},
                                         map_guidance_scale=settings.get("condition_guidance_scale", 1.0), **run)
        label_shape = ldm.grid_shape if "label" in kinds else None
        with h5layout.create_latents(out, len(latents), ldm.latent_shape, header, with_logvar=False,
                                     label_shape=label_shape, with_source=True) as writer:
            for i, (latent, j) in enumerate(zip(latents, each, strict=True)):
                label = None if label_shape is None else src.label[np.array([j])][0]
                writer.append(f"{src.ids[j]}-c{i % k}", int(classes[i]), "synthetic", affine=src.affines[j],
                              source_id=src.ids[j], mu=latent, label=label)
            set_stats(writer, latents, ldm)
    return latents


def condition_classes(ldm, settings, src: ConditionSource, each, where) -> np.ndarray:
    """Each volume's class: its source's (when the source has the ldm's classes and the set names
    none), else allocated from the set's `class` / `class_proportions`."""
    own = settings.get("class") is None and not settings.get("class_proportions")
    if own and ldm.class_names and src.class_names == list(ldm.class_names) and (src.class_index >= 0).all():
        return np.asarray(src.class_index)[each].astype(np.int64)
    return diffusion.allocate_classes(len(each), ldm.class_names, settings.get("class"),
                                      settings.get("class_proportions"))


def write_inpaint_set(ldm, settings, real, header, out, run, where):
    """Rows `<source id>-inp<k>`, with the source's id, class, split, affine and mask."""
    if real is None:
        raise InputError(f"{where} has task inpaint: give the autoencoder's latents.h5 with --real")
    done = inpainting.inpaint_set(ldm, real, method=require(settings, "method", where),
                                  split=require(settings, "split", where), draws=require(settings, "draws", where),
                                  repaint_settings=settings.get("repaint"),
                                  keep_known=settings.get("keep_known", False), **run)
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
