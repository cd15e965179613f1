# Config validation, the sample table, and helpers shared by the stage rule files.
# Rule conventions (keep `snakemake --lint` clean): shell calls `python -m workflow_scripts.<script>`
# (no global variables inside shell strings: pass them through params), every rule names its
# conda env (`../envs/cpu.yaml` or `../envs/torch.yaml`), input/param functions live here, and
# settings reach scripts as `--settings {params.settings:q}` with params.settings = settings_json(...).
import json
import os
import re
import shlex
import sys

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

from medldm.data.demo import sheet_rows as demo_sheet_rows
from medldm.errors import InputError
from medldm.data.prepare import input_dims, intensity_model
from medldm.resources import gpus_requested
from medldm.data.samplesheet import check_samples, read_table, resolve_splits, with_channel_columns


def jobs_python():
    """What `python` means in jobs: the interpreter that runs Snakemake (so `.venv/bin/snakemake`
    works without activating the venv), or the job's own conda env or container's `python`."""
    own_env = {DeploymentMethod.CONDA, DeploymentMethod.APPTAINER}
    if own_env & set(workflow.deployment_settings.deployment_method):
        return ""
    return f'python() {{{{ {shlex.quote(sys.executable)} "$@"; }}}}; '


validate(config, "../config/schemas/config.schema.yaml", set_default=True)

try:
    intensity_model(config["prepare"]["intensity"])
except InputError as err:
    raise WorkflowError(str(err))

# Jobs run `python -m workflow_scripts.<stage>` and import medldm from this checkout, from any
# working directory and inside per-rule conda environments. Job shells trap SIGTERM (SLURM's early warning before a time limit, then the limit itself), so
# the program they run decides how the job ends: a trainer writes its checkpoint and exits 75.
# MEDLDM_DEVICE: the trainers' device (config cluster.device), not a param: it changes no result.
shell.prefix(
    f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; {jobs_python()}"
    f"export MEDLDM_DEVICE={config['cluster']['device']}; trap : TERM; "
)

RESULTS = config["results"]
IMAGE_CHANNELS = config.get("image_channels") or []  # [] = one channel, the sheet's `image`
PREPARED = f"{RESULTS}/prepared"
DEMO = config["demo"]["enabled"]
SAMPLE_SHEET = f"{RESULTS}/demo/samples.tsv" if DEMO else config.get("samples", "")
SPLIT_FILE = config["split"]["file"] or ""
if SPLIT_FILE and os.path.abspath(SPLIT_FILE) == os.path.abspath(f"{PREPARED}/splits.tsv"):
    raise WorkflowError(
        f"config: split.file {SPLIT_FILE} is the file the workflow writes: "
        "copy it (e.g. to config/splits.tsv) and set split.file to the copy"
    )

SPATIAL_DIMS = config["spatial_dims"]
SLICES = config["prepare"].get("slices")


def check_spatial_dims():
    """2D (spatial_dims 2) images are the 2D inputs themselves, or slices of 3D inputs
    (prepare.slices); prepare.spacing and shape have one entry per input axis; every autoencoder
    follows spatial_dims; DiT3D is 3D only."""
    if SPATIAL_DIMS == 3 and SLICES:
        raise WorkflowError("config: prepare.slices is set but spatial_dims is 3: set spatial_dims: 2 for "
                            "2D slices, or remove prepare.slices")
    planar = SPATIAL_DIMS == 2 and not SLICES  # the sample sheet's files are 2D images
    for key in ("spacing", "shape"):
        given = config["prepare"][key]
        if planar and len(given) != 2:
            raise WorkflowError(
                f"config: spatial_dims is 2 but prepare.slices is not set, so the sample sheet's images are 2D "
                f"(NIfTI, PNG or TIFF), and prepare.{key} {given} has {len(given)} entries: give one per image "
                "axis (e.g. spacing: [1, 1], shape: [128, 128]); or set prepare.slices: {axis: axial, n: "
                "<slices per subject>} to draw 2D slices from 3D inputs")
        if not planar and len(given) != 3:
            raise WorkflowError(f"config: prepare.{key} {given} has {len(given)} entries but the inputs are 3D volumes "
                                f"(spatial_dims 3, or prepare.slices set): give 3, one per voxel axis")
    if "pixel_spacing" in config["prepare"] and not planar:
        raise WorkflowError("config: prepare.pixel_spacing is the pixel size of PNG/TIFF inputs, read only with "
                            "spatial_dims 2 and no prepare.slices: remove it")
    for entry in config["vae"].values():
        entry.setdefault("model", {})["spatial_dims"] = SPATIAL_DIMS
    for name, entry in config["ldm"].items():
        if SPATIAL_DIMS == 2 and entry.get("model", {}).get("name") == "dit3d":
            raise WorkflowError(f"config: ldm.{name}.model.name is dit3d, which is 3D only, but spatial_dims "
                                "is 2: use model name unet")


