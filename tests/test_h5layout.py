"""The HDF5 layouts: round trip, version and key checks, and the latent statistics."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from medldm.autoencoder.networks import LatentStats
from medldm.data import h5layout
from medldm.errors import InputError

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _header(**extra) -> h5layout.Header:
    return h5layout.Header(grid_affine=AFFINE, grid_shape=(8, 8, 8), class_names=["HC", "TLE"],
                           label_names=["bg", "fg"], settings={"a": 1}, **extra)


def _origin(i: int) -> np.ndarray:
    """Subject ``i``'s own affine: the grid's axes, its own origin."""
    affine = AFFINE.copy()
    affine[:3, 3] = [i, -2.0 * i, 0.5]
    return affine


def _write_latents(path, n=3):
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(n, 2, 4, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 2, (n, 8, 8, 8)).astype(np.uint8)
    with h5layout.create_latents(path, n, (2, 4, 4, 4), _header(vae_sha256="abc"), label_shape=(8, 8, 8)) as w:
        for i in range(n):
            w.append(f"s{i}", i % 2, "train" if i else "val", affine=_origin(i), mu=mu[i], logvar=-mu[i],
                     label=labels[i])
        w.set_latent_stats([0.1, 0.2], [1.0, 2.0], 0.5)
    return mu, labels


def test_latents_round_trip(tmp_path):
    path = tmp_path / "latents.h5"
    mu, labels = _write_latents(path)
    with h5layout.open_latents(path) as f:
        assert len(f) == 3 and f.subject_ids == ["s0", "s1", "s2"] and f.splits == ["val", "train", "train"]
        assert np.array_equal(f.mu[:], mu) and np.array_equal(f.logvar[:], -mu)
        assert np.array_equal(f.label[:], labels) and list(f.class_index) == [0, 1, 0]
        assert np.allclose(f.channel_mean[:], [0.1, 0.2]) and f.header.scale_factor == 0.5
        assert np.array_equal(f.header.grid_affine, AFFINE) and f.header.grid_shape == (8, 8, 8)
        assert np.array_equal(f.affines, np.stack([_origin(i) for i in range(3)]))
        assert f.header.vae_sha256 == "abc" and f.header.settings == {"a": 1}
        assert list(f.indices("train")) == [1, 2]
        assert f.h5["mu"].chunks == (1, 2, 4, 4, 4)


def test_volumes_round_trip(tmp_path):
    path = tmp_path / "synthetic.h5"
    image = np.random.default_rng(1).random((2, 8, 8, 8), dtype=np.float32)
    with h5layout.create_volumes(path, 2, _header(), with_labels=True) as w:
        for i in range(2):
            w.append(f"v{i}", -1, "synthetic", image=image[i], label=(image[i] > 0.5).astype(np.uint8))
    with h5layout.open_volumes(path) as f:
        assert np.array_equal(f.image[:], image) and f.label[1].sum() == (image[1] > 0.5).sum()
        assert list(f.class_index) == [-1, -1]
        # rows without a source subject (generated volumes) sit on the grid's reference affine
        assert np.array_equal(f.affines, np.stack([AFFINE, AFFINE]))


def test_an_incomplete_file_is_never_left_behind(tmp_path):
    path = tmp_path / "latents.h5"
    with pytest.raises(RuntimeError, match="wrote 1 of 2"):
        with h5layout.create_latents(path, 2, (2, 4, 4, 4), _header(scale_factor=1.0)) as w:
            w.append("s0", 0, "train", mu=np.zeros((2, 4, 4, 4)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda h5: h5.attrs.__setitem__("format_version", 99), "format version 99"),
        (lambda h5: h5.attrs.__setitem__("format_version", 1), "format version 1.*rerun export_latents"),
        (lambda h5: h5.__delitem__("affine"), "missing affine"),
        (lambda h5: h5.attrs.__setitem__("kind", "volumes"), "expected a medldm latents file"),
        (lambda h5: h5.__delitem__("channel_std"), "missing channel_std"),
        (lambda h5: h5.attrs.__delitem__("scale_factor"), "missing attribute scale_factor"),
        (lambda h5: h5.__delitem__("logvar") or h5.create_dataset("logvar", data=np.zeros((3, 1))),
         "logvar shape"),
    ],
)
def test_damaged_files_give_clear_errors(tmp_path, damage, message):
    path = tmp_path / "latents.h5"
    _write_latents(path)
    with h5py.File(path, "a") as h5:
        damage(h5)
    with pytest.raises(InputError, match=message) as err:
        h5layout.open_latents(path)
    assert str(path) in str(err.value)


def test_missing_or_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(InputError, match="no such HDF5 file"):
        h5layout.open_latents(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(InputError, match="not a readable HDF5 file"):
        h5layout.open_volumes(tmp_path / "text.h5")


def test_latent_stats_cover_all_latent_voxels():
    rng = np.random.default_rng(2)
    mu = rng.normal([1.0, -2.0, 0.0], [0.5, 3.0, 1.0], size=(6, 4, 4, 4, 3)).transpose(0, 4, 1, 2, 3)
    stats = LatentStats(3)
    for i in range(0, 6, 4):  # uneven batches
        stats.add(mu[i : i + 4])
    mean, std, scale = stats.result()
    per_channel = mu.transpose(1, 0, 2, 3, 4).reshape(3, -1)
    assert np.allclose(mean, per_channel.mean(1)) and np.allclose(std, per_channel.std(1))
    assert scale == pytest.approx(1 / mu.std())
    with pytest.raises(InputError, match="no training subjects"):
        LatentStats(3).result()
