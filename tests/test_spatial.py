"""Spatial conditioning: condition maps on the latent grid, conditioned training and sample sets (CPU, toys)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medldm.data.h5layout import Header, create_latents, create_volumes, open_latents
from medldm.diffusion import process as diffusion
from medldm.diffusion import spatial
from medldm.diffusion.training import Trainer
from medldm.errors import InputError
from medldm.provenance import sha256_file
from tests.ldm_toys import (  # noqa: F401 (one_thread is a fixture)
    CLASSES,
    SHAPE,
    ldm_settings,
    make_latents,
    make_vae_file,
    one_thread,
    sample_set_settings,
)
from workflow_scripts import sample as sample_script

CPU = torch.device("cpu")
GRID = (16, 16, 16)  # 4 image voxels per latent voxel and axis
LABELS = ["background", "inside"]


# ---- the latent grid keeps label geometry -----------------------------------------------------

def test_area_pooling_gives_label_fractions_and_nearest_the_block_centre():
    label = np.zeros((1, 8, 8, 8), np.uint8)
    label[0, 0:4, 0:4, 0:4] = 1  # exactly latent block (0, 0, 0)
    label[0, 4:6, 4:8, 4:8] = 2  # half of block (1, 1, 1): its low half along x
    label[0, 5, 0, 0] = 2  # one voxel of block (1, 0, 0)
    area = spatial.latent_maps(["label"], (2, 2, 2), "area", 3, label=label)[0]
    assert area.shape == (3, 2, 2, 2)
    torch.testing.assert_close(area.sum(0), torch.ones(2, 2, 2))  # fractions of every label sum to 1
    assert area[1, 0, 0, 0] == 1 and area[1].sum() == 1
    assert area[2, 1, 1, 1] == 0.5 and area[0, 1, 1, 1] == 0.5
    assert area[2, 1, 0, 0] == 1 / 64
    near = spatial.latent_maps(["label"], (2, 2, 2), "nearest", 3, label=label)[0]
    assert set(near.unique().tolist()) == {0.0, 1.0}  # one-hot: the block centre (index 2 of 0..3)
    assert near[1, 0, 0, 0] == 1 and near[0, 1, 0, 0] == 1  # the lone voxel (x=5) is not a centre
    assert near[0, 1, 1, 1] == 1  # centre x=6 of block x 4..7 is background


def test_mask_and_label_maps_stack_in_the_named_order():
    label = np.zeros((2, 8, 8, 8), np.uint8)
    mask = np.zeros((2, 8, 8, 8), np.uint8)
    mask[1, :4] = 1
    maps = spatial.latent_maps(["mask", "label"], (2, 2, 2), "area", 2, label=label, mask=mask)
    assert maps.shape == (2, 3, 2, 2, 2) and spatial.channels(["mask", "label"], 2) == 3
    assert maps[1, 0, 0].eq(1).all() and maps[1, 0, 1].eq(0).all() and maps[:, 1].eq(1).all()


def test_bad_kinds_and_label_values_are_refused():
    with pytest.raises(InputError, match="not supported yet"):
        spatial.check_kinds(["image"], "ldm.x.conditions")
    with pytest.raises(InputError, match="unknown"):
        spatial.check_kinds(["labels"], "ldm.x.conditions")
    with pytest.raises(InputError, match=r"label value 3 is outside 0..1"):
        spatial.one_hot(np.full((1, 2, 2, 2), 3), 2, "toy.h5")


# ---- conditioned training and sampling ----------------------------------------------------------

def box(rng) -> np.ndarray:
    """A random box of whole latent blocks (4..8 voxels per axis) on the image grid."""
    label = np.zeros(GRID, np.uint8)
    lo = rng.integers(0, 3, 3) * 4
    size = rng.integers(1, 3, 3) * 4
    label[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] = 1
    return label


def make_label_latents(path, vae, n=48, with_labels=True):
    """Toy latents whose value follows their label map: +1.5 in the box, -1.5 outside (+ noise).
    Rows i % 6 == 5 are test, == 4 val, others train; each row has its own affine."""
    rng = np.random.default_rng(2)
    header = Header(grid_affine=np.diag([4.0, 4.0, 4.0, 1.0]), grid_shape=GRID, class_names=CLASSES,
                    label_names=LABELS, settings={"toy": True}, scale_factor=1.0, vae_sha256=sha256_file(vae))
    with create_latents(path, n, SHAPE, header, label_shape=GRID if with_labels else None) as writer:
        for i in range(n):
            label = box(rng)
            inside = spatial.latent_maps(["label"], SHAPE[1:], "area", 2, label=label[None])[0, 1].numpy()
            mu = (3.0 * inside - 1.5 + 0.2 * rng.normal(size=SHAPE)).astype(np.float32)
            affine = np.diag([4.0, 4.0, 4.0, 1.0])
            affine[:3, 3] = i
            split = {5: "test", 4: "val"}.get(i % 6, "train")
            writer.append(f"toy{i:02d}", i % 2, split, affine=affine, mu=mu, logvar=np.full(SHAPE, -6.0, np.float32),
                          label=label if with_labels else None)
        writer.set_latent_stats(np.zeros(SHAPE[0]), np.ones(SHAPE[0]), 1.0)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A label-conditioned toy ldm (one training shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("spatial")
    vae = make_vae_file(tmp / "vae.pt")
    latents = make_label_latents(tmp / "latents.h5", vae)
    settings = ldm_settings(conditions=["label"], train={"steps": 150, "condition_dropout": 0.1})
    Trainer(settings, latents, vae, tmp / "run", tmp / "ldm.pt", CPU, progress=False).run()
    return vae, latents, tmp / "ldm.pt"


def run_sample(tmp_path, ldm, vae, name="set", real=None, source=None, **settings):
    out = tmp_path / f"{name}.h5"
    values = {"steps": 10, "guidance_scale": 1.0, "batch_size": 8, "sampler": "rflow", **settings}
    argv = ["--ldm", str(ldm), "--vae", str(vae), "--out", str(out), "--name", name, "--device", "cpu",
            "--settings", json.dumps(sample_set_settings(**values))]
    argv += ["--real", str(real)] if real else []
    argv += ["--source", str(source)] if source else []
    assert sample_script.main(argv) == 0
    return out


def box_contrast(latents: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per volume: mean latent inside its box minus mean outside (latent grid)."""
    inside = np.broadcast_to((labels[:, None, ::4, ::4, ::4] > 0), latents.shape)  # boxes are whole blocks
    return np.array([v[m].mean() - v[~m].mean() for v, m in zip(latents, inside, strict=True)])


