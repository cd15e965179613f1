# Config validation, the sample table, and helpers shared by the stage rule files.
# Rule conventions (keep `snakemake --lint` clean): shell calls `python -m workflow_scripts.<script>`
# (no global variables inside shell strings: pass them through params), every rule names its
# conda env (`../envs/cpu.yaml` or `../envs/torch.yaml`), input/param functions live here, and
# settings reach scripts as `--settings {params.settings:q}` with params.settings = settings_json(...).
import json
import os
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
