# Config validation, the sample table, and helpers shared by the stage rule files.
import json
import shlex

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from medldm.demo import demo_subjects
from medldm.errors import InputError
from medldm.samplesheet import check_samples, read_table


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
            for s in demo_subjects(config["demo"]["n_subjects"], config["demo"]["lesion_class"])
        ]
        sheet, check_files = pd.DataFrame(rows), False
    else:
        if not SAMPLE_SHEET:
            raise WorkflowError("config: set `samples` to your sample sheet (TSV), or `demo: {enabled: true}`")
        sheet, check_files = read_table(SAMPLE_SHEET, "sample sheet"), True
        validate(sheet, "../config/schemas/samples.schema.yaml")
    try:
        sheet = check_samples(sheet, config["classes"], f"sample sheet {SAMPLE_SHEET}", check_files)
    except InputError as err:
        raise WorkflowError(str(err))
    has_labels = (sheet["label"] != "").all()
    if has_labels and not config["labels"]:
        raise WorkflowError(f"sample sheet {SAMPLE_SHEET} has label maps: list their names in the config's `labels`")
    return sheet.set_index("subject_id", drop=False), bool(has_labels)


SAMPLES, HAS_LABELS = load_samples()
SUBJECTS = SAMPLES["subject_id"].tolist()
LABEL_VALUES = config.get("label_values") or list(range(len(config["labels"])))
if len(LABEL_VALUES) != len(config["labels"]):
    raise WorkflowError(f"config: label_values has {len(LABEL_VALUES)} entries but labels has {len(config['labels'])}")


wildcard_constraints:
    subject="[A-Za-z0-9][A-Za-z0-9._-]*",
