"""The evaluation stage end to end on a tiny prepared set (scripts run in-process, random FID
Inception weights under a temporary TORCH_HOME), and the report page opened in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medldm.data import h5layout
from medldm.data.samplesheet import MANIFEST_COLUMNS
from medldm.evaluation.fid_weights import WEIGHTS_FILE, save_random_weights
from medldm.io import save_nifti
from medldm.report.page import Section, render, table
from workflow_scripts import (
    evaluate_classifier,
    evaluate_reconstruction,
    evaluate_synthetic,
    fetch_fid_weights,
    fid_reference,
)
from workflow_scripts import report as report_script

SHAPE = (16, 16, 16)
CLASSES = ["HC", "TLE"]
# 4 evenly spaced slices per axis and volume (not all ~13): the plumbing, a third of the Inception passes
FID = {"dims": 64, "batch_size": 50, "central_fraction": 0.8, "slices_per_volume": 4, "empty_threshold": 0.1,
       "min_foreground": 0.02, "kid": True, "kid_subsets": 5, "kid_subset_size": 50, "seed": 0, "bootstrap": 20}
MSSSIM = {"kernel_size": 7, "scales": None, "max_pairs": 20, "seed": 0}
CLASSIFIER = {"network": "densenet", "init_features": 8, "growth_rate": 4, "block_config": [2, 2], "bn_size": 2,
              "steps": 15, "batch_size": 4, "lr": 3e-3, "weight_decay": 0.0, "bootstrap": 50, "seed": 0,
              "saliency_subjects": 1}


def head(cls: int, rng) -> np.ndarray:
    """A toy head; class 1 lacks a block on the left (x < half), like the demo's atrophy."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    volume = (((grid / 0.8) ** 2).sum(0) < 1) * (0.6 + 0.3 * rng.random(SHAPE))
    if cls == 1:
        volume[3:7, 6:10, 6:10] = 0.05
    return volume.astype(np.float32)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """A prepared set, a sample set and reconstructions, evaluated by the stage's scripts."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        cls, split = i % 2, ("train", "train", "train", "train", "val", "test")[i // 2]
        sid = f"s{i:02d}"
        save_nifti(root / "prepared" / sid / "image.nii.gz", head(cls, rng), np.diag([4.0, 4, 4, 1]))
        rows.append({"subject_id": sid, "class": CLASSES[cls], "split": split,
                     "image": str(root / "prepared" / sid / "image.nii.gz"), "label": "", "shape": "16x16x16",
                     "spacing": "4x4x4", "p_low": 0, "p_high": 1})
    manifest = root / "prepared" / "manifest.tsv"
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(manifest, sep="\t", index=False)
    header = h5layout.Header(grid_affine=np.diag([4.0, 4, 4, 1]), grid_shape=SHAPE, class_names=CLASSES)
    samples = root / "samples" / "synthetic.h5"
    with h5layout.create_volumes(samples, 8, header) as writer:
        for i in range(8):
            writer.append(f"sample{i}", i % 2, "synthetic", image=head(i % 2, rng) * 0.9)
    empty = root / "samples_empty" / "synthetic.h5"  # a generator that makes empty volumes
    with h5layout.create_volumes(empty, 4, header) as writer:
        for i in range(4):
            writer.append(f"empty{i}", i % 2, "synthetic", image=np.zeros(SHAPE, np.float32))
    recon = root / "vae" / "reconstructions.h5"
    with h5layout.create_volumes(recon, len(rows), header) as writer:
        for r in rows:
            image = np.asarray(nib.load(r["image"]).dataobj, np.float32)
            writer.append(r["subject_id"], CLASSES.index(r["class"]), r["split"],
                          image=np.clip(image + rng.normal(0, 0.03, SHAPE), 0, 1))
    run_dir = root / "runs" / "vae" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("step,train/loss,val/ssim\n1,0.5,\n2,0.3,0.7\n3,0.2,0.8\n")

    torch_home = root / "torch_home"
    torch_home.mkdir()
    random_weights = save_random_weights(root / "random_inception.pth")
    out = root / "eval"
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(torch_home))
    try:
        run(fetch_fid_weights, "--settings", json.dumps({"weights": str(random_weights), "allow_download": False,
                                                         "allow_convert": False, "allow_unverified": True}),
            "--out", out / "weights.json")
        common = ["--manifest", manifest, "--classes", ",".join(CLASSES)]
        features = [*common, "--settings", json.dumps(FID), "--weights-record", out / "weights.json", "--device", "cpu"]
        run(fid_reference, *features, "--out", out / "reference.npz")
        run(fid_reference, *features, "--split", "train", "--out", out / "train.npz")
        run(fid_reference, *features, "--reconstructions", recon, "--out", out / "recon_features.npz")
        for volumes, stem in ((samples, "metrics"), (empty, "metrics_empty")):
            run(evaluate_synthetic, *common, "--volumes", volumes, "--reference", out / "reference.npz",
                "--train-features", out / "train.npz", "--reconstruction-features", out / "recon_features.npz",
                "--settings", json.dumps({"fid": FID, "msssim": MSSSIM}), "--weights-record", out / "weights.json",
                "--device", "cpu", "--out-json", out / f"{stem}.json", "--out-csv", out / f"{stem}.csv")
        run(evaluate_reconstruction, *common, "--reconstructions", recon, "--settings", json.dumps(MSSSIM),
            "--out", out / "reconstruction.json")
        classify = [*common, "--settings", json.dumps(CLASSIFIER), "--device", "cpu"]
        run(evaluate_classifier, *classify, "--arms", "real", "--out-json", out / "real" / "classifier.json",
            "--saliency", out / "real" / "saliency.png")
        run(evaluate_classifier, *classify, "--arms", "reconstructions", "--reconstructions", recon,
            "--out-json", out / "recon" / "classifier.json")
        run(evaluate_classifier, *classify, "--arms", "synthetic,real+synthetic", "--volumes", samples,
            "--trained", out / "real" / "classifier.json", out / "recon" / "classifier.json",
            "--out-json", out / "classifier.json", "--out-csv", out / "classifier.csv",
            "--saliency", out / "saliency.png")
    finally:
        mp.undo()
    inputs = {
        "manifest": str(manifest), "fid_weights": str(out / "weights.json"),
        "vae": {"tiny": {"model": str(random_weights), "run_dir": str(run_dir), "reconstructions": str(recon),
                         "reconstruction": str(out / "reconstruction.json")}},
        "ldm": {"tiny_ldm": {"model": str(random_weights), "run_dir": str(root / "runs" / "ldm" / "none")}},
        "sample_sets": {"demo": {"ldm": "tiny_ldm", "volumes": str(samples), "metrics": str(out / "metrics.json"),
                                 "classifier": str(out / "classifier.json"),
                                 "saliency": [str(out / "saliency.png"), str(out / "real" / "saliency.png")]},
                        "empty": {"ldm": "tiny_ldm", "volumes": str(empty), "metrics": str(out / "metrics_empty.json"),
                                  "classifier": None, "saliency": None}},
    }
    config = {"classes": CLASSES, "evaluate": {"fid": FID}}
    run(report_script, "--inputs", json.dumps(inputs), "--config", json.dumps(config),
        "--out", root / "report" / "index.html", "--figures", root / "report" / "figures")
    return root


def run(script, *args) -> None:
    with pytest.raises(SystemExit) as done:
        from medldm.errors import run_cli

        run_cli(script.main, [str(a) for a in args])
    assert done.value.code == 0


def test_stage_outputs(evaluated):
    out = evaluated / "eval"
    weights = json.loads((out / "weights.json").read_text())
    assert weights["source"] == "config" and Path(weights["weights"]).name == WEIGHTS_FILE
    metrics = json.loads((out / "metrics.json").read_text())
    groups = {(r["group"], r["axis"]) for r in metrics["fid"]["rows"]}
    assert groups == {(g, a) for g in ("all", "HC", "TLE") for a in ("sagittal", "coronal", "axial", "mean")}
    assert all(r["fid"] >= 0 and r["n_real"] > 0 and "kid_mean" in r for r in metrics["fid"]["rows"])
    assert metrics["fid"]["weights"]["source"] == "config"
    assert set(metrics["msssim"]["synthetic"]) == {"all", "HC", "TLE"}
    assert 0 < metrics["msssim"]["real"]["all"]["mean"] < 1
    assert pd.read_csv(out / "metrics.csv").shape == (3 * 12, 12)  # the set and its 2 floors
    recon = json.loads((out / "reconstruction.json").read_text())
    assert recon["n"] == 2 and recon["ssim"]["mean"] > 0.5 and recon["psnr"]["mean"] > 20
    classifier = json.loads((out / "classifier.json").read_text())
    assert set(classifier["arms"]) == {"real", "reconstructions", "synthetic", "real+synthetic"}
    assert classifier["arms"]["real+synthetic"]["n_train"] == 8 + 8
    assert classifier["arms"]["reconstructions"]["n_train"] == classifier["arms"]["real"]["n_train"] == 8
    # The real arm is reused from its own job's JSON, not trained again.
    real = json.loads((out / "real" / "classifier.json").read_text())
    assert classifier["arms"]["real"] == real["arms"]["real"]
    assert set(classifier["differences"]) == {"synthetic - real", "real+synthetic - real",
                                              "synthetic - reconstructions", "reconstructions - real"}
    assert pd.read_csv(out / "classifier.csv").shape == ((4 + 4) * 3, 7)
    assert (out / "saliency.png").read_bytes()[:4] == b"\x89PNG"
    figures = {p.name for p in (evaluated / "report" / "figures").iterdir()}
    assert {"fid.png", "kid.png", "msssim.png", "classifier_demo.png", "curves_vae_tiny.png",
            "real_test_HC.png", "synthetic_demo_TLE.png", "reconstruction_tiny.png"} <= figures


def test_fid_floors_and_intervals(evaluated):
    """The sample set's FID comes with the floors (real training subjects matched to its class counts,
    the autoencoder's reconstructions of the test subjects) and bootstrap intervals."""
    fid = json.loads((evaluated / "eval" / "metrics.json").read_text())["fid"]
    assert fid["empty_volumes"] == 0 and set(fid["baselines"]) == {"real_train", "reconstruction"}
    assert fid["baselines"]["real_train"]["n_volumes"] == 8 and fid["baselines"]["reconstruction"]["n_volumes"] == 2
    pooled = {name: {r["axis"]: r for r in rows if r["group"] == "all"}
              for name, rows in (("samples", fid["rows"]), *((n, b["rows"]) for n, b in fid["baselines"].items()))}
    for rows in pooled.values():
        assert all(r["ci_low"] <= r["ci_high"] and r["fid"] >= 0 for r in rows.values())
    assert pooled["reconstruction"]["mean"]["fid"] < pooled["samples"]["mean"]["fid"]  # near-copies of the reference


