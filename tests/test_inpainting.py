"""Inpainting on the diffusion side: the trained model's condition, RePaint, inpaint sample sets (CPU, toys)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml

from medldm.data.h5layout import Header, create_latents, open_latents
from medldm.diffusion import inpainting
from medldm.diffusion import process as diffusion
from medldm.diffusion.backbones import build_diffusion_model
from medldm.diffusion.training import Trainer
from medldm.errors import InputError
from medldm.provenance import sha256_file
from tests.conftest import REPO, run_snakemake
from tests.ldm_toys import (  # noqa: F401 (one_thread is a fixture)
    CLASSES,
    SHAPE,
    TINY_UNET,
    ldm_settings,
    make_latents,
    make_vae_file,
    one_thread,
    sample_set_settings,
)
from workflow_scripts import sample as sample_script

CPU = torch.device("cpu")
GRID = (16, 16, 16)  # image grid of the toy latents: 4 voxels per latent voxel and axis
SF = 0.5  # their scale factor


def box_mask(rng) -> np.ndarray:
    """A random box of 3..8 voxels per axis on the image grid."""
    mask = np.zeros(GRID, np.uint8)
    size = rng.integers(3, 9, 3)
    corner = [rng.integers(0, g - s + 1) for g, s in zip(GRID, size, strict=True)]
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))] = 1
    return mask


def make_masked_latents(path, vae, n=24, empty=(1,)):
    """Toy latents with masks: row i has mean +-2 (its class), a random box mask (none for rows in
    ``empty``), a voided latent equal to mu outside the latent-grid mask and 0 inside; row i % 6:
    5 is test, 4 is val, the rest train; each row has its own affine."""
    rng = np.random.default_rng(1)
    header = Header(grid_affine=np.diag([4.0, 4.0, 4.0, 1.0]), grid_shape=GRID, class_names=CLASSES,
                    label_names=[], settings={"toy": True}, scale_factor=SF, vae_sha256=sha256_file(vae))
    with create_latents(path, n, SHAPE, header, mask_shape=GRID, with_voided=True) as writer:
        for i in range(n):
            mu = ((-2.0, 2.0)[i % 2] + rng.normal(size=SHAPE)).astype(np.float32)
            mask = np.zeros(GRID, np.uint8) if i in empty else box_mask(rng)
            hole = inpainting.latent_mask(mask[None], SHAPE[1:])[0].numpy()
            affine = np.diag([4.0, 4.0, 4.0, 1.0])
            affine[:3, 3] = i
            split = {5: "test", 4: "val"}.get(i % 6, "train")
            writer.append(f"toy{i:02d}", i % 2, split, affine=affine, mu=mu,
                          logvar=np.full(SHAPE, -6.0, np.float32), mask=mask, voided_mu=mu * (1 - hole))
        writer.set_latent_stats(np.zeros(SHAPE[0]), np.full(SHAPE[0], 2.0), SF)
    return path


@pytest.fixture
def toy(tmp_path):
    vae = make_vae_file(tmp_path / "vae.pt")
    return vae, make_masked_latents(tmp_path / "latents.h5", vae)


def train(toy, tmp_path, name="run", **sections):
    vae, latents = toy
    Trainer(ldm_settings(**sections), latents, vae, tmp_path / name, tmp_path / f"{name}.pt", CPU,
            progress=False).run()
    return tmp_path / f"{name}.pt"


# ---- the latent-grid mask and the condition ---------------------------------------------------

def test_latent_mask_marks_every_block_that_holds_a_masked_voxel():
    mask = np.zeros((2, 8, 8, 12), np.uint8)
    mask[0, 5, 2, 7] = 1  # one voxel: block (2, 1, 3) of the 4x4x6 latent grid
    mask[1, 0:4, 4:6, 10:12] = 1  # a full block (0, 2, 5) and its neighbour's half
    got = inpainting.latent_mask(mask, (4, 4, 6))
    assert got.shape == (2, 1, 4, 4, 6) and got.dtype == torch.float32
    assert torch.nonzero(got[0, 0]).tolist() == [[2, 1, 3]]
    assert torch.nonzero(got[1, 0]).tolist() == [[0, 2, 5], [1, 2, 5]]


def test_condition_reaches_the_network():
    """A model trained to fill the hole from the visible part: the hole's sign follows the
    condition's. With the voided latent or the mask zeroed it could not."""
    torch.manual_seed(0)
    strategy = diffusion.build_strategy({"name": "rflow"})
    model = build_diffusion_model(TINY_UNET, SHAPE[0], 0, cond_channels=inpainting.condition_channels(SHAPE[0]))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    hole = torch.zeros(1, 1, *SHAPE[1:])
    hole[..., 1:3, 1:3, 1:3] = 1

    def batch(n):
        sign = torch.where(torch.rand(n) < 0.5, -1.5, 1.5).view(-1, 1, 1, 1, 1)
        x0 = sign + 0.3 * torch.randn(n, *SHAPE)
        return x0, inpainting.conditioning(x0 * (1 - hole), hole.expand(n, -1, -1, -1, -1))

    for _ in range(200):
        x0, cond = batch(32)
        loss = diffusion.diffusion_loss(model, strategy, x0, torch.zeros(32, dtype=torch.long), cond=cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x0, cond = batch(16)
    out = diffusion.sample(model, strategy, torch.randn(16, *SHAPE), torch.zeros(16, dtype=torch.long),
                           sampler="rflow", steps=20, guidance_scale=1.0, null_class=0, cond=cond)
    inside = (out * hole).sum((1, 2, 3, 4)) / (hole.sum() * SHAPE[0])
    truth = x0.mean((1, 2, 3, 4))
    assert (torch.sign(inside) == torch.sign(truth)).all(), (inside, truth)


def test_guidance_mixes_class_passes_that_share_the_condition():
    torch.manual_seed(0)
    model = build_diffusion_model(TINY_UNET, SHAPE[0], 2, cond_channels=inpainting.condition_channels(SHAPE[0]))
    for p in model.parameters():  # an untrained UNet outputs 0
        p.data.normal_(0, 0.05)
    x, t, labels = torch.randn(3, *SHAPE), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 0])
    cond = inpainting.conditioning(torch.randn(3, *SHAPE), (torch.rand(3, 1, *SHAPE[1:]) < 0.3).float())
    with torch.no_grad():
        out = diffusion.guided_prediction(model, x, t, labels, 2.0, 2, cond)
        c = model(diffusion.with_condition(x, cond), t, class_labels=labels)
        u = model(diffusion.with_condition(x, cond), t, class_labels=torch.full_like(labels, 2))
    torch.testing.assert_close(out, u + 2.0 * (c - u))