check_spatial_dims()


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


# Rules renamed so that "samples" only ever means subjects (the sample sheet): the old names
# still work as `resources` keys, with a deprecation message.
RENAMED_RULES = {"decode_samples": "decode_synthetic", "evaluate_samples": "evaluate_synthetic"}


def accept_renamed_resources(resources):
    for old, new in RENAMED_RULES.items():
        if old not in resources:
            continue
        if new in resources:
            raise WorkflowError(f"config resources: both `{old}` (old name) and `{new}` are set; keep only `{new}`")
        logger.warning(f"config resources.{old} is deprecated: the rule is now `{new}`; rename the key")
        resources[new] = resources.pop(old)


accept_renamed_resources(config["resources"])


def load_samples():
    """The sample table: the demo cohort's, or the user's sheet validated against its schema."""
    if DEMO:
        if IMAGE_CHANNELS:
            raise WorkflowError("config image_channels needs your own sample sheet (`samples`): the demo cohort "
                                "has one image channel")
        demo = config["demo"]
        rows = demo_sheet_rows(
            f"{RESULTS}/demo", demo["n_subjects"], demo["lesion_class"], demo["masks"]["per_subject"]
        )
        sheet, check_files = pd.DataFrame(rows), False
    else:
        if not SAMPLE_SHEET:
            raise WorkflowError(
                "config: set `samples` to your sample sheet (TSV), or `demo: {enabled: true}`"
            )
        sheet, check_files = None, True
    where = f"sample sheet {SAMPLE_SHEET}"
    try:
        if sheet is None:
            sheet = read_table(SAMPLE_SHEET, "sample sheet")
            one_image = with_channel_columns(sheet, IMAGE_CHANNELS, where).drop(columns=IMAGE_CHANNELS)
            validate(one_image, "../config/schemas/samples.schema.yaml")
        sheet = check_samples(sheet, config["classes"], where, check_files, IMAGE_CHANNELS)
        resolve_splits(sheet, config["split"], where)  # group or pinned-split conflicts stop here
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


def check_input_dims():
    """The first subject's image against spatial_dims and prepare.slices, from its header, before
    any job (a mismatch is a config mistake; preparation checks every file)."""
    if DEMO:
        return
    expected = 2 if SPATIAL_DIMS == 2 and not SLICES else 3
    path = SAMPLES["image"].iloc[0]
    found = input_dims(path)
    if found is None or found == expected:
        return
    if expected == 2:
        raise WorkflowError(f"sample sheet {SAMPLE_SHEET}: {path} is a 3D volume, but spatial_dims is 2 without "
                            "prepare.slices, which reads 2D images: set prepare.slices (and 3-entry "
                            "prepare.spacing and shape) to draw 2D slices from volumes, or give 2D images")
    raise WorkflowError(f"sample sheet {SAMPLE_SHEET}: {path} is a 2D image, but the inputs must be 3D volumes "
                        f"(spatial_dims {SPATIAL_DIMS}{', prepare.slices set' if SLICES else ''}): set "
                        "spatial_dims: 2 with 2-entry prepare.spacing and shape (and no prepare.slices) for 2D images")


check_input_dims()
HAS_MASKS = bool((SAMPLES["mask"] != "").all())
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
    return {
        "image": row["image"],
        **({"channels": [row[c] for c in IMAGE_CHANNELS[1:]]} if IMAGE_CHANNELS else {}),
        **({"label": row["label"]} if HAS_LABELS else {}),
        **({"mask": row["mask"]} if HAS_MASKS else {}),
    }


def prepared_files(kind):
    """A subject's prepared `image`, `label` or `mask` file, or one per 2D slice (prepare.slices)."""
    if not SLICES:
        return f"{PREPARED}/{{subject}}/{kind}.nii.gz"
    return [f"{PREPARED}/{{subject}}/{kind}-s{k}.nii.gz" for k in range(SLICES["n"])]


def prepare_outputs():
    outputs = {"image": prepared_files("image"), "info": f"{PREPARED}/{{subject}}/info.json"}
    if HAS_LABELS:
        outputs["label"] = prepared_files("label")
    if HAS_MASKS:
        outputs["mask"] = prepared_files("mask")
    return outputs


def label_args(wildcards, input, output):
    """--label/--mask/--channel arguments of prepare_subject (label maps, inpainting masks and
    further image channels, when given)."""
    args = ""
    if IMAGE_CHANNELS:
        args = "".join(f"--channel {shlex.quote(path)} " for path in input.channels)
        args += f"--channel-names {','.join(IMAGE_CHANNELS)} "
    if HAS_LABELS:
        values = ",".join(str(v) for v in LABEL_VALUES)
        args += f"--label {shlex.quote(input.label)} --out-label {quoted(output.label)} --label-values {values}"
    if HAS_MASKS:
        args += f" --mask {shlex.quote(input.mask)} --out-mask {quoted(output.mask)}"
    return args


