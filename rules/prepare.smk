# Preparation: one job per subject, then the manifest (splits per group), splits.tsv and a montage.


localrules:
    manifest,


rule prepare:
    input:
        unpack(prepare_inputs),
    output:
        **prepare_outputs(),
    log:
        f"{RESULTS}/logs/prepare/{{subject}}.log",
    group:
        "prepare"  # on a cluster, subjects go to SLURM in groups (profile: group-components)
    conda:
        "../envs/cpu.yaml"
    params:
        settings=settings_json(config["prepare"]),
        label_args=label_args,
    shell:
        "python -m workflow_scripts.prepare_subject --image {input.image:q} {params.label_args}"
        " --settings {params.settings:q} --out-image {output.image:q} --out-info {output.info:q}"
        " > {log} 2>&1"


rule manifest:
    input:
        sheet=SAMPLE_SHEET,
        infos=expand(f"{PREPARED}/{{subject}}/info.json", subject=SUBJECTS),
        pinned_splits=SPLIT_FILE or [],
    output:
        manifest=f"{PREPARED}/manifest.tsv",
        splits=f"{PREPARED}/splits.tsv",
        montage=report(
            f"{PREPARED}/montage.png",
            caption="../report/prepared.rst",
            category="Data",
        ),
    log:
        f"{RESULTS}/logs/manifest.log",
    conda:
        "../envs/cpu.yaml"
    params:
        split=settings_json(config["split"]),
        classes=",".join(config["classes"]),
    shell:
        "python -m workflow_scripts.make_manifest --samples {input.sheet:q}"
        " --infos {input.infos:q}"
        " --split-settings {params.split:q} --classes {params.classes:q} --out {output.manifest:q}"
        " --splits {output.splits:q}"
        " --montage {output.montage:q} > {log} 2>&1"


rule prepared:
    input:
        rules.manifest.output,
