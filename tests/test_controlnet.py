"""ControlNet on a frozen toy ldm: zero residual at init, training that follows the maps, the base
file untouched, resume, sample sets and bad input (CPU, toys)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from snakemake.utils import validate

from medldm.checkpoint import load_torch
from medldm.data.h5layout import open_latents
from medldm.diffusion import controlnet as cn
from medldm.diffusion import process as diffusion
from medldm.diffusion.training import Trainer
from medldm.errors import EXIT_INTERRUPTED, InputError
from medldm.provenance import sha256_file
from tests.ldm_toys import SCHEMA, ldm_settings, make_vae_file, one_thread, sample_set_settings  # noqa: F401
from tests.test_spatial import box_contrast, make_label_latents
from workflow_scripts import sample as sample_script

CPU = torch.device("cpu")


def controlnet_settings(**sections) -> dict:
    tiny = {"ldm": "tiny", "maps": "label",
            "train": {"steps": 150, "batch_size": 16, "lr": 2e-3, "warmup_steps": 5, "log_every": 10,
                      "val_every": 50, "checkpoint_every": 50, "ema_decay": 0.9}}
    for name, values in sections.items():
        tiny[name] = {**tiny.get(name, {}), **values} if isinstance(values, dict) else values
    config = {"controlnet": {"toy": tiny}}
    validate(config, str(SCHEMA))
    return config["controlnet"]["toy"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A class-only toy ldm on latents whose box (+1.5 inside, -1.5 outside) only the label map tells."""
    tmp = tmp_path_factory.mktemp("controlnet")
    vae = make_vae_file(tmp / "vae.pt")
    latents = make_label_latents(tmp / "latents.h5", vae)
    Trainer(ldm_settings(train={"steps": 100}), latents, vae, tmp / "ldm-run", tmp / "ldm.pt", CPU,
            progress=False).run()
    return vae, latents, tmp / "ldm.pt"


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    vae, latents, ldm = base
    tmp = tmp_path_factory.mktemp("controlnet-trained")
    before = sha256_file(ldm)
    trainer = cn.ControlNetTrainer(controlnet_settings(), ldm, latents, tmp / "run", tmp / "controlnet.pt", CPU,
                                   progress=False)
    assert trainer.run() == 0
    return vae, latents, ldm, tmp / "controlnet.pt", before


def run_sample(tmp_path, ldm, vae, controlnet, name="set", real=None, **settings):
    out = tmp_path / f"{name}.h5"
    values = {"steps": 10, "guidance_scale": 1.0, "batch_size": 8, "sampler": "rflow", "controlnet": "toy",
              **settings}
    argv = ["--ldm", str(ldm), "--vae", str(vae), "--out", str(out), "--name", name, "--device", "cpu",
            "--controlnet", str(controlnet), "--settings", json.dumps(sample_set_settings(**values))]
    argv += ["--real", str(real)] if real else []
    assert sample_script.main(argv) == 0
    return out


def test_contours_mark_label_boundaries_in_any_dimension():
    label = np.zeros((1, 6, 6), np.int64)
    label[0, 2:4, 2:4] = 2
    edge = cn.control_maps(label, "label", "contour", 3)[0, 0]
    inner = np.zeros((6, 6), bool)
    inner[1:5, 1:5] = True  # the square and its one-voxel ring
    np.testing.assert_array_equal(edge.numpy() > 0, inner)
    vol = np.zeros((1, 4, 4, 4), np.int64)
    vol[0, 2:] = 1
    edge3 = cn.control_maps(vol, "label", "contour", 2)[0, 0]
    assert edge3[1:3].eq(1).all() and edge3[0].eq(0).all() and edge3[3].eq(0).all()
    onehot = cn.control_maps(vol, "label", "none", 2)
    assert onehot.shape == (1, 2, 4, 4, 4) and onehot.sum(1).eq(1).all()