def quoted(paths):
    """A path, or a list of them (one per 2D slice), quoted for the shell."""
    return " ".join(shlex.quote(p) for p in ([paths] if isinstance(paths, str) else paths))


# Autoencoders (rules/vae.smk)
def vae_names(pretrained):
    """A wildcard pattern of the vae entries that import_vae imports (pretrained) or train_vae trains."""
    names = [name for name, entry in config["vae"].items() if bool(entry["pretrained"]) == pretrained]
    return "|".join(re.escape(name) for name in names) or "(?!)"


def import_settings(entry):
    """What import_vae reads of a vae entry (its rerun triggers): architecture, labels, file."""
    return settings_json({k: entry[k] for k in ("model", "paired_labels", "pretrained")})


# Diffusion and sampling (rules/ldm.smk, rules/sample.smk)
def ldm_entry(name):
    if name not in config["ldm"]:
        raise WorkflowError(f"config: no ldm entry {name!r} (known: {sorted(config['ldm'])})")
    return config["ldm"][name]


def ldm_init_input(wildcards):
    """The ldm.pt that an ldm's `init_from` names (its weights start the run), or none."""
    base = ldm_entry(wildcards.ldm).get("init_from")
    return [f"{RESULTS}/ldm/{base}/ldm.pt"] if base else []


def ldm_init_arg(wildcards, input):
    return f"--init {shlex.quote(input.init[0])}" if input.init else ""


def check_ldm_init(name, entry):
    """Refuse an `init_from` that names no ldm, another autoencoder's ldm, another backbone, or a cycle."""
    seen, here = [name], entry
    while here.get("init_from"):
        base = here["init_from"]
        key = f"config: ldm.{seen[-1]}.init_from"
        if base not in config["ldm"]:
            raise WorkflowError(f"{key} names {base!r}, which is not an ldm entry (known: {sorted(config['ldm'])})")
        if base in seen:
            raise WorkflowError(f"{key}: init_from goes round in a circle ({' -> '.join([*seen, base])})")
        other = config["ldm"][base]
        if other["vae"] != here["vae"] or other["model"] != here["model"]:
            raise WorkflowError(f"{key} names ldm {base!r}, whose `vae` or `model` differs: init_from needs an "
                                "ldm of the same autoencoder and backbone settings")
        seen.append(base)
        here = other


def ldm_vae_dir(wildcards):
    """results/vae/<name> of the autoencoder an ldm entry learns from."""
    vae = ldm_entry(wildcards.ldm)["vae"]
    if vae not in config["vae"]:
        raise WorkflowError(f"config: ldm {wildcards.ldm!r} names vae {vae!r}, which is not in `vae`")
    return f"{RESULTS}/vae/{vae}"


# Sample-set keys that only inpaint sets read: left out of a generate set's settings, so that
# they change (and rerun) nothing there; blend_voxels is decoding's alone.
INPAINT_SET_KEYS = ("method", "split", "draws", "repaint", "keep_known")
DECODE_ONLY_SET_KEYS = ("blend_voxels",)


def sample_set_entry(wildcards):
    """The config entry of sample set {sample_set}, which must belong to ldm {ldm}."""
    entry = config["sample_sets"].get(wildcards.sample_set)
    if entry is None or entry["ldm"] != wildcards.ldm:
        raise WorkflowError(
            f"no sample set {wildcards.sample_set!r} of ldm {wildcards.ldm!r} in config `sample_sets`"
        )
    return entry


def sample_set_json(wildcards):
    entry = sample_set_entry(wildcards)
    dropped = (*INPAINT_SET_KEYS, "task") if entry["task"] == "generate" else ()
    return settings_json({k: v for k, v in entry.items() if k not in (*dropped, *DECODE_ONLY_SET_KEYS)})


def sample_set_inputs(wildcards):
    """The ldm and the vae.pt of a sample set; for an inpaint set, or a set conditioned on a
    split's real maps, the real latents; for a set conditioned on another set's label maps (the
    chain), that set's volumes.h5 (so asking for this set builds that one first)."""
    entry = sample_set_entry(wildcards)
    inputs = {
        "ldm": f"{RESULTS}/ldm/{wildcards.ldm}/ldm.pt",
        "vae": f"{ldm_vae_dir(wildcards)}/vae.pt",
    }
    if entry.get("controlnet"):
        inputs["controlnet"] = f"{RESULTS}/controlnet/{entry['controlnet']}/controlnet.pt"
    source = (entry.get("conditions") or {}).get("from")
    if entry["task"] == "inpaint" or source in SPLIT_NAMES:
        inputs["real"] = f"{ldm_vae_dir(wildcards)}/latents.h5"
    elif source is not None:
        inputs["source"] = f"{sample_set_dirs(source)[0]}/volumes.h5"
    return inputs


