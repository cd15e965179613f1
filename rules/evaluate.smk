# Evaluation: the FID weights (a local rule: on a cluster it runs on the login node, which has
# internet), real reference and floor features (once per prepared data set / autoencoder; device and
# batch size are runtime-only params, never a rerun trigger), image metrics and the
# train-on-synthetic classifier per sample set (its real arm trained once per run, its
# reconstruction arm once per autoencoder), inpainting scored inside the masks (inpaint sets,
# instead of FID and the classifier), the segmentation evaluation of label maps (a segmenter trained
# once per run, then adherence and train-on-synthetic Dice per sample set), autoencoder
# reconstruction metrics, the report.


localrules:
    fid_weights,
    report,


rule fid_weights:
    output:
        f"{EVAL}/fid_weights.json",
    log:
        f"{RESULTS}/logs/eval/fid_weights.log",
    conda:
        "../envs/torch.yaml"
    params:
        settings=settings_json(fid_settings(fetch=True)),
    shell:
        "python -m workflow_scripts.fetch_fid_weights --settings {params.settings:q}"
        " --out {output:q} > {log} 2>&1"


rule fid_reference:
    input:
        manifest=f"{PREPARED}/manifest.tsv",
        weights=rules.fid_weights.output[0],
    output:
        f"{EVAL}/reference/fid_features.npz",
    log:
        f"{RESULTS}/logs/eval/fid_reference.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("fid_reference"),
    params:
        settings=settings_json(fid_feature_settings()),
        classes=",".join(config["classes"]),
        split=EVALUATE["real_split"],
        device=runtime_only(EVALUATE["device"]),
        batch_size=runtime_only(EVALUATE["fid"]["batch_size"]),
    shell:
        "python -m workflow_scripts.fid_reference --manifest {input.manifest:q} --classes {params.classes:q}"
        " --split {params.split} --settings {params.settings:q} --weights-record {input.weights:q}"
        " --device {params.device} --batch-size {params.batch_size} --out {output:q} > {log} 2>&1"


# The floors each sample set's FID is shown against: real training subjects (what a perfect
# generator would score) and each autoencoder's reconstructions of the reference subjects.
rule fid_train_features:
    input:
        manifest=f"{PREPARED}/manifest.tsv",
        weights=rules.fid_weights.output[0],
    output:
        FID_TRAIN_FEATURES,
    log:
        f"{RESULTS}/logs/eval/fid_train_features.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("fid_reference"),
    params:
        settings=settings_json(fid_feature_settings()),
        classes=",".join(config["classes"]),
        device=runtime_only(EVALUATE["device"]),
        batch_size=runtime_only(EVALUATE["fid"]["batch_size"]),
    shell:
        "python -m workflow_scripts.fid_reference --manifest {input.manifest:q} --classes {params.classes:q}"
        " --split train --settings {params.settings:q} --weights-record {input.weights:q}"
        " --device {params.device} --batch-size {params.batch_size} --out {output:q} > {log} 2>&1"


rule fid_reconstruction_features:
    input:
        reconstructions=reconstructions_h5(),
        manifest=f"{PREPARED}/manifest.tsv",
        weights=rules.fid_weights.output[0],
    output:
        f"{EVAL}/vae/{{vae}}/fid_features.npz",
    log:
        f"{RESULTS}/logs/eval/vae/{{vae}}/fid_reconstruction_features.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("fid_reference"),
    params:
        settings=settings_json(fid_feature_settings()),
        classes=",".join(config["classes"]),
        split=EVALUATE["real_split"],
        device=runtime_only(EVALUATE["device"]),
        batch_size=runtime_only(EVALUATE["fid"]["batch_size"]),
    shell:
        "python -m workflow_scripts.fid_reference --manifest {input.manifest:q} --classes {params.classes:q}"
        " --split {params.split} --reconstructions {input.reconstructions:q} --settings {params.settings:q}"
        " --weights-record {input.weights:q} --device {params.device} --batch-size {params.batch_size}"
        " --out {output:q} > {log} 2>&1"