def test_init_is_the_base_exactly(base):
    """Zero output convolutions: the controlled model's output, and a whole sample, equal the base's."""
    vae, latents, ldm_path = base
    ldm = diffusion.load_ldm(ldm_path)
    net = cn.build_controlnet(ldm.settings["model"], ldm.latent_shape[0], len(ldm.class_names), 3, 2, [8, 16, 32])
    copied = cn.init_from_base(net, ldm.model)
    assert "conv_in.conv.weight" in copied and any(k.startswith("down_blocks.1") for k in copied)
    torch.testing.assert_close(net.state_dict()["down_blocks.0.resnets.0.conv1.conv.weight"],
                               ldm.model.state_dict()["down_blocks.0.resnets.0.conv1.conv.weight"])
    controlled = cn.Controlled(cn.freeze(ldm.model), net)
    maps = cn.control_maps(np.random.default_rng(0).integers(0, 2, (3, 16, 16, 16)), "label", "none", 2)
    x, t, y = torch.randn(3, *ldm.latent_shape), torch.tensor([5, 500, 900]), torch.tensor([0, 1, 2])
    down, mid = net(x, t, controlnet_cond=maps, class_labels=y)
    assert all(d.abs().max() == 0 for d in down) and mid.abs().max() == 0
    plain = diffusion.generate(ldm, np.array([0, 1, 0]), sampler="rflow", steps=5, guidance_scale=2.0, seed=3,
                               batch_size=3, device=CPU, progress=False)
    ldm.model = controlled
    steered = diffusion.generate(ldm, np.array([0, 1, 0]), sampler="rflow", steps=5, guidance_scale=2.0, seed=3,
                                 batch_size=3, device=CPU, progress=False, rows={"control": maps},
                                 reverse=cn.controlled_sample)
    np.testing.assert_allclose(steered, plain, rtol=0, atol=1e-5)