def test_empty_volumes_are_flagged_in_metrics_and_report(evaluated):
    fid = json.loads((evaluated / "eval" / "metrics_empty.json").read_text())["fid"]
    assert fid["empty_volumes"] == 4
    assert all(r["fid"] is None and "0 synthetic" in r["flag"] for r in fid["rows"] if r["axis"] != "mean")
    assert fid["baselines"]["real_train"]["rows"][0]["fid"] is not None  # the floors still stand
    page = (evaluated / "report" / "index.html").read_text()
    assert "4 of 4 volumes empty" in page and "no FID" in page


def test_classifier_refuses_inputs_it_cannot_compare(evaluated, capsys):
    """Reconstructions lacking the training subjects, or a reused arm trained with other settings,
    are refused before any training, naming the file; nothing is written."""
    out, manifest = evaluated / "eval", evaluated / "prepared" / "manifest.tsv"
    common = ["--manifest", manifest, "--classes", ",".join(CLASSES), "--device", "cpu"]
    refused = out / "refused.json"
    samples = evaluated / "samples" / "synthetic.h5"  # holds no real subject
    cases = [(["--arms", "reconstructions", "--reconstructions", samples, "--settings", json.dumps(CLASSIFIER)],
              f"{samples}: no reconstruction of training subjects"),
             (["--arms", "synthetic", "--volumes", samples, "--settings", json.dumps({**CLASSIFIER, "steps": 3}),
               "--trained", out / "real" / "classifier.json"], "trained with other evaluate.classifier settings"),
             (["--arms", "synthetic", "--settings", json.dumps(CLASSIFIER)], "arm synthetic needs --volumes")]
    for args, message in cases:
        with pytest.raises(SystemExit) as done:
            from medldm.errors import run_cli

            run_cli(evaluate_classifier.main, [str(a) for a in [*common, *args, "--out-json", refused]])
        assert done.value.code == 2 and message in capsys.readouterr().err
        assert not refused.exists()