def real_latents_arg(wildcards, input):
    """--real (the autoencoder's latents), --source (a chained set's source volumes) and
    --controlnet (a ControlNet set's controlnet.pt) of sample."""
    args = [f"--{key} {shlex.quote(input[key])}" for key in ("real", "source", "controlnet") if key in input.keys()]
    return " ".join(args)


# Spatial conditioning (medldm/diffusion/spatial.py): an ldm's `conditions` name maps of the
# sample sheet; a set of such a model takes them from a split's real subjects or from another
# set's decoded label maps (`conditions: {from: <set>}`, the chain).
SPLIT_NAMES = ("train", "val", "test")


def ldm_conditions(name):
    return list(config["ldm"][name].get("conditions") or []) if name in config["ldm"] else []


def set_has_label_maps(name):
    """Whether a sample set's volumes.h5 will hold `label` maps: a set of a label-conditioned
    model, of a paired-label autoencoder, or of a label-map autoencoder (`inputs: labels`)."""
    entry = config["sample_sets"][name]
    ldm = config["ldm"].get(entry["ldm"])
    if ldm is None:
        return False
    vae = config["vae"].get(ldm["vae"], {})
    return (bool(entry.get("conditions")) and "label" in set_condition_maps(entry)) or bool(
        vae.get("paired_labels")) or vae.get("inputs") == "labels"


def check_ldm_conditions(name, entry):
    """Refuse an ldm's `conditions` that the sample sheet cannot give for every row."""
    maps = ldm_conditions(name)
    if "image" in maps:
        raise WorkflowError(f"config: ldm.{name}.conditions: conditioning on another image channel is not "
                            "supported yet; use label and/or mask")
    if maps and entry.get("task", "generate") == "inpaint":
        raise WorkflowError(f"config: ldm.{name} has task inpaint and `conditions`; use one of the two")
    for kind, present in (("label", HAS_LABELS), ("mask", HAS_MASKS)):
        if kind in maps and not present:
            empty = SAMPLES.index[SAMPLES[kind] == ""].tolist()
            raise WorkflowError(
                f"config: ldm.{name}.conditions names {kind!r}, but the sample sheet {SAMPLE_SHEET or '(demo)'} "
                f"has no `{kind}` column value for {len(empty)} row(s) (e.g. {empty[:3]}): fill the `{kind}` "
                f"column for every subject, or drop {kind!r} from ldm.{name}.conditions"
            )
    dropout = entry["train"].get("condition_dropout", 0)
    if dropout and not maps:
        raise WorkflowError(f"config: ldm.{name}.train.condition_dropout is {dropout} but the ldm has no `conditions`")


def check_set_conditions(name, entry, seen=()):
    """Refuse a sample set whose `conditions` its ldm cannot take, or whose source is unknown,
    has no label maps, has no subjects, or leads back to the set (a cycle)."""
    where = f"config: sample_sets.{name}"
    maps, conditions = set_condition_maps(entry), entry.get("conditions")
    if maps and not conditions:
        raise WorkflowError(f"{where} has no `conditions`, but ldm.{entry['ldm']} is conditioned on {maps}: "
                            "add `conditions: {from: test}` (or from a set with label maps)")
    if conditions and not maps:
        raise WorkflowError(f"{where}.conditions is set, but ldm.{entry['ldm']} has no `conditions` (it was not "
                            "trained with condition maps): remove the set's conditions, or condition the ldm")
    if not conditions:
        return
    source = conditions["from"]
    if source in SPLIT_NAMES:
        splits = resolve_splits(SAMPLES, config["split"], where)
        if not (splits == source).any():
            raise WorkflowError(f"{where}.conditions.from is {source!r}, but no subject is in split {source!r}: "
                                "choose another split, or raise split.test_fraction / val_fraction")
        return
    if source not in config["sample_sets"]:
        raise WorkflowError(f"{where}.conditions.from names {source!r}: neither a split ({list(SPLIT_NAMES)}) "
                            f"nor a sample set (known: {sorted(config['sample_sets'])})")
    if source == name or source in seen:
        raise WorkflowError(f"{where}.conditions.from: the sets {[*seen, name, source]} condition each other in a cycle")
    if not set_has_label_maps(source):
        raise WorkflowError(f"{where}.conditions.from names set {source!r}, which has no label maps (its volumes "
                            "are images only): name a label-map generator's set, a paired-label set or a "
                            "label-conditioned set")
    if maps != ["label"]:
        raise WorkflowError(f"{where}.conditions.from names set {source!r}, which gives label maps only, but "
                            f"ldm.{entry['ldm']} is conditioned on {maps}")
    source_entry = config["sample_sets"][source]
    if source_entry.get("conditions"):
        check_set_conditions(source, source_entry, (*seen, name))