def test_a_2d_controlnet_starts_as_its_base_and_its_embedding_reaches_the_latent_grid():
    """Dimension comes from the latents: a 2D base UNet (64x48 images, f = 4 -> 16x12 latents)."""
    from monai.networks.nets import DiffusionModelUNet

    settings = {"name": "unet", "channels": [16, 32], "attention_levels": [False, True], "norm_num_groups": 8,
                "num_res_blocks": 1,
                "num_head_channels": 8}
    torch.manual_seed(0)
    base = DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=3, num_class_embeds=3,
                              **{k: v for k, v in settings.items() if k != "name"})
    with torch.no_grad():  # a "trained" base: MONAI zero-initialises its output convolution too
        for p in base.parameters():
            p.normal_(std=0.1)
    factor = cn.downsampling((64, 48), (16, 12), "toy")
    embedding = cn.embedding_channels({}, factor, "toy")
    assert factor == 4 and embedding == [16, 32, 64]
    net = cn.build_controlnet(settings, 3, 2, 2, 1, embedding)
    cn.init_from_base(net, base)
    label = np.zeros((2, 64, 48), np.int64)
    label[:, 10:30, 5:20] = 1
    maps = cn.control_maps(label, "label", "contour", 2)
    x, t, y = torch.randn(2, 3, 16, 12), torch.tensor([10, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(cn.Controlled(cn.freeze(base), net).bind(maps)(x, t, y), base(x, t, class_labels=y))
        torch.nn.init.normal_(net.controlnet_mid_block.conv.weight)  # a trained ControlNet: the output moves
        assert not torch.allclose(cn.Controlled(base, net).bind(maps)(x, t, y), base(x, t, class_labels=y))
    with pytest.raises(InputError, match=r"not one power-of-2 downsampling"):
        cn.downsampling((64, 48), (16, 16), "toy")


def test_controlnet_follows_the_maps_and_never_writes_the_base(trained, tmp_path):
    vae, latents, ldm, controlnet, before = trained
    assert sha256_file(ldm) == before
    payload = load_torch(controlnet)
    assert payload["base_sha256"] == before and payload["maps"] == "label" and payload["embedding"] == [16, 32, 64]
    steered = run_sample(tmp_path, ldm, vae, controlnet, real=latents, conditions={"from": "test"})
    control = run_sample(tmp_path, ldm, vae, controlnet, name="control", real=latents, conditions={"from": "test"},
                         conditioning_scale=0.0)
    with open_latents(steered) as f, open_latents(control) as g:
        follows, ignores = box_contrast(f.mu[:], f.label[:]), box_contrast(g.mu[:], g.label[:])
        np.testing.assert_array_equal(f.label[:], g.label[:])
    assert follows.mean() > ignores.mean() + 1.0 and follows.mean() > 1.0, (follows, ignores)


class StopAt:
    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def __bool__(self) -> bool:
        self.calls += 1
        return self.calls >= self.k


def test_resume_continues_exactly(base, tmp_path):
    vae, latents, ldm = base
    settings = controlnet_settings(train={"steps": 12, "checkpoint_every": 4, "val_every": 4, "log_every": 4})

    def train(name, stop=None):
        trainer = cn.ControlNetTrainer(settings, ldm, latents, tmp_path / name, tmp_path / f"{name}.pt", CPU,
                                       stop=stop, progress=False)
        return trainer, trainer.run()

    assert train("straight")[1] == 0
    assert train("stopped", StopAt(6))[1] == EXIT_INTERRUPTED and not (tmp_path / "stopped.pt").exists()
    trainer, code = train("stopped")
    assert code == 0 and trainer.start == 6
    a, b = load_torch(tmp_path / "straight.pt"), load_torch(tmp_path / "stopped.pt")
    for key in ("model_state", "ema_state"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=0, msg=f"{key} {name}")


def test_bad_bases_and_sets_are_refused(base, trained, tmp_path):
    vae, latents, ldm = base
    # a base with extra input channels (spatially conditioned) and a DiT base
    cond = Trainer(ldm_settings(conditions=["label"], train={"steps": 1}), latents, vae, tmp_path / "c",
                   tmp_path / "cond.pt", CPU, progress=False)
    cond.run()
    with pytest.raises(InputError, match=r"cond\.pt has task 'generate' with extra input channels \(\['label'\]\)"):
        cn.ControlNetTrainer(controlnet_settings(), tmp_path / "cond.pt", latents, tmp_path / "r1", tmp_path / "x.pt",
                             CPU, progress=False)
    dit = {**ldm_settings(train={"steps": 1}), "model": {"name": "dit3d", "variant": "S/2", "hidden_size": 32,
                                                         "depth": 1, "num_heads": 2}}
    Trainer(dit, latents, vae, tmp_path / "d", tmp_path / "dit.pt", CPU, progress=False).run()
    with pytest.raises(InputError, match=r"dit\.pt is a 'dit3d' model; a ControlNet needs a unet base"):
        cn.ControlNetTrainer(controlnet_settings(), tmp_path / "dit.pt", latents, tmp_path / "r2", tmp_path / "x.pt",
                             CPU, progress=False)
    with pytest.raises(InputError, match=r"conditioning_embedding_num_channels has 2 entries.*downsamples by 4"):
        cn.ControlNetTrainer(controlnet_settings(model={"conditioning_embedding_num_channels": [8, 16]}), ldm,
                             latents, tmp_path / "r3", tmp_path / "x.pt", CPU, progress=False)
    nolabels = make_label_latents(tmp_path / "nolabels.h5", vae, with_labels=False)
    with pytest.raises(InputError, match=r"nolabels\.h5 has no 'label' dataset"):
        cn.ControlNetTrainer(controlnet_settings(), ldm, nolabels, tmp_path / "r4", tmp_path / "x.pt", CPU,
                             progress=False)
    # sampling: no conditions; a base other than the one trained on
    _, _, _, controlnet, _ = trained
    with pytest.raises(InputError, match=r"names a controlnet but has no `conditions`"):
        run_sample(tmp_path, ldm, vae, controlnet, n=2)
    with pytest.raises(InputError, match=r"was trained on a base ldm\.pt with sha256"):
        run_sample(tmp_path, tmp_path / "cond.pt", vae, controlnet, real=latents, conditions={"from": "test"})
    assert not list(tmp_path.glob("set.h5*"))
