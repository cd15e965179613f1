# Autoencoders: one per `vae` config entry (results/vae/<name>/), trained on the prepared
# subjects (or imported: `pretrained`), then every subject encoded into latents.h5 (posterior mu
# and logvar, unscaled).
# The run directory (checkpoints, metrics.csv, tensorboard, montages) is not an output, so a
# failed or time-limited job keeps it and the rerun resumes; more epochs in the config resume too.


wildcard_constraints:
    vae="|".join(re.escape(name) for name in config["vae"]) or "(?!)",


rule train_vae:
    input:
        manifest=f"{PREPARED}/manifest.tsv",
    output:
        model=f"{RESULTS}/vae/{{vae}}/vae.pt",
        montage=report(
            f"{RESULTS}/vae/{{vae}}/val_montage.png",
            caption="../report/vae.rst",
            category="Autoencoder",
            subcategory="{vae}",
        ),
    wildcard_constraints:
        vae=vae_names(pretrained=False),
    log:
        f"{RESULTS}/logs/vae/{{vae}}/train_vae.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    priority: 1  # the training chain before side jobs (FID features, classifiers, segmenter)
    resources:
        **rule_resources("train_vae"),
    params:
        settings=lambda wc: trainer_settings(config["vae"][wc.vae]),
        cadence=runtime_only(lambda wc: trainer_cadence(config["vae"][wc.vae])),
        # how validation decodes (sliding windows or not): not what the run learns
        inference=runtime_only(lambda wc: settings_json(config["vae"][wc.vae]["inference"])),
        prepare=settings_json(config["prepare"]),
        classes=",".join(config["classes"]),
        labels=",".join(config["labels"]),
        run_dir=lambda wc: f"{RESULTS}/runs/vae/{wc.vae}",
        python=python_launcher,
    shell:
        "{params.python} -m workflow_scripts.train_vae --settings {params.settings:q}"
        " --cadence {params.cadence:q} --inference {params.inference:q}"
        " --prepare {params.prepare:q} --manifest {input.manifest:q} --classes {params.classes:q}"
        " --labels {params.labels:q} --run-dir {params.run_dir:q} --out {output.model:q}"
        " --montage {output.montage:q} > {log} 2>&1"


rule import_vae:
    input:
        manifest=f"{PREPARED}/manifest.tsv",
        pretrained=lambda wc: config["vae"][wc.vae]["pretrained"],
    output:
        model=f"{RESULTS}/vae/{{vae}}/vae.pt",
        montage=report(
            f"{RESULTS}/vae/{{vae}}/val_montage.png",
            caption="../report/vae.rst",
            category="Autoencoder",
            subcategory="{vae}",
        ),
    wildcard_constraints:
        vae=vae_names(pretrained=True),
    log:
        f"{RESULTS}/logs/vae/{{vae}}/import_vae.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("import_vae"),
    params:
        settings=lambda wc: import_settings(config["vae"][wc.vae]),
        inference=runtime_only(lambda wc: settings_json(config["vae"][wc.vae]["inference"])),
        montage_subjects=lambda wc: config["vae"][wc.vae]["train"]["montage_subjects"],
        prepare=settings_json(config["prepare"]),
        classes=",".join(config["classes"]),
        labels=",".join(config["labels"]),
    shell:
        "python -m workflow_scripts.import_vae --name {wildcards.vae:q} --settings {params.settings:q}"
        " --pretrained {input.pretrained:q} --inference {params.inference:q}"
        " --prepare {params.prepare:q} --manifest {input.manifest:q} --classes {params.classes:q}"
        " --labels {params.labels:q} --montage-subjects {params.montage_subjects}"
        " --out {output.model:q} --montage {output.montage:q} > {log} 2>&1"


rule export_latents:
    input:
        model=f"{RESULTS}/vae/{{vae}}/vae.pt",
        manifest=f"{PREPARED}/manifest.tsv",
    output:
        f"{RESULTS}/vae/{{vae}}/latents.h5",
    log:
        f"{RESULTS}/logs/vae/{{vae}}/export_latents.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    priority: 1  # the training chain before side jobs (FID features, classifiers, segmenter)
    resources:
        **rule_resources("export_latents"),
    params:
        # the sliding windows change the latents (a rerun trigger), the batch sizes do not
        windows=lambda wc: settings_json(inference_windows(config["vae"][wc.vae])),
        batching=runtime_only(lambda wc: settings_json(inference_batching(config["vae"][wc.vae]))),
    shell:
        "python -m workflow_scripts.export_latents --vae {input.model:q} --manifest {input.manifest:q}"
        " --settings {params.windows:q} --batching {params.batching:q} --out {output:q} > {log} 2>&1"


rule autoencoders:
    input:
        expand(f"{RESULTS}/vae/{{vae}}/latents.h5", vae=config["vae"]),
        [reconstructions_h5(name) for name in config["vae"]],