def check_label_autoencoders():
    """`vae.<name>.inputs: labels` needs label maps in the sheet and excludes paired_labels."""
    for name, entry in config["vae"].items():
        if entry["inputs"] != "labels":
            continue
        if entry["paired_labels"]:
            raise WorkflowError(
                f"config: vae.{name}.inputs is labels (label maps alone) and vae.{name}.paired_labels is "
                "true (image + labels): set paired_labels: false, or inputs: image"
            )
        if entry["pretrained"]:
            raise WorkflowError(
                f"config: vae.{name}.inputs is labels but vae.{name}.pretrained imports an image "
                "autoencoder: label-map autoencoders are trained here (set pretrained: null)"
            )
        if not HAS_LABELS:
            raise WorkflowError(
                f"config: vae.{name}.inputs is labels but the sample sheet has no label maps: fill its "
                "`label` column for every subject (and list their names in `labels`), or set inputs: image"
            )


def is_label_set(name):
    """A sample set of an ldm on a label-map autoencoder: label maps, no images (no image metrics)."""
    vae = config["vae"].get(ldm_entry(config["sample_sets"][name]["ldm"])["vae"], {})
    return vae.get("inputs") == "labels"


# ControlNet (rules/controlnet.smk, medldm/diffusion/controlnet.py): `controlnet.<name>` steers
# a frozen unet ldm; a sample set naming it samples that ldm (its `ldm` is filled in here).
def controlnet_entry(name):
    if name not in config["controlnet"]:
        raise WorkflowError(f"config: no controlnet entry {name!r} (known: {sorted(config['controlnet'])})")
    return config["controlnet"][name]


def controlnet_latents(wildcards):
    """The latents.h5 the base ldm learned from (its label maps and masks condition the ControlNet)."""
    return f"{RESULTS}/vae/{config['ldm'][controlnet_entry(wildcards.controlnet)['ldm']]['vae']}/latents.h5"


def set_condition_maps(entry):
    """The maps a sample set's model takes: its controlnet's, else its ldm's `conditions`."""
    if entry.get("controlnet"):
        return [config["controlnet"][entry["controlnet"]]["maps"]]
    return ldm_conditions(entry["ldm"])


def check_controlnets():
    """Refuse controlnets whose base cannot be steered or whose maps the sheet lacks, and sample
    sets that name an unknown controlnet, another ldm, or no conditions; fill in their `ldm`."""
    for name, entry in config["controlnet"].items():
        where, base_name = f"config: controlnet.{name}", entry["ldm"]
        base = config["ldm"].get(base_name)
        if base is None:
            raise WorkflowError(f"{where}.ldm names {base_name!r}, which is not in `ldm` (known: {sorted(config['ldm'])})")
        backbone = (base.get("model") or {}).get("name", "unet")
        if backbone != "unet":
            raise WorkflowError(f"{where}.ldm names ldm.{base_name}, a {backbone!r} model: a ControlNet copies a "
                                "unet encoder; name an ldm with model name unet")
        if base["task"] != "generate" or ldm_conditions(base_name):
            raise WorkflowError(f"{where}.ldm names ldm.{base_name}, which takes extra input channels (task "
                                f"{base['task']!r}, conditions {ldm_conditions(base_name)}): name a plain generate ldm")
        if not {"label": HAS_LABELS, "mask": HAS_MASKS}[entry["maps"]]:
            raise WorkflowError(f"{where}.maps is {entry['maps']!r}, but the sample sheet {SAMPLE_SHEET or '(demo)'} "
                                f"has no `{entry['maps']}` for every row: fill that column, or choose the other maps")
    for name, entry in config["sample_sets"].items():
        where = f"config: sample_sets.{name}"
        if "controlnet" not in entry:
            if "conditioning_scale" in entry:
                raise WorkflowError(f"{where}.conditioning_scale is set but the set names no `controlnet`; remove it")
            continue
        if entry["controlnet"] not in config["controlnet"]:
            raise WorkflowError(f"{where}.controlnet names {entry['controlnet']!r}, which is not in `controlnet` "
                                f"(known: {sorted(config['controlnet'])})")
        base = config["controlnet"][entry["controlnet"]]["ldm"]
        if entry.get("ldm", base) != base:
            raise WorkflowError(f"{where} names ldm {entry['ldm']!r} and controlnet {entry['controlnet']!r}, whose "
                                f"base is ldm {base!r}: drop the set's `ldm` (a controlnet set samples its base)")
        entry["ldm"] = base
        if not entry.get("conditions"):
            raise WorkflowError(f"{where} names controlnet {entry['controlnet']!r} but has no `conditions`: add "
                                "`conditions: {from: test}` (or from a set with label maps), the maps that steer it")


