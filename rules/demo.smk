# The embedded demo cohort (config demo.enabled): deformed MNI152 subjects, HC and TLE-like.


rule demo_cohort:
    output:
        sheet=f"{RESULTS}/demo/samples.tsv",
        images=expand(f"{RESULTS}/demo/images/{{subject}}.nii.gz", subject=SUBJECTS),
        labels=expand(f"{RESULTS}/demo/labels/{{subject}}.nii.gz", subject=SUBJECTS),
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
    shell:
        "python -m workflow_scripts.demo_cohort --out-dir {params.out_dir} --n-subjects {params.n}"
        " --seed {params.seed} --lesion-class {params.lesion} --resolution-mm {params.resolution}"
        " > {log} 2>&1"
