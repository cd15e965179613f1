"""The demo cohort: deterministic, varied geometry, a visible class difference."""

import hashlib
import subprocess
import sys

import nibabel as nib
import numpy as np

from medldm.data.demo import LESION_CENTRE_MM, demo_subjects
from tests.conftest import REPO


def build(out_dir, n=3, seed=7):
    subprocess.run([sys.executable, str(REPO / "workflow_scripts" / "demo_cohort.py"), "--out-dir", str(out_dir),
                    "--n-subjects", str(n), "--seed", str(seed)], check=True, capture_output=True)
    return sorted(p for p in out_dir.rglob("*.nii.gz"))


def digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = build(tmp_path / "a", n=2)
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
