#!/usr/bin/env python
"""Inpainting speed: wall time of one inpainted volume against one unconditional sample.

1. trained inpainting (the network also takes the voided latent and the mask: C + 1 more input
   channels) vs an unconditional sample of the same model size, with rectified flow 30 steps and
   DDIM 50 steps; target: inpainting within 1.5x;
2. RePaint (any ldm, the known region re-noised at every step, with its resampling jumps),
   reported separately: its jumps multiply the steps (about jump_n_sample times).

    python benchmarks/bench_inpaint.py --out results/bench/inpaint.json

The model is the demo's ``ldm`` entry of config/config.yaml (or --config / --ldm), untrained
(speed does not depend on the weights); latents and masks are random, of --latent-shape.
Each timing is the best of --repeats alternating runs (a shared machine only slows runs down).
On a busy machine load swings between whole runs, so the network forward alone (the only part
that differs: C + 1 more input channels) is also timed, alternating call by call.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from snakemake.utils import validate

from medldm.diffusion import inpainting
from medldm.diffusion import process as diffusion
from medldm.diffusion.backbones import build_diffusion_model
from medldm.io import write_json

REPO = Path(__file__).resolve().parent.parent
SAMPLERS = {"rflow_30": ("rflow", "rflow", 30), "ddim_50": ("ddpm", "ddim", 50)}


def ldm_settings(config_path: Path, name: str | None) -> dict:
    """The config's ldm entry (schema defaults filled); the first one when ``name`` is None."""
    config = yaml.safe_load(config_path.read_text())
    validate(config, str(REPO / "config" / "schemas" / "config.schema.yaml"))
    entries = config["ldm"]
    return entries[name or next(iter(entries))]


def seconds(run) -> float:
    tic = time.perf_counter()
    run()
    return time.perf_counter() - tic


def forward_ratio(plain, trained, noise, cond, label, calls: int) -> float:
    """Best forward time of the inpainting network over the plain one's, alternating call by call."""
    t = torch.full((1,), 500, dtype=torch.long)
    best = [float("inf"), float("inf")]
    with torch.no_grad():
        for _ in range(calls):
            best[0] = min(best[0], seconds(lambda: plain(noise, t, class_labels=label)))
            best[1] = min(best[1], seconds(lambda: trained(diffusion.with_condition(noise, cond), t,
                                                           class_labels=label)))
    return best[1] / best[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--ldm", help="ldm entry name (default: the first)")
    parser.add_argument("--latent-shape", type=int, nargs=4, default=[3, 10, 12, 10], metavar=("C", "D", "H", "W"))
    parser.add_argument("--jump-length", type=int, default=3, help="RePaint jump_length (sampler steps)")
    parser.add_argument("--jump-n-sample", type=int, default=3, help="RePaint jump_n_sample")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each (best kept)")
    parser.add_argument("--forward-calls", type=int, default=30, help="alternating forward calls of each network")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ldm_settings(args.config, args.ldm)
    shape = tuple(args.latent_shape)
    c = shape[0]
    torch.manual_seed(0)
    plain = build_diffusion_model(settings["model"], c, 0).eval()
    trained = build_diffusion_model(settings["model"], c, 0, cond_channels=inpainting.condition_channels(c)).eval()
    noise, label = torch.randn(1, *shape), torch.zeros(1, dtype=torch.long)  # label 0 = null: unconditional
    real = torch.randn(1, *shape)
    mask = torch.zeros(1, 1, *shape[1:])
    mask[..., : shape[1] // 2] = 1
    cond = inpainting.conditioning(real * (1 - mask), mask)
    print(f"threads {torch.get_num_threads()}, latent {shape}, model {settings['model']}", flush=True)

    result = {"threads": torch.get_num_threads(), "latent_shape": shape, "model": settings["model"],
              "repaint": {"jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample},
              "forward_ratio": forward_ratio(plain, trained, noise, cond, label, args.forward_calls)}
    print(f"  network forward: inpainting / unconditional {result['forward_ratio']:.3f}", flush=True)
    for label_, (strategy_name, sampler, steps) in SAMPLERS.items():
        strategy = diffusion.build_strategy({**settings["strategy"], "name": strategy_name})
        common = {"sampler": sampler, "steps": steps, "guidance_scale": 1.0, "null_class": 0}
        runs = {
            "unconditional": partial(diffusion.sample, plain, strategy, noise, label, **common),
            "inpaint_trained": partial(diffusion.sample, trained, strategy, noise, label, cond=cond, **common),
            "inpaint_keep_known": partial(inpainting.repaint, trained, strategy, noise, label, real=real,
                                          known=1 - mask, cond=cond, **common),  # the set's keep_known
            "repaint": partial(inpainting.repaint, plain, strategy, noise, label, real=real, known=1 - mask,
                               jump_length=args.jump_length, jump_n_sample=args.jump_n_sample, **common),
        }
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                best[name] = min(best[name], seconds(run))
        best["inpaint_ratio"] = max(best["inpaint_trained"], best["inpaint_keep_known"]) / best["unconditional"]
        best["repaint_ratio"] = best["repaint"] / best["unconditional"]
        result[label_] = best
        print(f"  {label_}: unconditional {best['unconditional']:.3f} s, trained inpainting "
              f"{best['inpaint_trained']:.3f} s, with keep_known {best['inpaint_keep_known']:.3f} s (slower of the "
              f"two {best['inpaint_ratio']:.2f}x, target <= 1.5), RePaint "
              f"{best['repaint']:.3f} s ({best['repaint_ratio']:.2f}x)", flush=True)
    result["targets_met"] = all(result[k]["inpaint_ratio"] <= 1.5 for k in SAMPLERS)
    if args.out:
        write_json(args.out, result)
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
