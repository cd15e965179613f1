# Preparation: one job per subject, then the manifest (subject-level splits) and a montage.


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


rule prepare:
    input:
        unpack(prepare_inputs),
    output:
        **prepare_outputs(),
    params:
        settings=settings_json(config["prepare"]),
        label_args=label_args,
    log:
        f"{RESULTS}/logs/prepare/{{subject}}.log",
    shell:
        "python workflow_scripts/prepare_subject.py --image {input.image:q} {params.label_args}"
        " --settings {params.settings:q} --out-image {output.image:q} --out-info {output.info:q}"
        " > {log} 2>&1"


rule manifest:
    input:
        sheet=SAMPLE_SHEET,
        infos=expand(f"{PREPARED}/{{subject}}/info.json", subject=SUBJECTS),
    output:
        manifest=f"{PREPARED}/manifest.tsv",
        montage=report(f"{PREPARED}/montage.png", caption="../report/prepared.rst", category="Data"),
    params:
        split=settings_json(config["split"]),
        classes=",".join(config["classes"]),
    log:
        f"{RESULTS}/logs/manifest.log",
    shell:
        "python workflow_scripts/make_manifest.py --samples {input.sheet:q} --prepared-dir {PREPARED}"
        " --split-settings {params.split:q} --classes {params.classes:q} --out {output.manifest:q}"
        " --montage {output.montage:q} > {log} 2>&1"


rule prepared:
    input:
        rules.manifest.output,
