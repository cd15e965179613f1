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
validate(config, "../config/schemas/config.schema.yaml", set_default=True)

# Job shells trap SIGTERM (SLURM's early warning before a time limit, then the limit itself), so
# the program they run decides how the job ends: a trainer writes its checkpoint and exits 75.
# MEDLDM_DEVICE: the trainers' device (config cluster.device), not a param: it changes no result.
shell.prefix(
    f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
    f"export MEDLDM_DEVICE={config['cluster']['device']}; trap : TERM; "
)

RESULTS = config["results"]
PREPARED = f"{RESULTS}/prepared"
DEMO = config["demo"]["enabled"]
SAMPLE_SHEET = f"{RESULTS}/demo/samples.tsv" if DEMO else config.get("samples", "")


def settings_json(section):
    """A config section as the JSON text a script's --settings takes."""
    return json.dumps(section, sort_keys=True)


def rule_resources(rule_name):
    """Resources of a GPU rule: its config `resources` entry, one GPU unless that entry names GPUs
    (`gpu`, `gres`, `gpu_model`) or `cluster.gpu` is false, and a `runtime` (minutes) that grows
    with the attempt, so a job resubmitted after its time limit gets longer."""
    res = dict(config["resources"].get(rule_name, {}))
    if config["cluster"]["gpu"] and not {"gpu", "gres", "gpu_model"} & res.keys():
        res["gpu"] = 1
    if "runtime" in res:
        minutes = res["runtime"]
        res["runtime"] = lambda wildcards, attempt: minutes * attempt
    return res


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


def classifier_outputs():
    outputs = {
        "json": f"{EVAL}/samples/{{ldm}}/{{sample_set}}/classifier.json",
        "csv": f"{EVAL}/samples/{{ldm}}/{{sample_set}}/classifier.csv",
    }
    if SALIENCY:
        outputs["saliency"] = report(
            f"{EVAL}/samples/{{ldm}}/{{sample_set}}/saliency.png",
            caption="../report/saliency.rst",
            category="Evaluation",
            subcategory="{sample_set}",
        )
    return outputs


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
                "reconstructions": f"{RESULTS}/vae/{name}/reconstructions/synthetic.h5",
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
        index["sample_sets"][name] = {
            "ldm": sample_set["ldm"],
            "volumes": f"{samples}/synthetic.h5",
            "metrics": f"{evaluation}/image_metrics.json",
            "classifier": f"{evaluation}/classifier.json" if CLASSIFIER else None,
            "saliency": f"{evaluation}/saliency.png" if SALIENCY else None,
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


# SLURM preflight (medldm/preflight.py): runs after the DAG is built and before the first sbatch.
def slurm_requests():
    """What each job (or group job) of this run will ask SLURM for."""
    from medldm.preflight import Request, gres_gpus

    requests, seen = [], set()
    for job in workflow.dag.needrun_jobs():
        job = workflow.dag.get_job_group(job) or job  # a group job is one sbatch job
        if job.is_local or job in seen:
            continue
        seen.add(job)
        job.reset_params_and_resources()  # as the scheduler does before submitting: evaluate all
        res = job.resources
        cpus = res.get("cpus_per_task") or job.threads  # the profile's cpus_per_task: threads
        mem = res.get("mem_mb") or (res.get("mem_mb_per_cpu") or 0) * max(cpus, 1) or None
        gpus = res.get("gpu") or gres_gpus(str(res.get("gres") or "")) or int(bool(res.get("gpu_model")))
        name = f"group {job.name}" if job.is_group() else job.name
        requests.append(Request(name, res.get("slurm_partition") or None, max(int(cpus), 0),
                                mem, int(gpus), res.get("runtime")))
    return requests


onstart:
    if workflow.executor_plugin is not None and workflow.executor_plugin.name == "slurm":
        from medldm.preflight import check, read_partitions

        try:
            check(slurm_requests(), read_partitions())
        except InputError as err:
            raise WorkflowError(str(err))
