"""Bring your own autoencoder: vae.<name>.pretrained imported as vae.pt (import_vae), strictly."""

from __future__ import annotations

import json

import pytest
import torch

from medldm.autoencoder import networks as ae
from medldm.data.h5layout import open_latents
from medldm.errors import InputError
from medldm.provenance import sha256_file
from tests.conftest import run_snakemake
from tests.test_workflow_samples import planned_rules
from tests.vae_toys import LABELS, single_thread, toy_set, vae_settings, write_prepared  # noqa: F401 (fixture)
from workflow_scripts import export_latents, import_vae

pytestmark = pytest.mark.usefixtures("single_thread")
SPLITS = ["train"] * 4 + ["val"] * 2


@pytest.fixture
def manifest(tmp_path):
    return write_prepared(tmp_path / "prepared", toy_set(6, splits=SPLITS))


def _network(settings, seed=0):
    torch.manual_seed(seed)
    return ae.build_autoencoder(settings["model"], 1)


def _import(tmp_path, manifest, settings, weights, name="vae.pt"):
    out = tmp_path / name
    argv = ["--name", "mine", "--settings", json.dumps(settings), "--pretrained", str(weights),
            "--prepare", "{}", "--manifest", str(manifest), "--classes", "HC,TLE", "--labels", ",".join(LABELS),
            "--out", str(out), "--montage", str(tmp_path / f"{name}.png"), "--device", "cpu"]
    assert import_vae.main(argv) == 0
    return out


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model"])
def test_imported_weights_become_vae_pt_and_export_latents(tmp_path, manifest, wrap):
    settings = vae_settings()
    net = _network(settings)
    state = net.state_dict()
    weights = tmp_path / "weights.pt"
    torch.save(state if wrap == "raw" else {wrap: state, "epoch": 7}, weights)
    out = _import(tmp_path, manifest, settings, weights)
    loaded, payload = ae.load_vae(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert payload["pretrained"] == {"path": str(weights), "sha256": sha256_file(weights)}
    assert payload["provenance"]["inputs_sha256"]["pretrained"] == sha256_file(weights)
    assert payload["recon_metrics"]["split"] == "val" and -1 <= payload["recon_metrics"]["ssim"] <= 1
    assert payload["epochs"] == 0 and (tmp_path / "vae.pt.png").is_file()
    latents = tmp_path / "latents.h5"
    argv = ["--vae", str(out), "--manifest", str(manifest), "--settings", '{"batch_size": 2}',
            "--out", str(latents), "--device", "cpu"]
    assert export_latents.main(argv) == 0
    with open_latents(latents) as f:
        assert f.mu.shape == (6, 2, 8, 8, 8) and f.header.scale_factor > 0
        assert f.header.vae_sha256 == sha256_file(out)


def test_maisi_autoencoder(tmp_path, manifest):
    settings = vae_settings(model={"name": "maisi", "num_splits": 2, "dim_split": 1})
    net = _network(settings)
    assert type(net).__name__ == "AutoencoderKlMaisi"
    weights = tmp_path / "maisi.pt"
    torch.save(net.state_dict(), weights)
    loaded, _ = ae.load_vae(_import(tmp_path, manifest, settings, weights))
    assert type(loaded).__name__ == "AutoencoderKlMaisi"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    with pytest.raises(InputError, match=r"vae.mine.pretrained: .*maisi.pt does not fit .*missing keys: "
                                         r"decoder.blocks.0.conv.bias"):
        _import(tmp_path, manifest, vae_settings(), weights, "plain.pt")  # MAISI weights, AutoencoderKL network


def test_weights_that_do_not_fit_are_refused_clearly(tmp_path, manifest):
    settings = vae_settings()
    wider = tmp_path / "wider.pt"
    torch.save(_network(vae_settings(model={"channels": [8, 32]})).state_dict(), wider)
    with pytest.raises(InputError, match=r"vae.mine.pretrained: .*wider.pt does not fit .*other shapes: .*"
                                         r"\(e.g. .*: file \[32\], network \[16\]\)"):
        _import(tmp_path, manifest, settings, wider)
    deeper = tmp_path / "deeper.pt"
    torch.save(_network(vae_settings(model={"channels": [8, 16, 16]})).state_dict(), deeper)
    with pytest.raises(InputError, match=r"unexpected keys: decoder.blocks.*\(\d+ in all\).*Set model"):
        _import(tmp_path, manifest, settings, deeper)
    paired = tmp_path / "own.pt"  # paired_labels: 1 + 4 channels in and out, not 1
    torch.save(_network(settings).state_dict(), paired)
    with pytest.raises(InputError, match=r"5 image/label channel\(s\).*other shapes"):
        _import(tmp_path, manifest, vae_settings(paired_labels=True), paired)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="garbage.pt is not a torch weights file"):
        _import(tmp_path, manifest, settings, garbage)
    module = tmp_path / "module.pt"  # a pickled network, not a state dict: needs code to load
    torch.save(_network(settings), module)
    with pytest.raises(InputError, match="module.pt is not a torch weights file that loads safely"):
        _import(tmp_path, manifest, settings, module)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(InputError, match="empty.pt holds no state dict"):
        _import(tmp_path, manifest, settings, empty)
    with pytest.raises(InputError, match="vae.mine.pretrained: .*absent.pt: no such file"):
        _import(tmp_path, manifest, settings, tmp_path / "absent.pt")


def test_workflow_imports_instead_of_training(tmp_path, test_config):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"planned, not read")
    test_config["vae"]["other"] = {**test_config["vae"]["demo"], "pretrained": str(weights)}
    vae = f"{test_config['results']}/vae"
    plan = planned_rules(run_snakemake(tmp_path, "-n", f"{vae}/other/latents.h5", f"{vae}/demo/vae.pt",
                                       config=test_config).stdout)
    assert plan.get("import_vae") == 1 and plan.get("train_vae") == 1 and plan.get("export_latents") == 1, plan


def test_report_says_an_imported_autoencoder_is_not_trained_here(tmp_path):
    from medldm.report.page import _training_section

    section = _training_section({"vae": {"mine": {"model": "vae.pt", "run_dir": None}}}, None, tmp_path)
    assert section.parts == ['<p class="note">Autoencoder mine: imported, not trained by this workflow</p>']