def check_models():
    """Refuse, before any job, models and sample sets that cannot be right."""
    check_controlnets()
    check_label_autoencoders()
    for name, entry in config["ldm"].items():
        train = entry["train"]
        if "test" in train["splits"] and not train["allow_test_split"]:
            raise WorkflowError(
                f"config: ldm.{name}.train.splits includes 'test', the subjects the evaluation holds "
                f"out; remove it, or set ldm.{name}.train.allow_test_split: true to train on them anyway"
            )
        check_ldm_conditions(name, entry)
        check_ldm_init(name, entry)
    for name, entry in config["sample_sets"].items():
        ldm = config["ldm"].get(entry["ldm"])
        if ldm is not None and entry["task"] == "generate":
            check_set_conditions(name, entry)
        map_scale = entry.get("condition_guidance_scale", 1)
        if ldm is not None and map_scale != 1 and not ldm["train"].get("condition_dropout", 0):
            raise WorkflowError(
                f"config: sample_sets.{name}.condition_guidance_scale is {map_scale} but "
                f"ldm.{entry['ldm']}.train.condition_dropout is 0 (no map-free prediction was trained): "
                "set condition_guidance_scale: 1, or condition_dropout > 0 and retrain"
            )
        if ldm is not None and entry["task"] == "inpaint" and entry["method"] == "trained" and ldm["task"] != "inpaint":
            raise WorkflowError(
                f"config: sample_sets.{name} inpaints with method trained, but ldm.{entry['ldm']} has "
                f"task {ldm['task']!r}: set its method to repaint, or name an ldm with task: inpaint"
            )
        if entry["task"] == "inpaint" and entry["method"] == "repaint" and entry["keep_known"]:
            raise WorkflowError(
                f"config: sample_sets.{name}.keep_known is for method trained; RePaint always keeps "
                "the known latent: remove keep_known, or set method: trained"
            )
        if ldm is None or not config["classes"] or entry["guidance_scale"] == 1:
            continue
        if ldm["train"]["class_dropout"] == 0:
            raise WorkflowError(
                f"config: sample_sets.{name}.guidance_scale is {entry['guidance_scale']} but "
                f"ldm.{entry['ldm']}.train.class_dropout is 0, so its null class was never trained and "
                "guidance (any scale but 1) mixes in an untrained prediction: set guidance_scale: 1, "
                "or class_dropout > 0 (e.g. 0.15) and retrain"
            )


check_models()


def python_launcher(wildcards, resources):
    """`python`, or torchrun (`python -m torch.distributed.run`) with one process per GPU when the
    job's resources ask for several (DDP). Derived from resources, so not a rerun trigger: a new
    GPU count resumes the run (or the trainer explains why it cannot)."""
    n = gpus_requested(resources)
    return f"python -m torch.distributed.run --standalone --nproc_per_node={n}" if n > 1 else "python"


# Trainer settings that say how a run proceeds, not what it learns: how often it validates,
# logs and checkpoints, whether it compiles, how it reads its data, and its live samples. A change resumes the run
# (each trainer's run key leaves them out), so they are not rerun triggers either.
TRAIN_CADENCE = ("val_every", "log_every", "checkpoint_every", "compile", "workers", "cache_mb", "sample_every",
                 "sample_volumes", "sample_steps")


def trainer_settings(entry):
    """A vae or ldm entry as its trainer's --settings: what changes the trained model (no
    `inference` section, no TRAIN_CADENCE keys)."""
    train = {k: v for k, v in entry["train"].items() if k not in (*TRAIN_CADENCE, "allow_test_split")}
    # `inputs: image` (the default) is left out, so that image autoencoders keep their rerun trigger
    kept = {k: v for k, v in entry.items() if k != "inference" and (k, v) != ("inputs", "image")}
    return settings_json({**kept, "train": train})


# Inference keys that change how many volumes or windows go through the network at once, not
# the result (export_latents reruns only for the others: roi_size, overlap, mode).
INFERENCE_BATCHING = ("batch_size", "sw_batch_size")


def inference_windows(entry):
    """A vae entry's inference settings that change what it encodes: the sliding windows (none
    without roi_size: overlap and mode then change nothing)."""
    if not entry["inference"]["roi_size"]:
        return {}
    return {k: v for k, v in entry["inference"].items() if k not in INFERENCE_BATCHING}


def inference_batching(entry):
    """A vae entry's inference batch sizes (not rerun triggers)."""
    return {k: v for k, v in entry["inference"].items() if k in INFERENCE_BATCHING}


def trainer_cadence(entry):
    """The TRAIN_CADENCE keys of a vae or ldm entry, as the trainer's --cadence."""
    return settings_json({k: v for k, v in entry["train"].items() if k in TRAIN_CADENCE})


wildcard_constraints:
    ldm="[A-Za-z0-9][A-Za-z0-9._-]*",
    sample_set="[A-Za-z0-9][A-Za-z0-9._-]*",


