# The embedded demo cohort (config demo.enabled): deformed MNI152 subjects, HC and TLE-like.


rule demo_cohort:
    output:
        sheet=f"{RESULTS}/demo/samples.tsv",
        images=SAMPLES["image"].unique().tolist(),
        labels=SAMPLES["label"].unique().tolist() if HAS_LABELS else [],
        masks=SAMPLES["mask"].tolist() if HAS_MASKS else [],
    log:
        f"{RESULTS}/logs/demo_cohort.log",
    conda:
        "../envs/cpu.yaml"
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.sheet),
        n=config["demo"]["n_subjects"],
        seed=config["demo"]["seed"],
        lesion=config["demo"]["lesion_class"],
        resolution=config["demo"]["resolution_mm"],
        mask_args=demo_mask_args,
        **DEMO_MASK_PARAMS,
    shell:
        "python -m workflow_scripts.demo_cohort --out-dir {params.out_dir} --n-subjects {params.n}"
        " --seed {params.seed} --lesion-class {params.lesion} --resolution-mm {params.resolution}"
        " {params.mask_args} > {log} 2>&1"
