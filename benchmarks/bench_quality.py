#!/usr/bin/env python
"""Demo image quality per CPU minute: autoencoder variants measured for quality and for speed.

Quality does not depend on how busy the machine is, speed does, so the two are measured apart:

    # test-split SSIM/PSNR of one variant after its full schedule (1 thread; one run at a time)
    python benchmarks/bench_quality.py quality --variant base --out results/bench/quality/base.json
    # the frontier: a markdown table of every quality JSON in --results (test SSIM, PSNR, FID of the
    # reconstructions vs the real test volumes) with VAE minutes projected by --anchor-vae-s
    python benchmarks/bench_quality.py table --results results/bench/quality
    # FID of samples: a config that runs the demo's ldm, sample set and FID on runs' --weights
    python benchmarks/bench_quality.py chain --runs base down2_lat1 --out quality_chain.yaml
    snakemake --cores 2 --configfile config/config.yaml quality_chain.yaml \
        results/quality_chain/eval/synthetic/down2_lat1/down2_lat1/image_metrics.json
    # seconds per training step of every variant's VAE (and of the LDM on its latents), 2 threads,
    # short repeated bursts, the minimum kept: projected minutes = steps x s/step
    python benchmarks/bench_quality.py speed --out results/bench/quality/speed.json
    # floating-point work per training step (independent of load), and minutes projected from the
    # demo's measured train_vae / train_ldm times on an idle 2-core machine (--anchor-*)
    python benchmarks/bench_quality.py flops --out results/bench/quality/flops.json

Measure speed on an idle machine: with 2 threads on 2 oversubscribed cores (load ~20) one demo
VAE step took over 25 s instead of about 0.2 s, and 6.2 s on 1 thread; ``flops`` does not depend on load.

A variant is the config's vae entry (default: demo) with the overrides of ``VARIANTS``; ``quality``
trains it with ``medldm.autoencoder.training.VAETrainer`` on the prepared cohort
(``snakemake results/prepared/manifest.tsv`` first), logs the validation curve, and scores the
test split with the trainer's own ``evaluate_reconstruction`` (MONAI SSIM, PSNR on [0, 1]) and by the
per-slice FID of its reconstructions (the report's reconstruction floor, same slices).

On CPU keep the VAE's batch at 2 or more: at batch 1, PyTorch's heuristic sends these small 3D
convolutions to its slow non-oneDNN kernel (1.5 s per volume vs 0.38 s at batch 2, one thread).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from snakemake.utils import validate
from torch.utils.flop_counter import FlopCounterMode

from medldm.autoencoder import networks as ae
from medldm.autoencoder.training import VAETrainer, evaluate_reconstruction
from medldm.checkpoint import save_torch
from medldm.data.cohort import PreparedSet, load_prepared
from medldm.diffusion import process as diffusion
from medldm.diffusion.backbones import build_diffusion_model
from medldm.evaluation import fid
from medldm.evaluation.fid_weights import load_inception
from medldm.io import write_json, write_text

REPO = Path(__file__).resolve().parent.parent

# Overrides of the config's vae entry: {"model": {...}, "loss": {...}, "train": {...}}.
VARIANTS: dict[str, dict] = {
    "base": {},
    "l2": {"loss": {"reconstruction": "l2"}},
    "down2": {"model": {"channels": [8, 16]}},
    "down2_w16": {"model": {"channels": [16, 32]}},
    "down4_lat8": {"model": {"latent_channels": 8}},
    "down4_lat8_grad": {"model": {"latent_channels": 8}, "loss": {"gradient_weight": 1.0}},
    "down2_e80": {"model": {"channels": [8, 16]}, "train": {"epochs": 80}},
    "down2_e40": {"model": {"channels": [8, 16]}, "train": {"epochs": 40}},
    "down2_l2": {"model": {"channels": [8, 16]}, "loss": {"reconstruction": "l2"}},
    "grad": {"loss": {"gradient_weight": 1.0}},
    "down2_grad": {"model": {"channels": [8, 16]}, "loss": {"gradient_weight": 1.0}},
    "down2_lat2": {"model": {"channels": [8, 16], "latent_channels": 2}},
    "down2_lat1": {"model": {"channels": [8, 16], "latent_channels": 1}},
    "bs1": {"train": {"batch_size": 1}},
    "lr4e-3": {"train": {"lr": 4.0e-3}},
    "bs4": {"train": {"batch_size": 4}},
    "bs8": {"train": {"batch_size": 8}},
}

# Overrides of the config's ldm model (the entry that uses the vae), timed on every latent shape.
LDM_VARIANTS: dict[str, dict] = {
    "unet2": {},
    "unet3_att3": {"channels": [32, 64, 64], "attention_levels": [False, False, True]},
    "unet2_noatt": {"attention_levels": [False, False]},
}


def load_config(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    validate(config, str(REPO / "config" / "schemas" / "config.schema.yaml"))  # fills defaults
    return config


def variant_settings(config: dict, vae: str, name: str) -> dict:
    """The config's vae entry with the variant's overrides merged in, section by section."""
    settings = copy.deepcopy(config["vae"][vae])
    for section, values in VARIANTS[name].items():
        settings[section] = {**settings[section], **values}
    return settings


def quality(args, config: dict) -> dict:
    """Train one variant to the end of its schedule; validation curve and test-split scores."""
    torch.set_num_threads(args.threads)
    settings = variant_settings(config, args.vae, args.variant)
    if args.epochs:
        settings["train"]["epochs"] = args.epochs
    epochs = settings["train"]["epochs"]
    settings["train"] |= {"val_every": max(1, epochs // 4), "checkpoint_every": 10**9, "montage_subjects": 0}
    data = load_prepared(args.manifest, config["classes"], with_labels=False)
    train, val, test = data.subset("train"), data.subset("val"), data.subset("test")
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = VAETrainer(settings, train, val, Path(tmp) / "run", 0, torch.device("cpu")).run()
        with open(Path(tmp) / "run" / "metrics.csv") as fh:
            curve = [{k: float(v) for k, v in row.items() if k.startswith("val/") or k == "epoch"}
                     for row in csv.DictReader(fh) if row.get("val/ssim")]
    seconds = time.perf_counter() - tic
    montage = args.montage if args.montage else None
    scores, _ = evaluate_reconstruction(result.model, test, 0, False, torch.device("cpu"), settings["inference"],
                                        montage, 3)
    scores["fid"] = reconstruction_fid(result.model, test, settings["inference"], config["evaluate"]["fid"])
    if args.weights:
        save_torch(args.weights, result.model.state_dict())
    steps = epochs * -(-len(train) // settings["train"]["batch_size"])
    return {"variant": args.variant, "overrides": VARIANTS[args.variant], "epochs": epochs, "steps": steps,
            "train_subjects": len(train), "test_subjects": len(test), "test": scores, "val_curve": curve,
            "wall_s_1_thread_shared_machine": seconds}


def reconstruction_fid(net, test: PreparedSet, inference: dict, fid_settings: dict) -> dict:
    """Per-slice FID of the test reconstructions against the test volumes, per axis and mean
    (pooled classes), with the demo's slice selection: the report's reconstruction floor."""
    cpu = torch.device("cpu")
    images = torch.stack([test.images[i] for i in range(len(test))])
    mu = np.concatenate([m for _, m, _ in ae.encode_set(net, images, None, 0, cpu, inference, progress=False)])
    recon = np.concatenate([image for _, image, _ in ae.decode_set(net, mu, inference, cpu, progress=False)])
    spec = fid.SliceSpec.from_settings(fid_settings)
    model = load_inception(fid_settings["dims"], cpu)
    real = fid.slice_features(zip(images[:, 0].numpy(), test.class_index, strict=True), model, spec, cpu, progress=False)
    synthetic = fid.slice_features(zip(recon, test.class_index, strict=True), model, spec, cpu, progress=False)
    return fid.pooled_fids(real, synthetic)


def time_steps(step, warmup: int, steps: int, repeats: int) -> float:
    """Minimum over ``repeats`` bursts of the mean seconds per call of ``step``."""
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - tic) / steps)
    return best


def vae_step_seconds(settings: dict, shape, args) -> float:
    """Seconds per VAETrainer.train_step at the variant's batch size, random volumes."""
    batch = settings["train"]["batch_size"]
    images = torch.rand(batch, 1, *shape)
    data = PreparedSet([f"s{i}" for i in range(batch)], np.zeros(batch, np.int64), ["train"] * batch,
                       images, None, np.eye(4))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = VAETrainer(settings, data, data.select([]), Path(tmp) / "run", 0, torch.device("cpu"))
        return time_steps(lambda: trainer.train_step(images, None), 2, args.burst, args.repeats)