# Evaluation (rules/evaluate.smk)
EVAL = f"{RESULTS}/eval"
EVALUATE = config["evaluate"]
CLASSIFIER = EVALUATE["classifier"]["enabled"] and len(config["classes"]) >= 2
SALIENCY = CLASSIFIER and EVALUATE["classifier"]["saliency_subjects"] > 0
_FID_FETCH_KEYS = ("weights", "allow_download", "allow_convert", "allow_unverified")
_FID_FEATURE_KEYS = ("dims", "central_fraction", "slices_per_volume", "empty_threshold", "min_foreground")
FID_TRAIN_FEATURES = f"{EVAL}/reference/fid_features_train.npz"


def fid_settings(fetch):
    """evaluate.fid split in two, so that changing dims or slices never re-fetches the weights
    and changing the weights source never recomputes features (batch_size is runtime_only)."""
    return {
        k: v
        for k, v in EVALUATE["fid"].items()
        if (k in _FID_FETCH_KEYS) == fetch and k != "batch_size"
    }


def fid_feature_settings():
    """The evaluate.fid keys that change Inception features (not KID, bootstrap or the source)."""
    return {k: EVALUATE["fid"][k] for k in _FID_FEATURE_KEYS}


def runtime_only(value):
    """A param that changes how a job runs, not its output (device, batch size, logging cadence):
    Snakemake leaves params derived from `resources` out of its params rerun trigger, so changing
    it reruns nothing. ``value`` is the param, or a function of the wildcards that gives it."""
    return lambda wildcards, resources: value(wildcards) if callable(value) else value


def reconstruction_fid_features(wildcards):
    """Features of the reconstructions by the autoencoder that sample set's ldm learns from."""
    return f"{EVAL}/vae/{ldm_entry(wildcards.ldm)['vae']}/fid_features.npz"


def sample_set_dirs(name):
    """(folder of the generated volumes, evaluation folder) of one sample set."""
    ldm = config["sample_sets"][name]["ldm"]
    return f"{RESULTS}/synthetic/{ldm}/{name}", f"{EVAL}/synthetic/{ldm}/{name}"


def reconstructions_h5(vae="{vae}"):
    """The autoencoder's decoded reconstructions of the real subjects (a rule pattern by default)."""
    return f"{RESULTS}/vae/{vae}/reconstructions/volumes.h5"


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


# Inpainting (rules/decode.smk, rules/evaluate.smk): sample sets with task: inpaint are decoded
# with their sources pasted back outside the masks and scored inside them (evaluate_inpainting),
# instead of FID and the classifier.
def is_inpaint_set(name):
    return config["sample_sets"][name].get("task", "generate") == "inpaint"


def decode_synthetic_inputs(wildcards):
    """vae.pt and the set's latents; for an inpaint set also the manifest (the sources pasted back)."""
    folder = f"{RESULTS}/synthetic/{wildcards.ldm}/{wildcards.sample_set}"
    inputs = {"model": f"{ldm_vae_dir(wildcards)}/vae.pt", "latents": f"{folder}/latents.h5"}
    if is_inpaint_set(wildcards.sample_set):
        inputs["manifest"] = f"{PREPARED}/manifest.tsv"
    return inputs


def paste_back_args(wildcards, input):
    return f"--manifest {shlex.quote(input.manifest)}" if "manifest" in input.keys() else ""


def decode_synthetic_settings(wildcards):
    """decode's --settings: the vae's inference section, and blend_voxels for an inpaint set (a
    generate set's settings, and so its rerun trigger, stay as they were)."""
    settings = config["vae"][ldm_entry(wildcards.ldm)["vae"]]["inference"]
    if is_inpaint_set(wildcards.sample_set):
        settings = {**settings, "blend_voxels": config["sample_sets"][wildcards.sample_set].get("blend_voxels", 0)}
    return settings_json(settings)


DEMO_MASKS = config["demo"]["masks"]
# demo_cohort's rerun trigger for its masks: a param only when masks are asked for, so that the
# default demo's params (and so its outputs) stay as they were.
DEMO_MASK_PARAMS = {"masks": settings_json(DEMO_MASKS)} if DEMO_MASKS["per_subject"] else {}


def demo_mask_args(wildcards, output):
    if not DEMO_MASKS["per_subject"]:
        return ""
    return f"--masks-per-subject {DEMO_MASKS['per_subject']} --ellipsoids {DEMO_MASKS['ellipsoids']}"


def inpainting_settings(wildcards):
    """evaluate_inpainting's --settings: the paste-back of its baselines and the bootstrap."""
    return settings_json({
        "inference": config["vae"][ldm_entry(wildcards.ldm)["vae"]]["inference"],
        "blend_voxels": config["sample_sets"][wildcards.sample_set].get("blend_voxels", 0),
        **EVALUATE["inpainting"],
    })


# Segmentation evaluation (rules/evaluate.smk): a segmenter trained once on the real subjects'
# label maps (like the FID reference), and per sample set segmentation.json: adherence of its label
# maps (or the control, for a set without maps) and train-on-synthetic Dice. Auto mode plans it only
# when some set has label maps, so the class-only default demo does not get these jobs.
SEGMENTER_DIR = f"{EVAL}/segmenter"


