"""The segmentation evaluation: Dice on volumes of known overlap, the control's seeded pairing with
real test maps, a segmenter that learns a separable toy, the rules planned only when some set has
label maps, and clear messages for label maps that do not fit."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medldm.data import h5layout
from medldm.errors import InputError
from medldm.evaluation import segmentation as seg
from tests.conftest import REPO, run_snakemake

LABELS = ["background", "CSF", "GM", "WM"]
TOY = {"channels": [4, 8], "num_res_units": 1, "steps": 40, "batch_size": 2, "lr": 1e-2, "bootstrap": 50, "seed": 0}


def cube(grid: int, start: tuple[int, int, int], side: int) -> np.ndarray:
    mask = np.zeros((grid,) * 3, bool)
    x, y, z = start
    mask[x:x + side, y:y + side, z:z + side] = True
    return mask


def test_dice_of_shifted_cubes():
    """4-voxel cubes shifted by one voxel overlap in 3x4x4 = 48 of 64 voxels: Dice 2*48/128 = 0.75;
    an identical cube scores 1; a label absent from the target is NaN (not scored)."""
    target, predicted = np.zeros((1, 12, 12, 12), np.uint8), np.zeros((1, 12, 12, 12), np.uint8)
    target[0][cube(12, (1, 1, 1), 4)] = 1
    predicted[0][cube(12, (2, 1, 1), 4)] = 1
    target[0][cube(12, (6, 6, 6), 3)] = 2
    predicted[0][cube(12, (6, 6, 6), 3)] = 2
    dice = seg.dice_per_label(predicted, target, len(LABELS))
    assert dice.shape == (1, 3)
    np.testing.assert_allclose(dice[0, :2], [0.75, 1.0])
    assert np.isnan(dice[0, 2])


def test_dice_summary_has_intervals_per_label():
    values = np.array([[0.5, 1.0, np.nan], [0.7, 0.8, 0.6], [0.9, 0.9, 0.4]])
    summary = seg.summarise_dice(values, LABELS, replicates=200, seed=0)
    assert summary["CSF"]["mean"] == pytest.approx(0.7)
    assert summary["WM"]["mean"] == pytest.approx(0.5) and summary["WM"]["n"] == 3
    assert summary["CSF"]["ci_low"] <= 0.7 <= summary["CSF"]["ci_high"]
    assert summary["mean"]["mean"] == pytest.approx(np.mean([0.75, 0.7, 2.2 / 3]))


def test_control_pairing_is_a_seeded_cover_of_the_test_subjects():
    first = seg.control_pairing(7, 3, seed=4)
    assert np.array_equal(first, seg.control_pairing(7, 3, seed=4))
    assert sorted(first[:3]) == [0, 1, 2] and sorted(first[3:6]) == [0, 1, 2]  # every test map used in turn
    assert any(not np.array_equal(first, seg.control_pairing(7, 3, seed=s)) for s in range(5, 10))
    with pytest.raises(InputError, match="test split is empty"):
        seg.control_pairing(2, 0, seed=0)


def toy_pairs(n: int, seed: int, grid: int = 16) -> seg.Pairs:
    """Noise volumes with a bright cube (label 1) and a dim cube (label 2) at random places."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.2, (n, grid, grid, grid)).astype(np.float32)
    labels = np.zeros((n, grid, grid, grid), np.uint8)
    for i in range(n):
        for value, intensity in ((1, 1.0), (2, 0.5)):
            m = cube(grid, tuple(rng.integers(0, grid - 6, 3)), 6) & (labels[i] == 0)
            labels[i][m], images[i][m] = value, intensity
    return seg.Pairs(images, labels)


def test_segmenter_learns_a_separable_toy():
    torch.set_num_threads(1)
    device = torch.device("cpu")
    model = seg.train_segmenter(toy_pairs(8, seed=0), TOY, 3, device, seed=0)
    scores = seg.score(model, toy_pairs(4, seed=1), TOY, ["background", "bright", "dim"], device)
    assert scores["dice"]["bright"]["mean"] > 0.8, scores["dice"]
    assert scores["dice"]["dim"]["mean"] > 0.6, scores["dice"]


def test_label_value_beyond_the_labels_is_refused():
    maps = np.zeros((4, 4, 4), np.uint8)
    maps[0, 0, 0] = 5
    with pytest.raises(InputError, match=r"volumes.h5: dataset label.*label value 5.*4 labels"):
        seg.check_label_maps(maps, 4, "volumes.h5: dataset label, row 0")