rule evaluate_synthetic:
    input:
        volumes=f"{RESULTS}/synthetic/{{ldm}}/{{sample_set}}/volumes.h5",
        reference=rules.fid_reference.output[0],
        train=FID_TRAIN_FEATURES,
        reconstruction=reconstruction_fid_features,
        manifest=f"{PREPARED}/manifest.tsv",
        weights=rules.fid_weights.output[0],
    output:
        json=f"{EVAL}/synthetic/{{ldm}}/{{sample_set}}/image_metrics.json",
        csv=f"{EVAL}/synthetic/{{ldm}}/{{sample_set}}/fid.csv",
    log:
        f"{RESULTS}/logs/eval/{{ldm}}/{{sample_set}}/evaluate_synthetic.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("evaluate_synthetic"),
    params:
        settings=settings_json(
            {"fid": fid_settings(fetch=False), "msssim": EVALUATE["msssim"]}
        ),
        classes=",".join(config["classes"]),
        split=EVALUATE["real_split"],
        device=runtime_only(EVALUATE["device"]),
        batch_size=runtime_only(EVALUATE["fid"]["batch_size"]),
    shell:
        "python -m workflow_scripts.evaluate_synthetic --volumes {input.volumes:q} --reference {input.reference:q}"
        " --train-features {input.train:q} --reconstruction-features {input.reconstruction:q}"
        " --manifest {input.manifest:q} --classes {params.classes:q} --split {params.split}"
        " --settings {params.settings:q} --weights-record {input.weights:q} --device {params.device}"
        " --batch-size {params.batch_size} --out-json {output.json:q} --out-csv {output.csv:q} > {log} 2>&1"


rule evaluate_classifier_real:
    input:
        manifest=f"{PREPARED}/manifest.tsv",
    output:
        **classifier_outputs(REAL_ARM_DIR, "real"),
    log:
        f"{RESULTS}/logs/eval/classifier_real.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("evaluate_classifier"),
    params:
        settings=settings_json(EVALUATE["classifier"]),
        classes=",".join(config["classes"]),
        device=runtime_only(EVALUATE["device"]),
        saliency=saliency_arg,
    shell:
        "python -m workflow_scripts.evaluate_classifier --arms real --manifest {input.manifest:q}"
        " --classes {params.classes:q} --settings {params.settings:q} --device {params.device}"
        " --out-json {output.json:q} {params.saliency} > {log} 2>&1"


rule evaluate_classifier_reconstructions:
    input:
        reconstructions=reconstructions_h5(),
        manifest=f"{PREPARED}/manifest.tsv",
    output:
        **classifier_outputs(reconstruction_arm_dir(), "{vae} reconstructions"),
    log:
        f"{RESULTS}/logs/eval/vae/{{vae}}/evaluate_classifier.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("evaluate_classifier"),
    params:
        settings=settings_json(EVALUATE["classifier"]),
        classes=",".join(config["classes"]),
        device=runtime_only(EVALUATE["device"]),
        saliency=saliency_arg,
    shell:
        "python -m workflow_scripts.evaluate_classifier --arms reconstructions"
        " --reconstructions {input.reconstructions:q} --manifest {input.manifest:q}"
        " --classes {params.classes:q} --settings {params.settings:q} --device {params.device}"
        " --out-json {output.json:q} {params.saliency} > {log} 2>&1"


rule evaluate_classifier:
    input:
        volumes=f"{RESULTS}/synthetic/{{ldm}}/{{sample_set}}/volumes.h5",
        manifest=f"{PREPARED}/manifest.tsv",
        real_arm=rules.evaluate_classifier_real.output.json,
        reconstruction_arm=reconstruction_arm,
    output:
        **classifier_outputs(f"{EVAL}/synthetic/{{ldm}}/{{sample_set}}", "{sample_set}"),
        csv=f"{EVAL}/synthetic/{{ldm}}/{{sample_set}}/classifier.csv",
    log:
        f"{RESULTS}/logs/eval/{{ldm}}/{{sample_set}}/evaluate_classifier.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("evaluate_classifier"),
    params:
        settings=settings_json(EVALUATE["classifier"]),
        classes=",".join(config["classes"]),
        device=runtime_only(EVALUATE["device"]),
        saliency=saliency_arg,
    shell:
        "python -m workflow_scripts.evaluate_classifier --arms synthetic,real+synthetic"
        " --volumes {input.volumes:q} --trained {input.real_arm:q} {input.reconstruction_arm:q}"
        " --manifest {input.manifest:q} --classes {params.classes:q} --settings {params.settings:q}"
        " --device {params.device} --out-json {output.json:q} --out-csv {output.csv:q}"
        " {params.saliency} > {log} 2>&1"


rule evaluate_inpainting:
    input:
        volumes=f"{RESULTS}/synthetic/{{ldm}}/{{sample_set}}/volumes.h5",
        latents=lambda wc: f"{ldm_vae_dir(wc)}/latents.h5",
        vae=lambda wc: f"{ldm_vae_dir(wc)}/vae.pt",
        manifest=f"{PREPARED}/manifest.tsv",
    output:
        json=f"{EVAL}/synthetic/{{ldm}}/{{sample_set}}/inpainting.json",
        csv=f"{EVAL}/synthetic/{{ldm}}/{{sample_set}}/inpainting.csv",
    log:
        f"{RESULTS}/logs/eval/{{ldm}}/{{sample_set}}/evaluate_inpainting.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("evaluate_inpainting"),
    params:
        settings=inpainting_settings,
        device=runtime_only(EVALUATE["device"]),
    shell:
        "python -m workflow_scripts.evaluate_inpainting --volumes {input.volumes:q} --latents {input.latents:q}"
        " --vae {input.vae:q} --manifest {input.manifest:q} --settings {params.settings:q}"
        " --device {params.device} --out-json {output.json:q} --out-csv {output.csv:q} > {log} 2>&1"


