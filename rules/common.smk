# Config validation, the sample table, and helpers shared by the stage rule files.
# Rule conventions (keep `snakemake --lint` clean): shell calls `python -m workflow_scripts.<script>`
# (no global variables inside shell strings: pass them through params), every rule names its
# conda env (`../envs/cpu.yaml` or `../envs/torch.yaml`), input/param functions live here, and
# settings reach scripts as `--settings {params.settings:q}` with params.settings = settings_json(...).
import json
import os
import re
import shlex

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from medldm.demo import demo_subjects
from medldm.errors import InputError
from medldm.samplesheet import check_samples, read_table

# Jobs run `python -m workflow_scripts.<stage>` and import medldm from this checkout, from any
# working directory and inside per-rule conda environments.
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

validate(config, "../config/schemas/config.schema.yaml", set_default=True)

RESULTS = config["results"]
PREPARED = f"{RESULTS}/prepared"
DEMO = config["demo"]["enabled"]
SAMPLE_SHEET = f"{RESULTS}/demo/samples.tsv" if DEMO else config.get("samples", "")


def settings_json(section):
    """A config section as the JSON text a script's --settings takes."""
    return json.dumps(section, sort_keys=True)


def rule_resources(rule_name):
    """The config's `resources` entry of one rule (empty when not set)."""
    return config["resources"].get(rule_name, {})


def load_samples():
    """The sample table: the demo cohort's, or the user's sheet validated against its schema."""
    if DEMO:
        rows = [
            {
                "subject_id": s.subject_id,
                "image": f"{RESULTS}/demo/images/{s.subject_id}.nii.gz",
                "label": f"{RESULTS}/demo/labels/{s.subject_id}.nii.gz",
                "class": s.cls,
                "split": "",
            }
            for s in demo_subjects(
                config["demo"]["n_subjects"], config["demo"]["lesion_class"]
            )
        ]
        sheet, check_files = pd.DataFrame(rows), False
    else:
        if not SAMPLE_SHEET:
            raise WorkflowError(
                "config: set `samples` to your sample sheet (TSV), or `demo: {enabled: true}`"
            )
        sheet, check_files = read_table(SAMPLE_SHEET, "sample sheet"), True
        validate(sheet, "../config/schemas/samples.schema.yaml")
    try:
        sheet = check_samples(
            sheet, config["classes"], f"sample sheet {SAMPLE_SHEET}", check_files
        )
    except InputError as err:
        raise WorkflowError(str(err))
    has_labels = (sheet["label"] != "").all()
    if has_labels and not config["labels"]:
        raise WorkflowError(
            f"sample sheet {SAMPLE_SHEET} has label maps: list their names in the config's `labels`"
        )
    return sheet.set_index("subject_id", drop=False), bool(has_labels)


SAMPLES, HAS_LABELS = load_samples()
SUBJECTS = SAMPLES["subject_id"].tolist()
LABEL_VALUES = config.get("label_values") or list(range(len(config["labels"])))
if len(LABEL_VALUES) != len(config["labels"]):
    raise WorkflowError(
        f"config: label_values has {len(LABEL_VALUES)} entries but labels has {len(config['labels'])}"
    )


wildcard_constraints:
    subject="[A-Za-z0-9][A-Za-z0-9._-]*",


# Preparation
def prepare_inputs(wildcards):
    row = SAMPLES.loc[wildcards.subject]
    return {"image": row["image"], **({"label": row["label"]} if HAS_LABELS else {})}


def prepare_outputs():
    outputs = {
        "image": f"{PREPARED}/{{subject}}/image.nii.gz",
        "info": f"{PREPARED}/{{subject}}/info.json",
    }
    if HAS_LABELS:
        outputs["label"] = f"{PREPARED}/{{subject}}/label.nii.gz"
    return outputs


def label_args(wildcards, input, output):
    if not HAS_LABELS:
        return ""
    values = ",".join(str(v) for v in LABEL_VALUES)
    return f"--label {shlex.quote(input.label)} --out-label {shlex.quote(output.label)} --label-values {values}"


# Diffusion and sampling (rules/ldm.smk, rules/sample.smk)
def ldm_entry(name):
    if name not in config["ldm"]:
        raise WorkflowError(f"config: no ldm entry {name!r} (known: {sorted(config['ldm'])})")
    return config["ldm"][name]


def ldm_vae_dir(wildcards):
    """results/vae/<name> of the autoencoder an ldm entry learns from."""
    vae = ldm_entry(wildcards.ldm)["vae"]
    if vae not in config["vae"]:
        raise WorkflowError(f"config: ldm {wildcards.ldm!r} names vae {vae!r}, which is not in `vae`")
    return f"{RESULTS}/vae/{vae}"


def sample_set_json(wildcards):
    """The settings of sample set {sample_set}, which must belong to ldm {ldm}."""
    entry = config["sample_sets"].get(wildcards.sample_set)
    if entry is None or entry["ldm"] != wildcards.ldm:
        raise WorkflowError(
            f"no sample set {wildcards.sample_set!r} of ldm {wildcards.ldm!r} in config `sample_sets`"
        )
    return settings_json(entry)


