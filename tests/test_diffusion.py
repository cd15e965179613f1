"""Diffusion strategies and guided sampling on toy latents (CPU, small)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medldm.diffusion import process as diffusion
from medldm.diffusion.backbones import build_diffusion_model, check_latent_shape
from medldm.errors import InputError
from tests.ldm_toys import SHAPE, TINY_UNET, one_thread  # noqa: F401 (fixture)

MEANS = (-1.5, 1.5)  # class means of the toy latents


def toy_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n latents: class c has mean MEANS[c] everywhere and std 0.5."""
    labels = torch.randint(0, 2, (n,))
    means = torch.tensor(MEANS)[labels].view(-1, 1, 1, 1, 1)
    return means + 0.5 * torch.randn(n, *SHAPE), labels


# 150 steps put both samplers' class means within 0.05 of +-1.5 (the tests ask only for the
# nearer class mean; 300 steps doubled the fixtures' time for nothing)
def train_toy(strategy_settings: dict, steps: int = 150) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    strategy = diffusion.build_strategy(strategy_settings)
    model = build_diffusion_model(TINY_UNET, SHAPE[0], num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(steps):
        x0, labels = toy_batch(32)
        labels = diffusion.drop_labels(labels, 0.2, null_class=2)
        loss = diffusion.diffusion_loss(model, strategy, x0, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), strategy


@pytest.fixture(scope="module")
def ddpm_model():
    return train_toy({"name": "ddpm", "schedule": "scaled_linear", "prediction": "v_prediction"})


@pytest.fixture(scope="module")
def rflow_model():
    return train_toy({"name": "rflow"})


def class_means(model, strategy, sampler, steps, scale, n=16, seed=0):
    labels = torch.tensor([0] * n + [1] * n)
    noise = diffusion.start_noise(SHAPE, seed, range(2 * n))
    x = diffusion.sample(model, strategy, noise, labels, sampler=sampler, steps=steps,
                         guidance_scale=scale, null_class=2)
    return x[:n].mean().item(), x[n:].mean().item(), x


@pytest.mark.parametrize("which,sampler,steps", [("ddpm", "ddim", 50), ("rflow", "rflow", 30)])
def test_conditioning_is_real(which, sampler, steps, request):
    model, strategy = request.getfixturevalue(f"{which}_model")
    m0, m1, _ = class_means(model, strategy, sampler, steps, scale=1.0)
    assert abs(m0 - MEANS[0]) < abs(m0 - MEANS[1])
    assert abs(m1 - MEANS[1]) < abs(m1 - MEANS[0])


def test_guidance(rflow_model):
    model, strategy = rflow_model
    noise = diffusion.start_noise(SHAPE, 0, range(8))
    by_label = [
        diffusion.sample(model, strategy, noise, torch.full((8,), c), sampler="rflow", steps=20,
                         guidance_scale=0.0, null_class=2)
        for c in (0, 1)
    ]
    torch.testing.assert_close(by_label[0], by_label[1])  # scale 0 ignores the class
    gaps = {}
    for scale in (1.0, 3.0):
        m0, m1, _ = class_means(model, strategy, "rflow", 20, scale)
        gaps[scale] = m1 - m0
    assert gaps[3.0] > gaps[1.0] > 0


def test_ancestral_sampling_is_deterministic():
    torch.manual_seed(0)
    strategy = diffusion.build_strategy({"name": "ddpm", "timesteps": 100})
    model = build_diffusion_model(TINY_UNET, SHAPE[0], num_classes=2).eval()
    noise = diffusion.start_noise(SHAPE, 7, range(4))
    labels = torch.tensor([0, 1, 0, 1])
    runs = [diffusion.sample(model, strategy, noise, labels, sampler="ddpm", steps=100, guidance_scale=2.0,
                             null_class=2, generator=torch.Generator().manual_seed(seed)) for seed in (3, 3, 4)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.equal(runs[0], runs[2])


def test_start_noise_does_not_depend_on_batching():
    whole = diffusion.start_noise(SHAPE, 5, range(6))
    parts = torch.cat([diffusion.start_noise(SHAPE, 5, range(0, 4)), diffusion.start_noise(SHAPE, 5, range(4, 6))])
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)
    assert not torch.equal(whole, diffusion.start_noise(SHAPE, 6, range(6)))


class Oracle(nn.Module):
    """The exact network output when the data is one point ``target``: every sampler must return it."""

    def __init__(self, strategy, target: torch.Tensor):
        super().__init__()
        self.strategy, self.target = strategy, target

    def forward(self, x, timesteps, class_labels=None):
        x0 = self.target.expand_as(x)
        if self.strategy.name == "rflow":
            s = (timesteps.double() / self.strategy.num_train_timesteps).view(-1, 1, 1, 1, 1)
            return ((x0 - x) / s).float()  # x = (1 - s) x0 + s noise; v = x0 - noise
        abar = self.strategy.scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        if self.strategy.prediction == "epsilon":
            return eps.float()
        return (abar.sqrt() * eps - (1 - abar).sqrt() * x0).float()


@pytest.mark.parametrize("strategy_settings,sampler,steps", [
    ({"name": "ddpm", "schedule": "linear", "prediction": "epsilon"}, "ddpm", 1000),
    ({"name": "ddpm", "schedule": "cosine", "prediction": "v_prediction"}, "ddim", 30),
    ({"name": "ddpm", "schedule": "scaled_linear", "prediction": "epsilon"}, "ddim", 50),
    ({"name": "rflow"}, "rflow", 30),
])
def test_samplers_reach_the_data_point(strategy_settings, sampler, steps):
    strategy = diffusion.build_strategy(strategy_settings)
    target = torch.linspace(-2, 2, 128).view(1, *SHAPE)
    noise = diffusion.start_noise(SHAPE, 0, range(3))
    out = diffusion.sample(Oracle(strategy, target), strategy, noise, torch.zeros(3, dtype=torch.long),
                           sampler=sampler, steps=steps, guidance_scale=1.0, null_class=1)
    torch.testing.assert_close(out, target.expand_as(out), atol=2e-3, rtol=0)


def test_min_snr_weights():
    ddpm = diffusion.build_strategy({"name": "ddpm", "prediction": "epsilon"})
    t = torch.tensor([0, 100, 500, 999])
    snr, gain = ddpm.snr_and_x0_gain(t)
    weight = torch.clamp(snr, max=5.0) * gain
    torch.testing.assert_close(weight, torch.clamp(snr, max=5.0) / snr)  # Hang et al.'s epsilon form
    assert weight[0] < 1e-2 and weight[-1] == pytest.approx(1.0)
    rflow = diffusion.build_strategy({"name": "rflow"})
    snr, gain = rflow.snr_and_x0_gain(torch.tensor([0, 500, 999]))
    weight = torch.clamp(snr, max=5.0) * gain
    assert weight[0] == 0 and weight[1] == pytest.approx(0.25) and torch.isfinite(weight).all()
    x0, labels = toy_batch(4)
    model = build_diffusion_model(TINY_UNET, SHAPE[0], 2)
    assert torch.isfinite(diffusion.diffusion_loss(model, rflow, x0, labels, min_snr_gamma=5.0))


def test_drop_labels():
    torch.manual_seed(0)
    labels = torch.zeros(10000, dtype=torch.long)
    dropped = diffusion.drop_labels(labels, 0.25, null_class=3)
    assert set(dropped.unique().tolist()) == {0, 3}
    assert (dropped == 3).float().mean().item() == pytest.approx(0.25, abs=0.02)


def test_clear_errors():
    ddpm = diffusion.build_strategy({"name": "ddpm"})
    noise, labels = torch.zeros(1, *SHAPE), torch.zeros(1, dtype=torch.long)
    model = Oracle(ddpm, torch.zeros(1, *SHAPE))
    with pytest.raises(InputError, match="rflow"):
        diffusion.sample(model, ddpm, noise, labels, sampler="rflow", steps=10, guidance_scale=1, null_class=1)
    with pytest.raises(InputError, match="ddim for fewer"):
        diffusion.sample(model, ddpm, noise, labels, sampler="ddpm", steps=50, guidance_scale=1, null_class=1)
    with pytest.raises(InputError, match="schedule"):
        diffusion.build_strategy({"name": "ddpm", "schedule": "quadratic"})
    with pytest.raises(InputError, match="unknown"):
        build_diffusion_model({"name": "resnet"}, 2, 2)
    with pytest.raises(InputError, match="divide by 2"):
        check_latent_shape({"name": "unet", "channels": [16, 32]}, (3, 10, 12, 5))
    check_latent_shape({"name": "unet", "channels": [16, 32]}, (3, 10, 12, 10))


def test_dit3d_plugs_in_by_name():
    model = build_diffusion_model({"name": "dit3d", "variant": "S/2", "hidden_size": 24, "depth": 2,
                                   "num_heads": 2, "window_size": 2}, SHAPE[0], num_classes=2)
    x0, labels = toy_batch(2)
    out = model(x0, torch.tensor([3, 700]), class_labels=labels)
    assert out.shape == x0.shape
