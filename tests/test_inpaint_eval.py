"""Inpainting data path end to end through the scripts, without the sampler: export_latents with
masks, a toy inpainted latents file written through h5layout as the sample step would (contract in
medldm/data/h5layout.py), decode with paste-back, evaluate_inpainting; and the in-mask metrics."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medldm.autoencoder import networks as ae
from medldm.data import h5layout
from medldm.data.masks import random_ellipsoids
from medldm.errors import InputError
from medldm.evaluation.inpainting import masked_metrics, mean_fill, score_methods
from medldm.io import save_nifti
from tests.test_autoencoder import _untrained_vae
from tests.vae_toys import single_thread, toy_set, vae_settings, write_prepared  # noqa: F401
from workflow_scripts import decode, evaluate_inpainting, export_latents

pytestmark = pytest.mark.usefixtures("single_thread")
SPLITS = ["train", "train", "val", "test", "test", "test"]


@pytest.fixture
def prepared_with_masks(tmp_path):
    """Six toy subjects with one random mask each (inside the head), a manifest with a mask column,
    an untrained tiny autoencoder and its latents.h5 (with masks and voided_mu)."""
    data = toy_set(6, splits=SPLITS)
    rng = np.random.default_rng(0)
    data.masks = torch.from_numpy(np.stack([random_ellipsoids(data.labels[i].numpy() > 0, 2, rng, (2, 3))
                                            for i in range(len(data))]))
    manifest = write_prepared(tmp_path / "prepared", data)
    table = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    table["mask"] = [str(tmp_path / "prepared" / sid / "mask.nii.gz") for sid in data.subject_ids]
    for i, path in enumerate(table["mask"]):
        save_nifti(path, data.masks[i].numpy(), data.affines[i])
    table.to_csv(manifest, sep="\t", index=False)
    settings = vae_settings(paired_labels=False)
    vae_path, latents_path = tmp_path / "vae.pt", tmp_path / "latents.h5"
    _untrained_vae(vae_path, settings)
    inference = json.dumps(settings["inference"])
    assert export_latents.main(["--vae", str(vae_path), "--manifest", str(manifest), "--settings", inference,
                                "--out", str(latents_path)]) == 0
    return data, manifest, vae_path, latents_path, inference


def write_inpainted_set(path, latents_path, draws=2, split="test"):
    """What the sample step writes for an inpaint set: rows <source>-inp<k> of the split's real rows,
    with the source's id, affine, class, split and mask (latents: noise, as from an untrained model)."""
    rng = np.random.default_rng(1)
    with h5layout.open_latents(latents_path) as real:
        rows = [i for i in real.indices(split)]
        header, shape = real.header, real.mu.shape[1:]
        with h5layout.create_latents(path, len(rows) * draws, shape, real.header, with_logvar=False,
                                     mask_shape=header.grid_shape, with_source=True) as writer:
            for i in rows:
                for k in range(draws):
                    writer.append(f"{real.subject_ids[i]}-inp{k}", int(real.class_index[i]), real.splits[i],
                                  affine=real.affines[i], source_id=real.subject_ids[i],
                                  mu=rng.normal(size=shape).astype(np.float32), mask=real.mask[i])
            writer.set_latent_stats(np.zeros(shape[0]), np.ones(shape[0]), header.scale_factor)
    return path


def test_export_stores_masks_and_voided_latents(prepared_with_masks):
    data, _, vae_path, latents_path, _ = prepared_with_masks
    net, _ = ae.load_vae(vae_path)
    voided = data.images * (1 - data.masks[:, None].float())
    mu, _ = ae.encode_posterior(net, voided)
    full, _ = ae.encode_posterior(net, data.images)
    with h5layout.open_latents(latents_path) as lat:
        assert np.array_equal(lat.mask[:], data.masks.numpy())
        np.testing.assert_allclose(lat.voided_mu[:], mu.numpy(), atol=1e-5)
        np.testing.assert_allclose(lat.mu[:], full.numpy(), atol=1e-5)
        assert not np.allclose(lat.voided_mu[:], lat.mu[:])