def test_dit3d_takes_the_condition_as_input_channels():
    model = build_diffusion_model({"name": "dit3d", "variant": "S/2", "hidden_size": 24, "depth": 1, "num_heads": 2},
                                  SHAPE[0], 2, cond_channels=inpainting.condition_channels(SHAPE[0]))
    x = torch.randn(2, *SHAPE)
    cond = inpainting.conditioning(torch.randn(2, *SHAPE), torch.ones(2, 1, *SHAPE[1:]))
    assert model(diffusion.with_condition(x, cond), torch.tensor([3, 700]), class_labels=torch.tensor([0, 2])).shape == x.shape


def test_inpaint_training_pairs_each_latent_with_its_own_condition(toy, tmp_path):
    vae, latents = toy
    trainer = Trainer(ldm_settings(task="inpaint"), latents, vae, tmp_path / "r", tmp_path / "r.pt", CPU,
                      progress=False)
    assert len(trainer.mu) == 15  # 16 train rows, one with an empty mask
    x0, labels, cond = trainer._batch()
    voided, hole = cond[:, :SHAPE[0]], cond[:, SHAPE[0]:]
    assert hole.sum() > 0 and set(hole.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(voided, x0 * (1 - hole))  # scaled alike, same rows


def test_inpaint_ldm_records_its_task_and_condition(toy, tmp_path):
    vae, _ = toy
    path = train(toy, tmp_path, task="inpaint", train={"steps": 8})
    ldm = diffusion.load_ldm(path, vae_path=vae)
    assert ldm.task == "inpaint" and ldm.conditioning["channels"] == SHAPE[0] + 1
    assert ldm.conditioning["mask_pooling"] == "max"
    first = next(m for m in ldm.model.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.in_channels == 2 * SHAPE[0] + 1
    plain = diffusion.load_ldm(train(toy, tmp_path, "plain", train={"steps": 8}), vae_path=vae)
    assert plain.task == "generate" and plain.conditioning is None


def test_inpaint_training_without_masks_is_refused(tmp_path):
    vae = make_vae_file(tmp_path / "vae.pt")
    latents = make_latents(tmp_path / "plain.h5", vae)
    with pytest.raises(InputError, match=r"plain\.h5 has no mask or voided_mu.*demo\.masks.*export_latents"):
        Trainer(ldm_settings(task="inpaint"), latents, vae, tmp_path / "r", tmp_path / "r.pt", CPU)


# ---- RePaint ----------------------------------------------------------------------------------

def test_repaint_schedule_jumps_back_as_configured():
    assert inpainting.repaint_schedule(6, 2, 1) == list(range(7))
    path = inpainting.repaint_schedule(10, 2, 3)
    assert path[0] == 0 and path[-1] == 10
    moves = np.diff(path)
    assert set(moves.tolist()) == {1, -2}
    back_from = [p for p, m in zip(path, [*moves, 0], strict=True) if m < 0]
    assert back_from == [2, 2, 4, 4, 6, 6, 8, 8]  # r = 8, 6, 4, 2 steps left, twice each
    assert (moves == 1).sum() == 10 + 2 * 2 * 4  # each jump costs jump_length steps again


@pytest.mark.parametrize("strategy", [{"name": "rflow"}, {"name": "ddpm", "prediction": "v_prediction"}])
def test_renoise_reaches_the_marginal_of_the_noisier_level(strategy):
    strategy = diffusion.build_strategy(strategy)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 2.0)
    x_t = inpainting.renoise(strategy, x0, None, 300, torch.randn(x0.shape, generator=g))
    x_u = inpainting.renoise(strategy, x_t, 300, 700, torch.randn(x0.shape, generator=g))
    a, b = inpainting._signal_noise(strategy, 700)
    assert abs(x_u.mean().item() - 2 * a) < 0.01 and abs(x_u.std().item() - b) < 0.01


@pytest.mark.parametrize("strategy,sampler,steps", [
    ({"name": "rflow"}, "rflow", 12),
    ({"name": "ddpm"}, "ddim", 12),
    ({"name": "ddpm", "timesteps": 12}, "ddpm", 12),
])
def test_repaint_keeps_the_known_region_real(strategy, sampler, steps):
    torch.manual_seed(0)
    strategy = diffusion.build_strategy(strategy)
    model = build_diffusion_model(TINY_UNET, SHAPE[0], 2)
    for p in model.parameters():  # an untrained UNet outputs 0; any non-trivial network will do
        p.data.normal_(0, 0.05)
    real = torch.randn(3, *SHAPE)
    known = torch.ones(3, 1, *SHAPE[1:])
    known[:, :, :2] = 0
    calls = []
    net = lambda x, t, class_labels: calls.append(x) or model(x, t, class_labels=class_labels)  # noqa: E731
    out = inpainting.repaint(net, strategy, torch.randn(3, *SHAPE), torch.tensor([0, 1, 2]), sampler=sampler,
                             steps=steps, guidance_scale=2.0, null_class=2, real=real, known=known,
                             jump_length=3, jump_n_sample=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out * known, real * known, rtol=0, atol=0)
    assert not torch.allclose(out * (1 - known), real * (1 - known), atol=0.1)
    assert len(calls) == len(inpainting.repaint_schedule(steps, 3, 2)) - 1 - 3  # 3 jumps run no network


# ---- inpaint sample sets ----------------------------------------------------------------------

def run_sample(tmp_path, ldm, vae, real, name="set", **settings):
    out = tmp_path / f"{name}.h5"
    values = {"steps": 6, "guidance_scale": 1.0, "batch_size": 4, "task": "inpaint", **settings}
    argv = ["--ldm", str(ldm), "--vae", str(vae), "--out", str(out), "--name", name, "--device", "cpu",
            "--settings", json.dumps(sample_set_settings(**values))]
    if real is not None:
        argv += ["--real", str(real)]
    assert sample_script.main(argv) == 0
    return out


@pytest.mark.parametrize("method", ["trained", "repaint"])
def test_inpaint_set_writes_the_contract(toy, tmp_path, method):
    vae, real = toy
    ldm = train(toy, tmp_path, task="inpaint" if method == "trained" else "generate", train={"steps": 8})
    out = run_sample(tmp_path, ldm, vae, real, method=method, draws=2, repaint={"jump_length": 2})
    with open_latents(real) as r, open_latents(out) as f:
        rows = [i for i in r.indices("test")]
        assert len(f) == 2 * len(rows) and f.logvar is None and f.voided_mu is None
        assert f.subject_ids == [f"{r.subject_ids[i]}-inp{k}" for i in rows for k in (0, 1)]
        assert f.source_ids == [r.subject_ids[i] for i in rows for _ in (0, 1)]
        for j, i in enumerate(np.repeat(rows, 2)):
            assert f.class_index[j] == r.class_index[i] and f.splits[j] == "test"
            np.testing.assert_array_equal(f.affines[j], r.affines[i])
            np.testing.assert_array_equal(f.mask[j], r.mask[i])
        assert not np.allclose(f.mu[0], f.mu[1])  # two draws differ
        assert f.header.scale_factor == SF and f.header.settings["method"] == method
        if method == "repaint":  # outside the latent-grid mask: the real latent, unscaled
            known = 1 - inpainting.latent_mask(f.mask[:], SHAPE[1:]).numpy()
            np.testing.assert_allclose(f.mu[:] * known, np.repeat(r.mu[rows], 2, axis=0) * known, rtol=0, atol=1e-6)


def test_inpaint_set_bad_input(toy, tmp_path):
    vae, real = toy
    plain = train(toy, tmp_path, train={"steps": 4})
    with pytest.raises(InputError, match="task: inpaint"):
        run_sample(tmp_path, plain, vae, real, method="trained")
    with pytest.raises(InputError, match="--real"):
        run_sample(tmp_path, plain, vae, None, method="repaint")
    only_empty = make_masked_latents(tmp_path / "empty.h5", vae, empty=range(24))
    with pytest.raises(InputError, match=r"empty\.h5: no row of split 'test' has a non-empty inpainting mask"):
        run_sample(tmp_path, plain, vae, only_empty, method="repaint")
    unmasked = make_latents(tmp_path / "unmasked.h5", vae)
    with pytest.raises(InputError, match=r"unmasked\.h5 has no mask"):
        run_sample(tmp_path, plain, vae, unmasked, method="repaint")
    assert not list(tmp_path.glob("set.h5*"))  # nothing complete-looking left


@pytest.mark.parametrize("fill, message", [
    ({"method": "trained"}, "sample_sets.fill inpaints with method trained, but ldm.demo has task 'generate'"),
    ({"method": "repaint", "keep_known": True}, "sample_sets.fill.keep_known is for method trained"),
])
def test_workflow_refuses_inpaint_sets_the_model_cannot_run(tmp_path, fill, message):
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config["sample_sets"]["fill"] = {"ldm": "demo", "task": "inpaint", **fill}
    proc = run_snakemake(tmp_path, "-n", config=config, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout


# ---- fine-tuning from a generative model, the mask-weighted loss, the clamped known region ----

def test_mask_weight_averages_the_error_over_the_weighted_voxels():
    strategy = diffusion.build_strategy({"name": "rflow"})
    x0, labels = torch.randn(2, *SHAPE), torch.tensor([0, 1])
    zero = lambda x, t, class_labels: torch.zeros_like(x0)  # noqa: E731  error = the target itself
    region = torch.zeros(2, 1, *SHAPE[1:])
    region[:, :, :2] = 1

    def loss(weight):
        torch.manual_seed(0)
        return diffusion.diffusion_loss(zero, strategy, x0, labels, weight=weight)

    torch.manual_seed(0)
    noise, t = torch.randn_like(x0), strategy.sample_timesteps(x0)
    _, target = strategy.noisy_and_target(x0, noise, t)
    inside = (target.pow(2) * region).flatten(1).sum(1) / (region.flatten(1).sum(1) * SHAPE[0])
    torch.testing.assert_close(loss(region), inside.mean())
    torch.testing.assert_close(loss(torch.ones_like(region)), loss(None))
    assert not torch.isclose(loss(1 + 4 * region), loss(None))


def test_init_from_starts_the_inpainting_model_as_the_generative_one(toy, tmp_path):
    vae, latents = toy
    base = train(toy, tmp_path, "base", train={"steps": 8})
    trainer = Trainer(ldm_settings(task="inpaint", train={"steps": 4}), latents, vae, tmp_path / "r",
                      tmp_path / "r.pt", CPU, progress=False, init_path=base)
    plain = diffusion.load_ldm(base).model
    x, t, y = torch.randn(2, *SHAPE), torch.tensor([10, 900]), torch.tensor([0, 2])
    cond = torch.randn(2, SHAPE[0] + 1, *SHAPE[1:])  # any condition: its weights start at zero
    with torch.no_grad():
        for model in (trainer.model, trainer.ema.module):
            torch.testing.assert_close(model(diffusion.with_condition(x, cond), t, class_labels=y),
                                       plain(x, t, class_labels=y))
    before = sha256_file(base)
    trainer.run()
    saved = torch.load(tmp_path / "r.pt", weights_only=False)
    assert saved["provenance"]["inputs_sha256"]["init_from"] == before == sha256_file(base)
    wider = ldm_settings(task="inpaint", model={"channels": [16, 32], "num_res_blocks": 2})
    with pytest.raises(InputError, match=r"init_from .*base\.pt: its `model`.*differs"):
        Trainer(wider, latents, vae, tmp_path / "w", tmp_path / "w.pt", CPU, init_path=base)


def test_keep_known_clamps_the_trained_model_to_the_real_latent(toy, tmp_path):
    vae, real = toy
    ldm = train(toy, tmp_path, task="inpaint", train={"steps": 8})
    out = run_sample(tmp_path, ldm, vae, real, method="trained", keep_known=True)
    with open_latents(real) as r, open_latents(out) as f:
        rows = list(r.indices("test"))
        known = 1 - inpainting.latent_mask(f.mask[:], SHAPE[1:]).numpy()
        np.testing.assert_allclose(f.mu[:] * known, r.mu[rows] * known, rtol=0, atol=1e-6)
        assert not np.allclose(f.mu[:] * (1 - known), r.mu[rows] * (1 - known), atol=0.1)


@pytest.mark.parametrize("init_from, message", [
    ("nope", "ldm.fill.init_from names 'nope', which is not an ldm entry"),
    ("fill", r"init_from goes round in a circle \(fill -> fill\)"),
    ("wide", "names ldm 'wide', whose `vae` or `model` differs"),
])
def test_workflow_refuses_a_bad_init_from(tmp_path, init_from, message):
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    demo = config["ldm"]["demo"]
    config["ldm"]["wide"] = {**demo, "model": {**demo.get("model", {}), "channels": [8, 16]}}
    config["ldm"]["fill"] = {**demo, "task": "inpaint", "init_from": init_from}
    proc = run_snakemake(tmp_path, "-n", config=config, check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr + proc.stdout), (proc.stderr + proc.stdout)[-2000:]
