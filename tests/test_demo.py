"""The demo cohort: deterministic, varied geometry, a visible class difference."""

import hashlib
import subprocess
import sys

import nibabel as nib
import numpy as np

from medldm.data.demo import LESION_CENTRE_MM, demo_subjects
from tests.conftest import REPO
from workflow_scripts import demo_cohort


def build(out_dir, n=3, seed=7, subprocess_run=False):
    """The demo_cohort script's files; in this process unless ``subprocess_run``."""
    args = ["--out-dir", str(out_dir), "--n-subjects", str(n), "--seed", str(seed)]
    if subprocess_run:
        subprocess.run([sys.executable, str(REPO / "workflow_scripts" / "demo_cohort.py"), *args], check=True,
                       capture_output=True)
    else:
        assert demo_cohort.main(args) == 0
    return sorted(p for p in out_dir.rglob("*.nii.gz"))


def digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = build(tmp_path / "a", n=2, subprocess_run=True)  # the same bytes from another process
    second = build(tmp_path / "b", n=2)
    third = build(tmp_path / "c", n=2, seed=8)
    assert [p.name for p in first] == [p.name for p in second]
    assert digest(first) == digest(second)
    assert digest(first) != digest(third)
    sheet = (tmp_path / "a" / "samples.tsv").read_text()
    assert sheet == (tmp_path / "b" / "samples.tsv").read_text().replace(str(tmp_path / "b"), str(tmp_path / "a"))


def test_geometry_labels_and_lesion(tmp_path):
    build(tmp_path, n=4, seed=0)
    subjects = demo_subjects(4)
    orientations = set()
    for subject in subjects:
        img = nib.load(tmp_path / "images" / f"{subject.subject_id}.nii.gz")
        lab = nib.load(tmp_path / "labels" / f"{subject.subject_id}.nii.gz")
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        assert set(np.unique(np.asarray(lab.dataobj))) == {0, 1, 2, 3}
        orientations.add("".join(nib.aff2axcodes(img.affine)))
    assert len(orientations) >= 3
    # TLE subjects have much more CSF around the left hippocampus than HC subjects.
    def csf_near_lesion(subject):
        lab = nib.load(tmp_path / "labels" / f"{subject.subject_id}.nii.gz")
        data = np.asarray(lab.dataobj)
        centre = np.linalg.inv(lab.affine) @ np.append(LESION_CENTRE_MM, 1)
        box = tuple(slice(int(c) - 3, int(c) + 4) for c in centre[:3])
        return np.mean(data[box] == 1)
    hc = [csf_near_lesion(s) for s in subjects if s.cls == "HC"]
    tle = [csf_near_lesion(s) for s in subjects if s.cls == "TLE"]
    assert min(tle) > max(hc) + 0.2


def test_demo_masks_are_seeded_grouped_and_leave_the_images_alone(tmp_path):
    from medldm.data.demo import write_cohort
    from medldm.data.prepare import prepare_subject
    from medldm.data.samplesheet import check_samples, read_table

    plain = write_cohort(tmp_path / "plain", 2, seed=3, progress=False)
    sheet_path = write_cohort(tmp_path / "masked", 2, seed=3, progress=False, masks_per_subject=2)
    write_cohort(tmp_path / "again", 2, seed=3, progress=False, masks_per_subject=2)
    names = [p.relative_to(tmp_path / "plain") for p in sorted((tmp_path / "plain").rglob("*.nii.gz"))]
    assert digest([tmp_path / "plain" / n for n in names]) == digest([tmp_path / "masked" / n for n in names])
    assert digest(sorted((tmp_path / "masked" / "masks").glob("*"))) == digest(sorted((tmp_path / "again" / "masks").glob("*")))
    assert plain.read_text().splitlines()[0] == "subject_id\timage\tlabel\tclass"  # the default demo's sheet
    sheet = check_samples(read_table(sheet_path, "sheet"), ["HC", "TLE"], "sheet")
    assert sheet["subject_id"].tolist() == ["demo000-m0", "demo000-m1", "demo001-m0", "demo001-m1"]
    assert sheet["group"].tolist() == ["demo000", "demo000", "demo001", "demo001"]
    for subject, cls in (("demo000", "HC"), ("demo001", "TLE")):
        rows = sheet[sheet["group"] == subject]
        image, label = nib.load(rows["image"].iloc[0]), nib.load(rows["label"].iloc[0])
        brain = np.asarray(label.dataobj) > 0
        masks = [nib.load(path) for path in rows["mask"]]
        for mask in masks:
            data = np.asarray(mask.dataobj)
            assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
            assert set(np.unique(data)) == {0, 1} and not (data.astype(bool) & ~brain).any()
            prepare_subject(rows["image"].iloc[0], None, spacing=[4, 4, 4], shape=[40, 48, 40],
                            percentiles=[0.5, 99.5], foreground_threshold=0.1, mask_path=rows["mask"].iloc[0])
        shared = np.logical_and(*[np.asarray(m.dataobj).astype(bool) for m in masks])
        if cls == "TLE":  # every mask holds the atrophy region: tissue turned CSF
            assert shared.sum() > 100 and np.mean(np.asarray(label.dataobj)[shared] == 1) > 0.9
        else:
            assert shared.sum() < 100


def test_smooth_field_is_the_cubic_zoom_of_the_coarse_noise():
    """The separable weights give the field ndimage.zoom (cubic, nearest) makes of the same noise."""
    from scipy import ndimage

    from medldm.data.demo import _smooth_field

    shape, coarse, amplitude = (23, 17, 30), 5, 1.2
    noise = np.random.default_rng(7).normal(0.0, amplitude, (coarse,) * 3)
    expected = ndimage.zoom(noise, [s / coarse for s in shape], order=3, mode="nearest")
    field = _smooth_field(np.random.default_rng(7), shape, coarse, amplitude)
    assert field.shape == expected.shape == shape
    np.testing.assert_allclose(field, expected, atol=1e-12)
    assert field.std() > 0.1  # a field, not zeros