def test_ldm_records_its_condition_maps(trained):
    payload = torch.load(trained[2], weights_only=False)
    assert payload["conditioning"]["maps"] == ["label"] and payload["conditioning"]["channels"] == 2
    assert payload["conditioning"]["pooling"] == "area" and payload["conditioning"]["label_names"] == LABELS
    assert diffusion.load_ldm(trained[2]).conditioning["maps"] == ["label"]


def test_condition_maps_reach_the_network(trained, tmp_path, monkeypatch):
    """Samples conditioned on test maps are high inside each map's box and low outside; the same
    model with the maps zeroed at sampling has no such contrast."""
    vae, latents, ldm = trained
    out = run_sample(tmp_path, ldm, vae, real=latents, conditions={"from": "test"})
    with open_latents(out) as f:
        contrast = box_contrast(f.mu[:], f.label[:])
    assert (contrast > 1.5).all(), contrast
    monkeypatch.setattr(spatial, "downsample", lambda maps, grid, pooling: torch.zeros(
        (maps.shape[0], maps.shape[1], *grid)))
    zeroed = run_sample(tmp_path, ldm, vae, name="zeroed", real=latents, conditions={"from": "test"})
    with open_latents(zeroed) as f:
        ignored = box_contrast(f.mu[:], f.label[:])
    assert ignored.min() < 0.5 and ignored.mean() < contrast.mean() - 1, (ignored, contrast)


def test_set_from_test_writes_the_contract(trained, tmp_path):
    vae, latents, ldm = trained
    out = run_sample(tmp_path, ldm, vae, real=latents, conditions={"from": "test", "per_subject": 2},
                     condition_guidance_scale=1.5)
    with open_latents(latents) as r, open_latents(out) as f:
        rows = r.indices("test")
        assert f.subject_ids == [f"{r.subject_ids[i]}-c{k}" for i in rows for k in (0, 1)]
        assert f.source_ids == [r.subject_ids[i] for i in rows for _ in (0, 1)]
        for j, i in enumerate(np.repeat(rows, 2)):
            np.testing.assert_array_equal(f.label[j], r.label[i])
            np.testing.assert_array_equal(f.affines[j], r.affines[i])
            assert f.class_index[j] == r.class_index[i]
        assert f.mask is None and not np.allclose(f.mu[0], f.mu[1])


