"""Intensity models of preparation: CT in Hounsfield units keeps its tissues apart."""

import logging

import numpy as np
import pytest

from medldm.data.prepare import intensity_model, prepare_subject
from medldm.errors import InputError
from tests.test_prepare import write_pair

TISSUES = {"air": -1000.0, "lung": -850.0, "fibrosis": -300.0, "soft": 40.0, "bone": 700.0}
SETTINGS = dict(spacing=[2, 2, 2], shape=[28, 28, 20], percentiles=[0.5, 99.5], foreground_threshold=0.1)


def hu_phantom(shape=(56, 48, 40)):
    """A chest-like HU phantom at 1 mm: body of soft tissue in air, two lungs (one with a fibrotic
    patch) and a bony spine; the label map numbers the tissues in the order of TISSUES."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2

    def ellipsoid(c, radii):
        return sum(((g - ci) / r) ** 2 for g, ci, r in zip(grid, c, radii, strict=True)) < 1

    body = ellipsoid(centre, (24, 20, 18))
    lungs = ellipsoid(centre + [-10, 2, 0], (8, 10, 12)) | ellipsoid(centre + [10, 2, 0], (8, 10, 12))
    fibrosis = ellipsoid(centre + [10, 2, 0], (4, 4, 5))
    bone = ellipsoid(centre + [0, -12, 0], (4, 4, 14))
    label = np.select([fibrosis, lungs, bone, body], [2, 1, 4, 3], default=0).astype(np.uint8)
    image = np.array(list(TISSUES.values()), np.float32)[label]
    affine = np.eye(4)
    affine[:3, 3] = -centre
    return image, label, affine


def tissue_medians(prepared):
    """Median prepared intensity of each tissue, away from its borders (nearest-neighbour labels)."""
    from scipy import ndimage

    out = []
    for index in range(len(TISSUES)):
        core = ndimage.binary_erosion(prepared.label == index, iterations=1)
        assert core.any(), f"tissue {list(TISSUES)[index]} vanished in preparation"
        out.append(float(np.median(prepared.image[core])))
    return out


def test_ct_window_keeps_five_tissues_ordered_and_apart(tmp_path):
    paths = write_pair(tmp_path, "ct", *hu_phantom())
    prepared = prepare_subject(*paths, **SETTINGS, label_values=[0, 1, 2, 3, 4],
                               intensity={"model": "ct", "window": [-1000, 400]})
    medians = tissue_medians(prepared)
    expected = [(hu + 1000) / 1400 for hu in TISSUES.values()]
    assert np.allclose(medians, np.clip(expected, 0, 1), atol=0.02)
    assert all(b - a > 0.05 for a, b in zip(medians, medians[1:], strict=False))
    assert prepared.image.min() == 0.0  # air and the padding outside the field of view: the window's low end
    assert (prepared.p_low, prepared.p_high) == (-1000.0, 400.0)


def test_mri_model_on_ct_warns_and_merges_tissues(tmp_path, caplog):
    paths = write_pair(tmp_path, "ct", *hu_phantom())
    with caplog.at_level(logging.WARNING, logger="medldm.data.prepare"):
        prepared = prepare_subject(*paths, **SETTINGS, label_values=[0, 1, 2, 3, 4])
    assert "look like CT" in caplog.text and str(paths[0]) in caplog.text
    air, lung, fibrosis, _, _ = tissue_medians(prepared)
    assert air == lung == fibrosis == 0.0  # what the ct model exists for


def test_ct_presets_and_fixed_range(tmp_path):
    assert intensity_model({"model": "ct", "window": "lung"}).window == (-1350.0, 150.0)
    assert intensity_model({"model": "ct"}).window == (-1000.0, 400.0)
    assert intensity_model({}).name == "mri"
    image, label, affine = hu_phantom()
    paths = write_pair(tmp_path, "ct", image + 1024.0, label, affine)  # stored as unsigned HU + 1024
    prepared = prepare_subject(*paths, **SETTINGS, label_values=[0, 1, 2, 3, 4],
                               intensity={"model": "fixed", "window": [24, 1424]})
    medians = tissue_medians(prepared)
    assert all(b > a for a, b in zip(medians, medians[1:], strict=False))


@pytest.mark.parametrize("settings, message", [
    ({"model": "fixed"}, "needs `window"),
    ({"model": "fixed", "window": "lung"}, "not a window preset of the ct model"),
    ({"model": "ct", "window": "liver"}, "presets"),
    ({"model": "ct", "window": [400, -1000]}, "low < high"),
    ({"model": "mri", "window": [0, 1]}, "mri scales by prepare.percentiles"),
])
def test_bad_intensity_settings_are_refused(settings, message):
    with pytest.raises(InputError, match=message):
        intensity_model(settings)