def gpu_count(rule_name):
    """GPUs a rule's resources ask for: `gpu: N`, `gres: gpu[:type]:N`, or 1 for `gpu_model` alone."""
    res = rule_resources(rule_name)
    if "gpu" in res:
        return int(res["gpu"])
    match = re.fullmatch(r"gpu(?::[^:]+)?:(\d+)", str(res.get("gres", "")))
    return int(match.group(1)) if match else int("gpu_model" in res)


def python_launcher(rule_name):
    """`python`, or `torchrun` with one process per GPU when the rule asks for several (DDP)."""
    n = gpu_count(rule_name)
    return f"torchrun --standalone --nproc_per_node={n}" if n > 1 else "python"


wildcard_constraints:
    ldm="[A-Za-z0-9][A-Za-z0-9._-]*",
    sample_set="[A-Za-z0-9][A-Za-z0-9._-]*",


# Evaluation (rules/evaluate.smk)
EVAL = f"{RESULTS}/eval"
EVALUATE = config["evaluate"]
CLASSIFIER = EVALUATE["classifier"]["enabled"] and len(config["classes"]) >= 2
SALIENCY = CLASSIFIER and EVALUATE["classifier"]["saliency_subjects"] > 0
_FID_FETCH_KEYS = ("weights", "allow_download", "allow_convert", "allow_unverified")


def fid_settings(fetch):
    """evaluate.fid split in two, so that changing dims or slices never re-fetches the weights
    and changing the weights source never recomputes features."""
    return {k: v for k, v in EVALUATE["fid"].items() if (k in _FID_FETCH_KEYS) == fetch}


def sample_set_dirs(name):
    """(samples folder, evaluation folder) of one sample set."""
    ldm = config["sample_sets"][name]["ldm"]
    return f"{RESULTS}/samples/{ldm}/{name}", f"{EVAL}/samples/{ldm}/{name}"


def reconstructions_h5(vae="{vae}"):
    """The autoencoder's decoded reconstructions of the real subjects (a rule pattern by default)."""
    return f"{RESULTS}/vae/{vae}/reconstructions/synthetic.h5"


# Classifier arms trained once: the real one per run, the reconstruction one per autoencoder.
REAL_ARM_DIR = f"{EVAL}/classifier/real"


def reconstruction_arm_dir(vae="{vae}"):
    return f"{EVAL}/vae/{vae}/classifier"


def classifier_outputs(folder, subcategory):
    """classifier.json of a classifier job in ``folder``, and its Grad-CAM PNG when enabled."""
    outputs = {"json": f"{folder}/classifier.json"}
    if SALIENCY:
        outputs["saliency"] = report(
            f"{folder}/saliency.png",
            caption="../report/saliency.rst",
            category="Evaluation",
            subcategory=subcategory,
        )
    return outputs


def reconstruction_arm(wildcards):
    """classifier.json of the reconstruction arm of the autoencoder behind ldm {ldm}."""
    return f"{reconstruction_arm_dir(ldm_entry(wildcards.ldm)['vae'])}/classifier.json"


def saliency_arg(wildcards, output):
    return f"--saliency {shlex.quote(output.saliency)}" if SALIENCY else ""


def report_index():
    """What the report shows, by name: the --inputs JSON of workflow_scripts/report.py."""
    index = {
        "manifest": f"{PREPARED}/manifest.tsv",
        "fid_weights": f"{EVAL}/fid_weights.json",
        "vae": {
            name: {
                "model": f"{RESULTS}/vae/{name}/vae.pt",
                "run_dir": f"{RESULTS}/runs/vae/{name}",
                "reconstructions": reconstructions_h5(name),
                "reconstruction": f"{EVAL}/vae/{name}/reconstruction.json",
            }
            for name in config.get("vae", {})
        },
        "ldm": {
            name: {
                "model": f"{RESULTS}/ldm/{name}/ldm.pt",
                "run_dir": f"{RESULTS}/runs/ldm/{name}",
            }
            for name in config.get("ldm", {})
        },
        "sample_sets": {},
    }
    for name, sample_set in config.get("sample_sets", {}).items():
        samples, evaluation = sample_set_dirs(name)
        vae = ldm_entry(sample_set["ldm"])["vae"]
        index["sample_sets"][name] = {
            "ldm": sample_set["ldm"],
            "volumes": f"{samples}/synthetic.h5",
            "metrics": f"{evaluation}/image_metrics.json",
            "classifier": f"{evaluation}/classifier.json" if CLASSIFIER else None,
            "saliency": [
                f"{folder}/saliency.png"
                for folder in (evaluation, REAL_ARM_DIR, reconstruction_arm_dir(vae))
            ]
            if SALIENCY
            else [],
        }
    return index


def report_inputs():
    """Every file the report reads (the run directories' metrics.csv are read, not declared)."""
    index = report_index()
    files = {"manifest": index["manifest"], "fid_weights": index["fid_weights"]}
    for kind in ("vae", "ldm"):
        for name, entry in index[kind].items():
            files[f"{kind}_{name}"] = entry["model"]
            if kind == "vae":
                files[f"reconstruction_{name}"] = entry["reconstruction"]
    for name, entry in index["sample_sets"].items():
        for key in ("volumes", "metrics", "classifier", "saliency"):
            if entry[key]:
                files[f"{key}_{name}"] = entry[key]
    return files