def make_source_volumes(path, n=3, with_labels=True, grid=GRID):
    rng = np.random.default_rng(5)
    header = Header(grid_affine=np.diag([4.0, 4.0, 4.0, 1.0]), grid_shape=grid, class_names=[], label_names=LABELS)
    with create_volumes(path, n, header, with_labels=with_labels) as writer:
        for i in range(n):
            label = (box(rng) if grid == GRID else np.ones(grid, np.uint8)) if with_labels else None
            writer.append(f"gen-{i}", -1, "synthetic", image=np.zeros(grid, np.float32), label=label)
    return path


def test_chained_set_conditions_on_another_sets_label_maps(trained, tmp_path):
    vae, _, ldm = trained
    source = make_source_volumes(tmp_path / "source.h5")
    out = run_sample(tmp_path, ldm, vae, source=source, conditions={"from": "labels"}, class_proportions={"HC": 1})
    with open_latents(out) as f, open_latents_or_volumes(source) as s:
        assert f.source_ids == s.subject_ids and f.subject_ids == [f"{sid}-c0" for sid in s.subject_ids]
        np.testing.assert_array_equal(f.label[:], s.label[:])
        assert (f.class_index == 0).all()
        assert box_contrast(f.mu[:], f.label[:]).mean() > 1.5  # the maps steer the volumes


def open_latents_or_volumes(path):
    from medldm.data.h5layout import open_volumes
    return open_volumes(path)


def test_conditioned_sets_bad_input(trained, tmp_path):
    vae, latents, ldm = trained
    with pytest.raises(InputError, match=r"has no `conditions`, but .*ldm\.pt was conditioned on maps \['label'\]"):
        run_sample(tmp_path, ldm, vae, n=2)
    imageonly = make_source_volumes(tmp_path / "imageonly.h5", with_labels=False)
    with pytest.raises(InputError, match=r"names set 'imgs', whose .*imageonly\.h5 has no `label` maps"):
        run_sample(tmp_path, ldm, vae, source=imageonly, conditions={"from": "imgs"})
    other = make_source_volumes(tmp_path / "other.h5", grid=(8, 8, 8))
    with pytest.raises(InputError, match=r"other\.h5 are on grid \(8, 8, 8\)"):
        run_sample(tmp_path, ldm, vae, source=other, conditions={"from": "small"})
    with pytest.raises(InputError, match=r"has no subjects in split 'val'"):
        empty = make_label_latents(tmp_path / "noval.h5", vae, n=4)  # rows 0..3: train only
        run_sample(tmp_path, ldm, vae, real=empty, conditions={"from": "val"})
    plain = tmp_path / "plain.pt"
    Trainer(ldm_settings(train={"steps": 2}), make_latents(tmp_path / "plain.h5", vae), vae, tmp_path / "plainrun",
            plain, CPU, progress=False).run()
    with pytest.raises(InputError, match=r"has `conditions` .*plain\.pt was not trained with condition maps"):
        run_sample(tmp_path, plain, vae, real=latents, conditions={"from": "test"})
    assert not list(tmp_path.glob("set.h5*"))  # nothing complete-looking left


def test_training_refuses_latents_without_the_named_maps(tmp_path):
    vae = make_vae_file(tmp_path / "vae.pt")
    latents = make_label_latents(tmp_path / "nolabels.h5", vae, n=12, with_labels=False)
    with pytest.raises(InputError, match=r"nolabels\.h5 has no 'label' dataset, but the ldm's `conditions`"):
        Trainer(ldm_settings(conditions=["label"], train={"steps": 2}), latents, vae, tmp_path / "run",
                tmp_path / "ldm.pt", CPU, progress=False)
    assert not (tmp_path / "ldm.pt").exists()


def test_map_guidance_mixes_three_passes():
    from medldm.diffusion.backbones import build_diffusion_model
    from tests.ldm_toys import TINY_UNET

    torch.manual_seed(0)
    model = build_diffusion_model(TINY_UNET, SHAPE[0], 2, cond_channels=2)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t, labels = torch.randn(2, *SHAPE), torch.tensor([10, 700]), torch.tensor([0, 1])
    maps = torch.rand(2, 2, *SHAPE[1:])
    null = torch.full_like(labels, 2)
    with torch.no_grad():
        out = diffusion.guided_prediction(model, x, t, labels, 2.0, 2, maps, map_scale=1.5)
        both = model(diffusion.with_condition(x, maps), t, class_labels=labels)
        maps_only = model(diffusion.with_condition(x, maps), t, class_labels=null)
        neither = model(diffusion.with_condition(x, torch.zeros_like(maps)), t, class_labels=null)
    torch.testing.assert_close(out, neither + 1.5 * (maps_only - neither) + 2.0 * (both - maps_only))