def set_has_labels(name):
    """Whether a sample set's volumes.h5 carries `label`: a paired-label or label-map autoencoder,
    or conditions on its ldm or on the set."""
    entry = config["sample_sets"][name]
    ldm = ldm_entry(entry["ldm"])
    vae = config["vae"].get(ldm["vae"], {})
    return bool(vae.get("paired_labels") or vae.get("inputs") == "labels" or ldm.get("conditions")
                or entry.get("conditions"))


def segmentation_enabled():
    enabled = EVALUATE["segmentation"]["enabled"]
    if enabled is None:
        enabled = any(set_has_labels(name) for name in config.get("sample_sets", {}))
    if enabled and not (SAMPLES["label"] != "").all():
        raise WorkflowError(
            "config: evaluate.segmentation needs a label map for every subject (sample sheet column "
            "`label`), and some rows have none; add them, or set evaluate.segmentation.enabled: false"
        )
    return enabled


def segmentation_sets():
    """The sample sets scored by evaluate_segmentation: all but inpaint sets and sets without images."""
    if not SEGMENTATION:
        return []
    return [name for name in config.get("sample_sets", {})
            if not is_inpaint_set(name)
            and config["vae"].get(ldm_entry(config["sample_sets"][name]["ldm"])["vae"], {}).get("inputs") != "labels"]


SEGMENTATION = segmentation_enabled()


def report_index():
    """What the report shows, by name: the --inputs JSON of workflow_scripts/report.py."""
    index = {
        "manifest": f"{PREPARED}/manifest.tsv",
        "fid_weights": f"{EVAL}/fid_weights.json",
        "vae": {
            name: {
                "model": f"{RESULTS}/vae/{name}/vae.pt",
                "run_dir": None if config["vae"][name]["pretrained"] else f"{RESULTS}/runs/vae/{name}",
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
        synthetic, evaluation = sample_set_dirs(name)
        vae = ldm_entry(sample_set["ldm"])["vae"]
        inpaint = is_inpaint_set(name)
        labels = is_label_set(name)  # label maps: their own evaluation, no image metrics
        images = not (inpaint or labels)
        wanted = set(sample_set.get("evaluate", ["image_metrics", "classifier", "segmentation"]))
        classifier = CLASSIFIER and images and "classifier" in wanted
        index["sample_sets"][name] = {
            "ldm": sample_set["ldm"],
            "volumes": f"{synthetic}/volumes.h5",
            "metrics": f"{evaluation}/image_metrics.json" if images and "image_metrics" in wanted else None,
            "classifier": f"{evaluation}/classifier.json" if classifier else None,
            "saliency": [
                f"{folder}/saliency.png"
                for folder in (evaluation, REAL_ARM_DIR, reconstruction_arm_dir(vae))
            ]
            if SALIENCY and classifier
            else [],
            "inpainting": f"{evaluation}/inpainting.json" if inpaint else None,
        }
        if labels:
            index["sample_sets"][name]["label_maps"] = f"{evaluation}/label_maps.json"
        if name in segmentation_sets() and "segmentation" in wanted:  # only then: a class-only run's report params stay as they were
            index["sample_sets"][name]["segmentation"] = f"{evaluation}/segmentation.json"
    if SEGMENTATION:
        index["segmenter"] = f"{SEGMENTER_DIR}/segmenter.json"
    if config["controlnet"]:  # only then: other runs' report params stay as they were
        index["controlnet"] = {
            name: {"model": f"{RESULTS}/controlnet/{name}/controlnet.pt", "ldm": entry["ldm"],
                   "run_dir": f"{RESULTS}/runs/controlnet/{name}"}
            for name, entry in config["controlnet"].items()
        }
    return index


def report_inputs():
    """Every file the report reads (the run directories' metrics.csv are read, not declared)."""
    index = report_index()
    files = {"manifest": index["manifest"], "fid_weights": index["fid_weights"]}
    if "segmenter" in index:
        files["segmenter"] = index["segmenter"]
    for kind in ("vae", "ldm", "controlnet"):
        for name, entry in index.get(kind, {}).items():
            files[f"{kind}_{name}"] = entry["model"]
            if kind == "vae":
                files[f"reconstruction_{name}"] = entry["reconstruction"]
    for name, entry in index["sample_sets"].items():
        for key in ("volumes", "metrics", "classifier", "saliency", "inpainting", "segmentation", "label_maps"):
            if entry.get(key):
                files[f"{key}_{name}"] = entry[key]
    return files


# SLURM preflight (medldm/preflight.py): runs after the DAG is built and before the first sbatch.
def slurm_requests():
    """What each job (or group job) of this run will ask SLURM for."""
    from medldm.preflight import Request

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
        gpus = gpus_requested(res)
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
