"""Tests of the 3D DiT backbone (CPU, a few seconds)."""

from functools import partial

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from medldm.diffusion.dit3d import Attention, build_dit3d

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 4}


def tiny(patch_size=2, **kwargs):
    """A 2-block DiT with 3 latent channels and 2 classes; kwargs go to ``build_dit3d``."""
    return build_dit3d(
        "S", in_channels=3, num_classes=2, patch_size=patch_size, **{**TINY, **kwargs}
    )


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Replace all weights (also the zero-initialised adaLN and output ones) by random values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


@pytest.fixture(autouse=True)
def _seed_one_thread():
    """Seed; one thread runs these tiny models faster and does not thrash on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("patch_size", [(2, 2, 2), (4, 2, 4)])
def test_output_shape_equals_input_for_odd_shapes(patch_size):
    model = randomize(tiny(patch_size, window_size=2, global_blocks=[1]))
    x = torch.randn(2, 3, 7, 9, 5)
    out = model(x, torch.tensor([1, 900]), class_labels=torch.tensor([0, 1]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_zero_init_gives_zero_output():
    out = tiny()(
        torch.randn(2, 3, 7, 9, 5), torch.tensor([5, 700]), class_labels=torch.tensor([0, 2])
    )
    assert torch.equal(out, torch.zeros_like(out))


def test_window_covering_grid_equals_global_attention():
    windowed = randomize(tiny(window_size=8, global_blocks=[]))
    global_ = tiny(global_blocks=[0, 1])
    global_.load_state_dict(windowed.state_dict())
    x, t, y = torch.randn(2, 3, 7, 9, 5), torch.tensor([3, 400]), torch.tensor([1, 0])
    torch.testing.assert_close(windowed(x, t, class_labels=y), global_(x, t, class_labels=y))


def test_padded_windows_mask_padding():
    """Windows on a grid that is no multiple of the window equal attention on each window's real tokens."""
    attn = randomize(Attention(16, num_heads=2))
    x = torch.randn(2, 3, 5, 4, 16)
    out = attn(x, window=(2, 2, 3))
    expected = torch.empty_like(x)
    for d in range(0, 3, 2):
        for h in range(0, 5, 2):
            for w in range(0, 4, 3):
                block = (slice(None), slice(d, d + 2), slice(h, h + 2), slice(w, w + 3))
                expected[block] = attn(x[block])
    torch.testing.assert_close(out, expected)


def test_class_conditioning_and_label_range():
    model = randomize(tiny())
    x, t = torch.randn(1, 3, 4, 4, 4).expand(3, -1, -1, -1, -1), torch.tensor([100])
    out = model(x, t, class_labels=torch.tensor([0, 1, 2]))  # 2 = null class
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[0], out[2])
    torch.testing.assert_close(model(x[:1], t), out[2:])  # no labels: null class
    for bad in (3, -1):
        with pytest.raises(ValueError, match="class_labels must be in 0..2"):
            model(x[:1], t, class_labels=torch.tensor([bad]))


def test_gradient_checkpointing_gives_same_gradients():
    x, t = torch.randn(2, 3, 5, 4, 6), torch.tensor([10, 20])
    grads = []
    for flag in (False, True):
        model = randomize(tiny(window_size=2, gradient_checkpointing=flag))
        model(x, t, class_labels=torch.tensor([0, 1])).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed)


def test_learned_pos_embed_is_fixed_to_input_size():
    model = tiny(learn_pos_embed=True, input_size=(7, 9, 5))
    assert model.pos_embed.shape == (4, 5, 3, 32)  # padded token grid
    model(torch.randn(1, 3, 7, 9, 5), torch.tensor([1]))
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(1, 3, 8, 8, 8), torch.tensor([1]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": (2, -1, 2)}, "patch_size"),
        ({"num_heads": 5}, "not divisible by num_heads"),
        ({"window_size": (2, 2)}, "window_size"),
        ({"global_blocks": [2]}, "global_blocks"),
        ({"learn_pos_embed": True}, "input_size"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


@pytest.mark.parametrize("variant", ["M/4", "S4", "s/4"])
def test_unknown_variant(variant):
    with pytest.raises(ValueError, match="unknown DiT variant"):
        build_dit3d(variant, 3, 2)


def test_variant_sets_standard_sizes_and_patch():
    model = build_dit3d("B/4", 4, 2, patch_size=(4, 2, 4), depth=1)
    assert model.patch_size == (4, 2, 4)
    assert model.hidden_size == 768 and model.blocks[0].attn.num_heads == 12
    assert build_dit3d("S/4", 4, 2, depth=1).patch_size == (4, 4, 4)
    with pytest.raises(ValueError, match="patch size"):
        build_dit3d("S", 4, 2)


def _train_and_sample(scheduler, target, sample_steps, steps=300, batch=32):
    """Train a tiny DiT on two classes with means -1 and +1, sample 8 latents per class; returns class means."""
    shape = (2, 4, 4, 4)
    class_means = torch.tensor([-1.0, 1.0])
    model = build_dit3d("S/2", 2, num_classes=2, window_size=2, global_blocks=[1], **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    inferer = DiffusionInferer(scheduler)
    for _ in range(steps):
        labels = torch.randint(0, 2, (batch,))
        latents = class_means[labels].view(-1, 1, 1, 1, 1) + 0.1 * torch.randn(batch, *shape)
        noise = torch.randn_like(latents)
        if isinstance(scheduler, RFlowScheduler):
            timesteps = scheduler.sample_timesteps(latents)
        else:
            timesteps = torch.randint(0, scheduler.num_train_timesteps, (batch,))
        prediction = inferer(latents, partial(model, class_labels=labels), noise, timesteps)
        loss = torch.nn.functional.mse_loss(prediction, target(latents, noise))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    scheduler.set_timesteps(sample_steps)
    labels = torch.tensor([0, 1]).repeat_interleave(8)
    samples = inferer.sample(
        torch.randn(16, *shape), partial(model, class_labels=labels), verbose=False
    )
    return samples[:8].mean().item(), samples[8:].mean().item()


@pytest.mark.parametrize(
    ("scheduler", "target", "sample_steps"),
    [
        # MONAI's DDPM step always goes from t to t - 1, so DDPM sampling takes all 1000 steps.
        (DDPMScheduler(num_train_timesteps=1000), lambda latents, noise: noise, 1000),
        (
            RFlowScheduler(
                num_train_timesteps=1000, use_discrete_timesteps=False, sample_method="logit-normal"
            ),
            lambda latents, noise: latents - noise,
            30,
        ),
    ],
    ids=["ddpm", "rflow"],
)
def test_trained_model_follows_class(scheduler, target, sample_steps):
    """MONAI schedulers and inferer drive the DiT unchanged, and samples follow their class."""
    mean0, mean1 = _train_and_sample(scheduler, target, sample_steps)
    assert abs(mean0 + 1) < abs(mean0 - 1), (mean0, mean1)
    assert abs(mean1 - 1) < abs(mean1 + 1), (mean0, mean1)
