"""Benchmark the 3D DiT against MONAI's DiffusionModelUNet on the same latents.

Reports parameter count, training steps per second (AdamW, MSE on the noise of DDPM-noised latents, timed
after warm-up steps) and sampling seconds per volume (rectified flow, batch sampling). CPU runs in fp32;
``--device cuda`` runs under bf16 autocast.

    python benchmarks/bench_dit3d.py --shape 4 12 12 12 --batch 4 --train-steps 10 --out bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from medldm.diffusion.dit3d import build_dit3d

NUM_TRAIN_TIMESTEPS = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", type=int, nargs=4, default=[4, 12, 12, 12], metavar=("C", "D", "H", "W")
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument(
        "--num-classes", type=int, default=2, help="K real classes (tables have K + 1 rows)"
    )
    parser.add_argument("--dit", default="S/4", help="DiT variant, e.g. S/4, B/2")
    parser.add_argument(
        "--patch-size", type=int, nargs=3, help="per-axis DiT patch, overrides the variant's"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps")
    parser.add_argument(
        "--sample-steps", type=int, default=30, help="rectified-flow sampling steps"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if any(s % 4 for s in args.shape[1:]):
        parser.error("the UNet downsamples twice: D, H and W must be multiples of 4")
    return args


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    channels, num_classes = args.shape[0], args.num_classes
    dit = build_dit3d(args.dit, channels, num_classes, patch_size=args.patch_size)
    unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=channels,
        out_channels=channels,
        channels=(64, 128, 128),
        attention_levels=(False, True, True),
        num_res_blocks=1,
        num_head_channels=32,
        num_class_embeds=num_classes + 1,
    )
    return {f"DiT-{args.dit} patch {dit.patch_size}": dit, "UNet (64,128,128)": unet}


def seconds_per_call(
    fn: Callable[[], None], warmup: int, repeats: int, device: torch.device
) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def train_steps_per_second(model, args, device, autocast) -> float:
    scheduler = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    latents = torch.randn(args.batch, *args.shape, device=device)
    labels = torch.randint(0, args.num_classes + 1, (args.batch,), device=device)

    def step() -> None:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (args.batch,), device=device)
        with autocast():
            prediction = model(
                scheduler.add_noise(latents, noise, timesteps), timesteps, class_labels=labels
            )
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    return 1.0 / seconds_per_call(step, args.warmup, args.train_steps, device)


def sample_seconds_per_volume(model, args, device, autocast) -> float:
    scheduler = RFlowScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, use_discrete_timesteps=False
    )
    # timesteps stay on the CPU: DiffusionInferer.sample concatenates them with a CPU tensor
    scheduler.set_timesteps(args.sample_steps)
    noise = torch.randn(args.batch, *args.shape, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)
    conditioned = partial(model, class_labels=labels)

    def sample() -> None:
        with torch.no_grad(), autocast():
            DiffusionInferer(scheduler).sample(noise, conditioned, verbose=False)

    model.eval()
    return seconds_per_call(sample, 0, 1, device) / args.batch


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    autocast = (
        partial(torch.autocast, "cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for name, model in build_models(args).items():
        model.to(device)
        results.append(
            {
                "model": name,
                "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                "train_steps_per_s": train_steps_per_second(model, args, device, autocast),
                "sample_s_per_volume": sample_seconds_per_volume(model, args, device, autocast),
            }
        )
    config = {**vars(args), "threads": torch.get_num_threads()}
    print(
        f"latent {tuple(args.shape)}, batch {args.batch}, {device}, {config['threads']} threads, "
        f"rectified flow {args.sample_steps} steps"
    )
    print(f"{'model':<34} {'params (M)':>10} {'train steps/s':>14} {'sample s/volume':>16}")
    for r in results:
        print(
            f"{r['model']:<34} {r['params_M']:>10.2f} {r['train_steps_per_s']:>14.3f} {r['sample_s_per_volume']:>16.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": config, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