rule train_segmenter:
    input:
        manifest=f"{PREPARED}/manifest.tsv",
    output:
        model=f"{SEGMENTER_DIR}/segmenter.pt",
        json=f"{SEGMENTER_DIR}/segmenter.json",
    log:
        f"{RESULTS}/logs/eval/train_segmenter.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("train_segmenter"),
    params:
        settings=settings_json({k: v for k, v in EVALUATE["segmentation"].items() if k != "contour_volumes"}),
        classes=",".join(config["classes"]),
        labels=",".join(config["labels"]),
        device=runtime_only(EVALUATE["device"]),
    shell:
        "python -m workflow_scripts.train_segmenter --manifest {input.manifest:q} --classes {params.classes:q}"
        " --labels {params.labels:q} --settings {params.settings:q} --device {params.device}"
        " --out-model {output.model:q} --out-json {output.json:q} > {log} 2>&1"


rule evaluate_segmentation:
    input:
        volumes=f"{RESULTS}/synthetic/{{ldm}}/{{sample_set}}/volumes.h5",
        segmenter=rules.train_segmenter.output.model,
        manifest=f"{PREPARED}/manifest.tsv",
    output:
        f"{EVAL}/synthetic/{{ldm}}/{{sample_set}}/segmentation.json",
    log:
        f"{RESULTS}/logs/eval/{{ldm}}/{{sample_set}}/evaluate_segmentation.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("evaluate_segmentation"),
    params:
        settings=rules.train_segmenter.params.settings,
        classes=",".join(config["classes"]),
        labels=",".join(config["labels"]),
        device=runtime_only(EVALUATE["device"]),
    shell:
        "python -m workflow_scripts.evaluate_segmentation --volumes {input.volumes:q} --segmenter {input.segmenter:q}"
        " --manifest {input.manifest:q} --classes {params.classes:q} --labels {params.labels:q}"
        " --settings {params.settings:q} --device {params.device} --out-json {output:q} > {log} 2>&1"


rule evaluate_label_maps:
    input:
        volumes=f"{RESULTS}/synthetic/{{ldm}}/{{sample_set}}/volumes.h5",
        manifest=f"{PREPARED}/manifest.tsv",
    output:
        f"{EVAL}/synthetic/{{ldm}}/{{sample_set}}/label_maps.json",
    log:
        f"{RESULTS}/logs/eval/{{ldm}}/{{sample_set}}/evaluate_label_maps.log",
    conda:
        "../envs/torch.yaml"
    params:
        classes=",".join(config["classes"]),
        split=EVALUATE["real_split"],
    shell:
        "python -m workflow_scripts.evaluate_label_maps --volumes {input.volumes:q} --manifest {input.manifest:q}"
        " --classes {params.classes:q} --split {params.split} --out {output:q} > {log} 2>&1"


rule evaluate_reconstruction:
    input:
        reconstructions=reconstructions_h5(),
        manifest=f"{PREPARED}/manifest.tsv",
    output:
        f"{EVAL}/vae/{{vae}}/reconstruction.json",
    log:
        f"{RESULTS}/logs/eval/vae/{{vae}}/evaluate_reconstruction.log",
    conda:
        "../envs/torch.yaml"
    params:
        settings=settings_json(EVALUATE["msssim"]),
        classes=",".join(config["classes"]),
        split=EVALUATE["real_split"],
    shell:
        "python -m workflow_scripts.evaluate_reconstruction --reconstructions {input.reconstructions:q}"
        " --manifest {input.manifest:q} --classes {params.classes:q} --split {params.split}"
        " --settings {params.settings:q} --out {output:q} > {log} 2>&1"


rule report:
    input:
        **report_inputs(),
    output:
        html=report(
            f"{RESULTS}/report/index.html",
            caption="../report/index.rst",
            category="Report",
        ),
        figures=report(
            directory(f"{RESULTS}/report/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Evaluation",
        ),
    log:
        f"{RESULTS}/logs/eval/report.log",
    conda:
        "../envs/torch.yaml"
    params:
        inputs=json.dumps(report_index(), sort_keys=True),
        config=settings_json(config),
        montage_volumes=EVALUATE["report"]["montage_volumes"],
    shell:
        "python -m workflow_scripts.report --inputs {params.inputs:q} --config {params.config:q}"
        " --montage-volumes {params.montage_volumes} --out {output.html:q} --figures {output.figures:q}"
        " > {log} 2>&1"