def ldm_step_seconds(ldm: dict, latent_shape, args) -> float:
    """Seconds per LDM training step (loss, backward, AdamW) at the ldm entry's batch size."""
    model = build_diffusion_model(ldm["model"], latent_shape[0], 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    strategy = diffusion.build_strategy(ldm["strategy"])
    x0 = torch.randn(ldm["train"]["batch_size"], *latent_shape)
    labels = torch.zeros(len(x0), dtype=torch.long)

    def step():
        loss = diffusion.diffusion_loss(model, strategy, x0, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return time_steps(step, 1, max(1, args.burst // 2), args.repeats)


def speed(args, config: dict) -> dict:
    torch.set_num_threads(args.threads)
    shape = config["prepare"]["shape"]
    ldm = next(e for e in config["ldm"].values() if e["vae"] == args.vae)
    vaes, ldms = {}, {}
    for name in args.variants or VARIANTS:
        settings = variant_settings(config, args.vae, name)
        factor = ae.downsampling(settings["model"])
        latent = [settings["model"]["latent_channels"], *(s // factor for s in shape)]
        vaes[name] = {"vae_s_per_step": vae_step_seconds(settings, shape, args), "latent_shape": latent,
                      "batch_size": settings["train"]["batch_size"]}
        print(name, json.dumps(vaes[name]), file=sys.stderr, flush=True)
    for latent in {tuple(v["latent_shape"]) for v in vaes.values()} if args.ldm else ():
        for name in args.ldm_variants or LDM_VARIANTS:
            entry = {**ldm, "model": {**ldm["model"], **LDM_VARIANTS[name]}}
            key = f"{name} on {'x'.join(map(str, latent))}"
            if not fits(entry["model"], latent):
                continue
            ldms[key] = {"ldm_s_per_step": ldm_step_seconds(entry, list(latent), args),
                         "batch_size": ldm["train"]["batch_size"]}
            print(key, json.dumps(ldms[key]), file=sys.stderr, flush=True)
    return {"threads": torch.get_num_threads(), "burst": args.burst, "repeats": args.repeats,
            "vae": vaes, "ldm": ldms}


# The ldm entry (overrides of the config's) that a variant's latents get in ``chain``.
CHAIN_LDM: dict[str, dict] = {
    "down2_lat1": {"model": LDM_VARIANTS["unet3_att3"], "train": {"batch_size": 4}},
}


def chain(args, config: dict) -> dict:
    """A config that runs the demo's chain (ldm, sample set, FID with its floors) on the weights of
    finished ``quality --weights`` runs, imported as pretrained autoencoders; merge it over the
    demo's: ``snakemake --configfile config/config.yaml CHAIN
    <chain-results>/eval/synthetic/RUN/RUN/image_metrics.json``."""
    ldm_name = next((n for n, e in config["ldm"].items() if e["vae"] == args.vae), None)
    set_name = next((n for n, e in config["sample_sets"].items() if e["ldm"] == ldm_name), None)
    if set_name is None:
        sys.exit(f"{args.config}: no ldm on vae {args.vae!r} with a sample set to copy")
    out = {"results": str(args.chain_results), "vae": {}, "ldm": {}, "sample_sets": {}}
    for run in args.runs:
        weights, record = (args.results / f"{run}.pt").resolve(), args.results / f"{run}.json"
        if not weights.is_file() or not record.is_file():
            sys.exit(f"run {run!r}: {record} and {weights} are needed: run `quality --out {record} --weights {weights}`")
        variant = json.loads(record.read_text())["variant"]
        out["vae"][run] = {"pretrained": str(weights), "model": variant_settings(config, args.vae, variant)["model"]}
        ldm = copy.deepcopy(config["ldm"][ldm_name]) | {"vae": run}
        for section, values in CHAIN_LDM.get(variant, {}).items():
            ldm[section] = {**ldm[section], **values}
        out["ldm"][run] = ldm
        out["sample_sets"][run] = {**config["sample_sets"][set_name], "ldm": run, "evaluate": ["image_metrics"]}
    if args.out:
        write_text(args.out, yaml.safe_dump(out, sort_keys=False))
    return out


def fits(model: dict, latent) -> bool:
    """Whether the LDM UNet's levels halve the latent grid evenly."""
    factor = 2 ** (len(model.get("channels", [32, 64])) - 1)
    return all(d % factor == 0 for d in latent[1:])


def gflop(step, *args) -> float:
    """GFLOP of one call ``step(*args)``."""
    with FlopCounterMode(display=False) as counter:
        step(*args)
    return counter.get_total_flops() / 1e9


def vae_backward(net, x) -> None:
    recon, mu, sigma = net(x)
    (recon.abs().mean() + mu.mean() + sigma.mean()).backward()


def ldm_backward(model, strategy, x0, labels) -> None:
    diffusion.diffusion_loss(model, strategy, x0, labels).backward()


def flops(args, config: dict) -> dict:
    """GFLOP per training step of each VAE variant and of each LDM variant on its latents, and
    minutes projected at the GFLOP/s the demo's base model reached (--anchor-vae-s, --anchor-ldm-s)."""
    torch.set_num_threads(args.threads)
    shape = config["prepare"]["shape"]
    ldm = next(e for e in config["ldm"].values() if e["vae"] == args.vae)
    steps_per_epoch = -(-args.train_subjects // config["vae"][args.vae]["train"]["batch_size"])
    vaes, ldms, rate = {}, {}, {}
    for name in ["base", *[v for v in args.variants or VARIANTS if v != "base"]]:
        settings = variant_settings(config, args.vae, name)
        net = ae.build_autoencoder(settings["model"], 1)
        x = torch.rand(settings["train"]["batch_size"], 1, *shape)
        factor = ae.downsampling(settings["model"])
        steps = settings["train"]["epochs"] * -(-args.train_subjects // settings["train"]["batch_size"])
        vaes[name] = {"gflop_per_step": gflop(vae_backward, net, x), "steps": steps,
                      "latent_shape": [settings["model"]["latent_channels"], *(s // factor for s in shape)]}
        if name == "base":  # GFLOP/s of the demo's measured train_vae
            rate["vae"] = vaes[name]["gflop_per_step"] * settings["train"]["epochs"] * steps_per_epoch / args.anchor_vae_s
        vaes[name]["projected_min"] = vaes[name]["gflop_per_step"] * steps / rate["vae"] / 60
        print(name, json.dumps(vaes[name]), file=sys.stderr, flush=True)
    base_latent = tuple(vaes["base"]["latent_shape"])
    latents = [base_latent, *sorted({tuple(v["latent_shape"]) for v in vaes.values()} - {base_latent})]
    for latent in latents:
        for name in ["unet2", *[v for v in args.ldm_variants or LDM_VARIANTS if v != "unet2"]]:
            entry = {**ldm["model"], **LDM_VARIANTS[name]}
            key = f"{name} on {'x'.join(map(str, latent))}"
            if not fits(entry, latent):
                ldms[key] = {"fits": False}
                continue
            model = build_diffusion_model(entry, latent[0], 2)
            strategy = diffusion.build_strategy(ldm["strategy"])
            x0 = torch.randn(ldm["train"]["batch_size"], *latent)
            labels = torch.zeros(len(x0), dtype=torch.long)
            row = {"gflop_per_step": gflop(ldm_backward, model, strategy, x0, labels),
                   "batch_size": len(x0), "steps": ldm["train"]["steps"]}
            if "ldm" not in rate:  # GFLOP/s of the demo's measured train_ldm (unet2 on the base latents)
                rate["ldm"] = row["gflop_per_step"] * ldm["train"]["steps"] / args.anchor_ldm_s
            row["projected_min"] = row["gflop_per_step"] * row["steps"] / rate["ldm"] / 60
            ldms[key] = row
            print(key, json.dumps(row), file=sys.stderr, flush=True)
    return {"anchors_s": {"train_vae": args.anchor_vae_s, "train_ldm": args.anchor_ldm_s},
            "gflop_per_s_at_anchor": rate, "vae": vaes, "ldm": ldms}


def table(args, config: dict) -> dict:
    """The frontier: one row per quality JSON in ``--results``, minutes projected from the demo's
    train_vae on the AVX-512 kind (--anchor-vae-s for the base schedule) by GFLOP per step x steps."""
    shape = config["prepare"]["shape"]
    base = variant_settings(config, args.vae, "base")
    base_steps = base["train"]["epochs"] * -(-args.train_subjects // base["train"]["batch_size"])
    base_gflop = gflop(vae_backward, ae.build_autoencoder(base["model"], 1), torch.rand(2, 1, *shape))
    rows = []
    for path in sorted(args.results.glob("*.json")):
        run = json.loads(path.read_text())
        if "test" not in run:
            continue
        settings = variant_settings(config, args.vae, run["variant"])
        x = torch.rand(settings["train"]["batch_size"], 1, *shape)
        work = gflop(vae_backward, ae.build_autoencoder(settings["model"], 1), x) * run["steps"]
        test = run["test"]
        rows.append({"run": path.stem, "variant": run["variant"], "epochs": run["epochs"],
                     "projected_min": args.anchor_vae_s / 60 * work / (base_gflop * base_steps),
                     "ssim": test["ssim"], "psnr": test["psnr"], "recon_fid": test.get("fid", {}).get("mean")})
    rows.sort(key=lambda r: r["projected_min"])
    print("| run | variant | epochs | VAE minutes (projected) | test SSIM | test PSNR dB | recon FID |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fid_text = f"{r['recon_fid']:.0f}" if r["recon_fid"] is not None else "-"
        print(f"| {r['run']} | {r['variant']} | {r['epochs']} | {r['projected_min']:.1f} | {r['ssim']:.3f} | "
              f"{r['psnr']:.2f} | {fid_text} |")
    return {"anchor_vae_s": args.anchor_vae_s, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["quality", "speed", "flops", "table", "chain"])
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--vae", default="demo", help="vae entry of the config")
    parser.add_argument("--manifest", type=Path, default=Path("results/prepared/manifest.tsv"))
    parser.add_argument("--variant", default="base", choices=sorted(VARIANTS), help="quality: the variant to train")
    parser.add_argument("--epochs", type=int, help="quality: override the variant's epochs")
    parser.add_argument("--montage", type=Path, help="quality: PNG of test reconstructions")
    parser.add_argument("--weights", type=Path, help="quality: file for the trained autoencoder's state dict")
    parser.add_argument("--variants", nargs="*", help="speed: variants to time (default: all)")
    parser.add_argument("--ldm-variants", nargs="*", help="speed: LDM variants to time (default: all)")
    parser.add_argument("--ldm", action=argparse.BooleanOptionalAction, default=True, help="speed: time the LDM too")
    parser.add_argument("--burst", type=int, default=6, help="speed: steps per timed burst")
    parser.add_argument("--repeats", type=int, default=5, help="speed: bursts; the fastest is kept")
    parser.add_argument("--train-subjects", type=int, default=26, help="flops, table: train subjects (demo: 26)")
    parser.add_argument("--results", type=Path, default=Path("results/bench/quality"),
                        help="table, chain: folder of quality JSONs (and chain: their --weights files, RUN.pt)")
    parser.add_argument("--runs", nargs="*", default=[], help="chain: the quality runs (file stems) to chain")
    parser.add_argument("--chain-results", type=Path, default=Path("results/quality_chain"),
                        help="chain: the results folder of the chained runs")
    parser.add_argument("--anchor-vae-s", type=float, default=409,
                        help="flops: seconds of the demo's train_vae (base) on an idle 2-core machine")
    parser.add_argument("--anchor-ldm-s", type=float, default=139,
                        help="flops: seconds of the demo's train_ldm on an idle 2-core machine")
    parser.add_argument("--threads", type=int, help="torch threads (default: quality 1, speed 2)")
    parser.add_argument("--out", type=Path, help="JSON file for the figures")
    args = parser.parse_args(argv)
    args.threads = args.threads or (1 if args.mode == "quality" else 2)
    config = load_config(args.config)
    result = {"quality": quality, "speed": speed, "flops": flops, "table": table, "chain": chain}[args.mode](args, config)
    print(json.dumps(result, indent=2))
    if args.out and args.mode != "chain":
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