def test_page_is_self_contained(evaluated):
    page = (evaluated / "report" / "index.html").read_text()
    assert "src=\"data:image/png;base64," in page
    assert not re.search(r"src=\"(?!data:)", page), "every image must be embedded"
    for text in ("FID and KID", "MS-SSIM", "real training subjects (perfect generator)",
                 "autoencoder reconstructions (autoencoder floor)", "FID mean, autoencoder", "ROC AUC", "real+synthetic",
                 "<td>reconstructions</td>", "<td>synthetic - reconstructions</td>", "paired bootstrap",
                 "no metrics.csv", "Configuration and provenance",
                 "sha256", "not comparable with any published figure"):  # random weights: warned
        assert text in page


def test_render_escapes_and_formats():
    section = Section("A <b> title")
    section.html(table([{"a": 0.123456, "b": float("nan"), "c": True}], [("a", "A"), ("b", "B"), ("c", "C")]))
    page = render("t", [section])
    assert "A &lt;b&gt; title" in page and "<td>0.1235</td><td>–</td><td>yes</td>" in page


def chromium_probe(page: Path, tmp_path: Path) -> dict:
    """Open ``page`` in headless Chromium; count its images (and how many decoded) and tables."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        pytest.skip("no headless Chromium on PATH (apt-get install chromium; `make system-test-deps`)")
    probe = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
             " document.body.setAttribute('data-probe', JSON.stringify({images: imgs.length,"
             " decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,"
             " tables: document.querySelectorAll('table').length,"
             " cells: document.querySelectorAll('td').length})); });</script></body>")
    copy = tmp_path / "probe.html"
    copy.write_text(page.read_text().replace("</body>", probe))
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert found, f"Chromium did not run the page: {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    probe = chromium_probe(evaluated / "report" / "index.html", tmp_path)
    assert probe["images"] >= 8 and probe["decoded"] == probe["images"], probe
    assert probe["tables"] >= 6 and probe["cells"] > 50, probe


@pytest.mark.slow
def test_tiny_end_to_end_run_has_a_report(tiny_run, tmp_path):
    """The whole workflow on config/test.yaml ends in a report that renders."""
    page = tiny_run / "results" / "report" / "index.html"
    assert page.is_file(), "the default target must include the report (rules.report.output.html)"
    assert (tiny_run / "results" / "report" / "figures" / "fid.png").is_file()
    probe = chromium_probe(page, tmp_path)
    assert probe["images"] >= 5 and probe["decoded"] == probe["images"], probe
    assert probe["tables"] >= 5, probe