@pytest.mark.parametrize("blend", [0, 2])
def test_decode_pastes_the_source_back_outside_the_mask(tmp_path, prepared_with_masks, blend):
    data, manifest, vae_path, latents_path, inference = prepared_with_masks
    inpainted = write_inpainted_set(tmp_path / "set" / "latents.h5", latents_path)
    out, nifti = tmp_path / "set" / "volumes.h5", tmp_path / "set" / "nifti"
    args = ["--vae", str(vae_path), "--latents", str(inpainted), "--settings", inference, "--out", str(out),
            "--nifti-dir", str(nifti)]
    with pytest.raises(InputError, match="need --manifest"):
        decode.main(args)
    assert not out.exists()
    args[args.index("--settings") + 1] = json.dumps({**json.loads(inference), "blend_voxels": blend})
    assert decode.main([*args, "--manifest", str(manifest)]) == 0
    row_of = {sid: i for i, sid in enumerate(data.subject_ids)}
    with h5layout.open_volumes(out) as vol:
        assert vol.source_ids == [s for s in data.subject_ids[3:] for _ in range(2)]
        assert vol.subject_ids[:2] == ["toy03-inp0", "toy03-inp1"]
        for i, (sid, src) in enumerate(zip(vol.subject_ids, vol.source_ids, strict=True)):
            original, mask = data.images[row_of[src], 0].numpy(), data.masks[row_of[src]].numpy().astype(bool)
            assert np.array_equal(vol.mask[i], mask)
            assert np.array_equal(vol.image[i][~mask], original[~mask])  # exactly the input outside
            assert not np.allclose(vol.image[i][mask], original[mask])  # the fill inside
            written = nib.load(nifti / sid / "image.nii.gz")
            np.testing.assert_allclose(written.affine, data.affines[row_of[src]])  # the source's own geometry
            assert np.array_equal(np.asarray(written.dataobj)[~mask], original[~mask])
        assert not np.allclose(vol.affines[0], vol.affines[-1])


def test_evaluate_inpainting_scores_inside_the_masks(tmp_path, prepared_with_masks):
    data, manifest, vae_path, latents_path, inference = prepared_with_masks
    inpainted = write_inpainted_set(tmp_path / "set" / "latents.h5", latents_path)
    volumes = tmp_path / "set" / "volumes.h5"
    assert decode.main(["--vae", str(vae_path), "--latents", str(inpainted), "--settings", inference,
                        "--out", str(volumes), "--nifti-dir", str(tmp_path / "nifti"), "--manifest", str(manifest)]) == 0
    out_json, out_csv = tmp_path / "eval" / "inpainting.json", tmp_path / "eval" / "inpainting.csv"
    settings = json.dumps({"inference": json.loads(inference), "blend_voxels": 0, "bootstrap": 50, "seed": 0})
    assert evaluate_inpainting.main(["--volumes", str(volumes), "--latents", str(latents_path), "--vae", str(vae_path),
                                     "--manifest", str(manifest), "--settings", settings, "--out-json", str(out_json),
                                     "--out-csv", str(out_csv)]) == 0
    result = json.loads(out_json.read_text())
    assert result["n_volumes"] == 6 and result["n_sources"] == 3
    assert set(result["methods"]) == {"inpainted", "autoencoder", "mean_fill"}
    for method in result["methods"].values():
        assert method["outside_max_abs"] == 0
        for metric in ("ssim", "psnr", "mse"):
            assert method[metric]["ci_low"] <= method[metric]["mean"] <= method[metric]["ci_high"]
    per_volume = pd.read_csv(out_csv)
    assert len(per_volume) == 18
    # the mean-fill baseline recomputed here from the prepared data
    first = per_volume[(per_volume["method"] == "mean_fill") & (per_volume["volume"] == "toy04-inp1")].iloc[0]
    original, mask = data.images[4, 0].numpy(), data.masks[4].numpy()
    assert first["mse"] == pytest.approx(masked_metrics(mean_fill(original, mask), original, mask)["mse"])
    # the report: a table of every fill and the side-by-side figure
    from medldm.report.page import build_report

    page = build_report({"manifest": str(manifest), "sample_sets": {"inp": {
        "ldm": "m", "volumes": str(volumes), "metrics": None, "classifier": None, "saliency": [],
        "inpainting": str(out_json)}}}, {"classes": ["HC", "TLE"]}, tmp_path / "figures")
    assert "Inpainting (scored inside the masks)" in page and "baseline: mean foreground fill" in page
    assert (tmp_path / "figures" / "inpainting_inp.png").is_file()
    # a volumes file that is not an inpainted set is refused by name
    with pytest.raises(InputError, match="not an inpainted set"):
        plain = tmp_path / "plain.h5"
        with h5layout.create_volumes(plain, 1, h5layout.open_volumes(volumes).header) as writer:
            writer.append("x", 0, "synthetic", image=original)
        evaluate_inpainting.main(["--volumes", str(plain), "--latents", str(latents_path), "--vae", str(vae_path),
                                  "--manifest", str(manifest), "--settings", settings, "--out-json",
                                  str(tmp_path / "x.json"), "--out-csv", str(tmp_path / "x.csv")])