def _write_set(path: Path, n: int, label_names: list[str], maps: np.ndarray | None,
               sources: list[str] | None = None) -> None:
    header = h5layout.Header(grid_affine=np.eye(4), grid_shape=(8, 8, 8), class_names=["HC", "TLE"],
                             label_names=label_names, settings={})
    with h5layout.create_volumes(path, n, header, with_labels=maps is not None, with_source=bool(sources)) as writer:
        for i in range(n):
            writer.append(f"s{i}", 0, "synthetic", image=np.zeros((8, 8, 8), np.float32),
                          source_id=sources[i] if sources else None,
                          **({"label": maps[i]} if maps is not None else {}))


def write_cohort(folder: Path, with_labels: bool = True) -> Path:
    """A prepared cohort of toy pairs on an 8^3 grid (3 train, 3 test subjects) and its manifest."""
    import nibabel as nib

    data = toy_pairs(6, seed=2, grid=8)
    rows = ["subject_id\tgroup\tclass\tsplit\timage\tlabel\tshape\tspacing\tp_low\tp_high\tmask"]
    for i in range(6):
        sid, image, label = f"r{i}", folder / f"r{i}_image.nii.gz", folder / f"r{i}_label.nii.gz"
        nib.save(nib.Nifti1Image(data.images[i], np.eye(4)), image)
        nib.save(nib.Nifti1Image(data.labels[i], np.eye(4)), label)
        split = "train" if i < 3 else "test"
        rows.append(f"{sid}\t{sid}\tHC\t{split}\t{image}\t{label if with_labels else ''}\t8x8x8\t1x1x1\t0\t1\t")
    manifest = folder / "manifest.tsv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _args(manifest: Path, labels: list[str], settings: str = '{"channels": [4, 8], "steps": 2, "bootstrap": 20}'):
    return ["--manifest", str(manifest), "--classes", "HC,TLE", "--labels", ",".join(labels), "--settings", settings,
            "--device", "cpu"]


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, segmenter.pt) of a toy cohort, trained for 2 steps by train_segmenter."""
    from workflow_scripts.train_segmenter import main

    folder = tmp_path_factory.mktemp("segmenter")
    manifest = write_cohort(folder)
    main([*_args(manifest, ["background", "bright", "dim"]), "--out-model", str(folder / "segmenter.pt"),
          "--out-json", str(folder / "segmenter.json")])
    return manifest, folder / "segmenter.pt"


def test_control_is_scored_against_seeded_real_test_maps(segmenter, tmp_path):
    import json

    from workflow_scripts.evaluate_segmentation import main

    manifest, model = segmenter
    _write_set(tmp_path / "volumes.h5", 5, ["background", "bright", "dim"], None)

    def control(seed: int) -> dict:
        out = tmp_path / f"control{seed}.json"
        settings = json.dumps({"channels": [4, 8], "steps": 2, "bootstrap": 20, "seed": seed})
        main([*_args(manifest, ["background", "bright", "dim"], settings), "--volumes", str(tmp_path / "volumes.h5"),
              "--segmenter", str(model), "--out-json", str(out)])
        return json.loads(out.read_text())

    result = control(3)
    assert result["adherence"]["kind"] == "control" and set(result["arms"]) == {"real"}
    test_ids = ["r3", "r4", "r5"]
    assert result["adherence"]["paired_with"] == [test_ids[i] for i in seg.control_pairing(5, 3, 3)]
    assert control(3)["adherence"]["paired_with"] == result["adherence"]["paired_with"]
    # each volume's Dice is that of the segmenter's output against the real test map it was paired with
    import nibabel as nib

    from workflow_scripts.evaluate_segmentation import load_segmenter

    net, payload = load_segmenter(model, ["background", "bright", "dim"], torch.device("cpu"))
    predicted = seg.segment(net, np.zeros((5, 8, 8, 8), np.float32), torch.device("cpu"), payload["settings"])
    maps = np.stack([np.asarray(nib.load(manifest.parent / f"{sid}_label.nii.gz").dataobj)
                     for sid in result["adherence"]["paired_with"]])
    np.testing.assert_allclose(result["adherence"]["per_subject"], seg.dice_per_label(predicted, maps, 3), rtol=1e-6)


def test_a_set_with_maps_gets_adherence_and_train_on_synthetic_arms(segmenter, tmp_path):
    """Maps of real test subjects in the training pairs are named (the arms have seen them)."""
    import json

    from workflow_scripts.evaluate_segmentation import main

    manifest, model = segmenter
    toy = toy_pairs(2, seed=5, grid=8)
    _write_set(tmp_path / "volumes.h5", 2, ["background", "bright", "dim"], toy.labels, sources=["r4", "x"])
    main([*_args(manifest, ["background", "bright", "dim"]), "--volumes", str(tmp_path / "volumes.h5"),
          "--segmenter", str(model), "--out-json", str(tmp_path / "out.json")])
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["adherence"]["kind"] == "adherence" and len(result["adherence"]["per_subject"]) == 2
    assert result["adherence"]["conditioned_on_test_subjects"] == ["r4"]
    assert set(result["arms"]) == {"real", "synthetic", "real+synthetic"}
    assert result["arms"]["real+synthetic"]["n_train"] == 3 + 2
    assert result["arms"]["synthetic"]["subjects"] == ["r3", "r4", "r5"]


def test_a_set_with_another_label_count_is_refused(segmenter, tmp_path):
    from workflow_scripts.evaluate_segmentation import main

    manifest, model = segmenter
    volumes = tmp_path / "volumes.h5"
    _write_set(volumes, 2, ["background", "bright", "dim", "extra"], np.zeros((2, 8, 8, 8), np.uint8))
    with pytest.raises(InputError, match=r"volumes.h5: label maps of labels \['background', 'bright', 'dim', 'extra'\]"):
        main([*_args(manifest, ["background", "bright", "dim"]), "--volumes", str(volumes), "--segmenter", str(model),
              "--out-json", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


def test_a_cohort_without_label_maps_is_refused(tmp_path):
    from workflow_scripts.train_segmenter import main

    manifest = write_cohort(tmp_path, with_labels=False)
    with pytest.raises(InputError, match=r"manifest.tsv: the subjects have no label maps \(sample sheet column `label`\)"):
        main([*_args(manifest, LABELS), "--out-model", str(tmp_path / "m.pt"), "--out-json", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.pt").exists()


def planned(workdir: Path, config: dict | None, *extra: str) -> set[str]:
    done = run_snakemake(workdir, "-n", "--quiet", "rules", *extra, config=config)
    return set(re.findall(r"^(\w+)\s+\d+$", done.stdout, re.M)) - {"total"}


SEGMENTATION_RULES = {"train_segmenter", "evaluate_segmentation"}


def test_default_demo_plans_no_segmentation(tmp_path):
    jobs = planned(tmp_path, None, "--configfile", str(REPO / "config" / "config.yaml"))
    assert "train_vae" in jobs and not jobs & SEGMENTATION_RULES


def test_sets_with_label_maps_plan_the_segmentation(tmp_path, test_config):
    assert SEGMENTATION_RULES <= planned(tmp_path, test_config)


def test_auto_mode_follows_label_maps_and_the_switch_overrides(tmp_path, test_config):
    test_config["vae"]["demo"]["paired_labels"] = False
    assert not planned(tmp_path, test_config) & SEGMENTATION_RULES
    test_config["evaluate"]["segmentation"]["enabled"] = True  # every set, as a control
    assert SEGMENTATION_RULES <= planned(tmp_path, test_config)
    test_config["vae"]["demo"]["paired_labels"] = True
    test_config["evaluate"]["segmentation"]["enabled"] = False
    assert not planned(tmp_path, test_config) & SEGMENTATION_RULES


def test_report_shows_the_dice_table_and_contours(tmp_path):
    from medldm.report.page import _segmentation_section

    maps = np.zeros((2, 8, 8, 8), np.uint8)
    maps[:, 2:6, 2:6, 2:6] = 1
    _write_set(tmp_path / "volumes.h5", 2, ["background", "bright"], maps)
    dice = {"bright": {"mean": 0.812, "ci_low": 0.7, "ci_high": 0.9, "n": 2},
            "mean": {"mean": 0.812, "ci_low": 0.7, "ci_high": 0.9, "n": 2}}
    scored = {"per_subject": [[0.8], [0.82]], "dice": dice}
    segmenter = {"labels": ["background", "bright"], "test": scored}
    results = {"cond": {"labels": ["background", "bright"], "adherence": {"kind": "adherence", **scored},
                        "arms": {"real": scored, "synthetic": scored}},
               "plain": {"labels": ["background", "bright"], "adherence": {"kind": "control", **scored},
                         "arms": {"real": scored}}}
    sets = {"cond": {"volumes": str(tmp_path / "volumes.h5")}, "plain": {"volumes": "absent.h5"}}
    section = _segmentation_section(segmenter, results, sets, tmp_path, contour_volumes=1)
    page = "".join(section.parts)
    assert page.count("0.812 [0.7, 0.9]") == 2 * 4  # ceiling, adherence, synthetic, control: label and mean
    assert "control: segmenter on the synthetic volumes vs randomly paired real test maps" in page
    assert (tmp_path / "contours_cond.png").is_file() and not (tmp_path / "contours_plain.png").exists()


@pytest.mark.parametrize("network", ["unet", "segresnet"])
def test_segment_keeps_a_grid_the_network_cannot_halve(network):
    settings = {"network": network, "channels": [4, 8, 16], "init_filters": 4}
    model = seg.build_segmenter(settings, 4).eval()
    assert seg.segment(model, np.zeros((1, 13, 16, 10), np.float32), torch.device("cpu"), settings).shape == (1, 13, 16, 10)