def test_masked_metrics_on_known_errors():
    rng = np.random.default_rng(0)
    target = rng.uniform(0.2, 0.8, (24, 24, 24)).astype(np.float32)
    mask = np.zeros(target.shape, np.uint8)
    mask[8:16, 8:16, 8:16] = 1
    pred = target + 0.1 * mask  # an error of exactly 0.1 inside, none outside
    m = masked_metrics(pred, target, mask)
    assert m["mse"] == pytest.approx(0.01, rel=1e-4)
    assert m["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert m["outside_max_abs"] == 0
    assert m["ssim"] < 1
    perfect = masked_metrics(target, target, mask)
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["mse"] == 0 and perfect["psnr"] == 100.0
    # an error far outside the mask changes neither the in-mask scores nor goes unnoticed outside
    far = target.copy()
    far[0:3, 0:3, 0:3] += 0.3
    m_far = masked_metrics(far, target, mask)
    assert m_far["ssim"] == pytest.approx(1.0) and m_far["mse"] == 0
    assert m_far["outside_max_abs"] == pytest.approx(0.3, rel=1e-5)
    # the in-mask SSIM is the SSIM map's mean over the mask: noise inside lowers it more than a small shift
    noisy = np.where(mask > 0, target + rng.normal(0, 0.1, target.shape), target).astype(np.float32)
    assert masked_metrics(noisy, target, mask)["ssim"] < m["ssim"]


def test_mean_fill_and_bootstrap_summary():
    original = np.zeros((8, 8, 8), np.float32)
    original[2:6, 2:6, 2:6] = 0.5
    original[3, 3, 3] = 0.9
    mask = np.zeros_like(original, np.uint8)
    mask[3, 3, 3] = 1
    filled = mean_fill(original, mask)
    assert filled[3, 3, 3] == pytest.approx(0.5) and np.array_equal(filled[mask == 0], original[mask == 0])
    rows = {"a": [{"ssim": v, "psnr": v, "mse": v, "outside_max_abs": 0.0} for v in (1.0, 2.0, 3.0, 4.0)]}
    summary = score_methods(rows, replicates=200, seed=0)["a"]
    assert summary["ssim"]["mean"] == 2.5 and 1.0 <= summary["ssim"]["ci_low"] < 2.5 < summary["ssim"]["ci_high"] <= 4.0
    assert summary["outside_max_abs"] == 0.0 and not math.isnan(summary["psnr"]["ci_low"])
