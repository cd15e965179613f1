# Named sample sets: results/synthetic/<ldm>/<set>/latents.h5 (unscaled latents, ready to decode).
# A set's job depends only on its own settings and the trained models, so adding a set to the
# config never reruns training.


rule sample:
    input:
        ldm=f"{RESULTS}/ldm/{{ldm}}/ldm.pt",
        vae=lambda wc: f"{ldm_vae_dir(wc)}/vae.pt",
    output:
        f"{RESULTS}/synthetic/{{ldm}}/{{sample_set}}/latents.h5",
    log:
        f"{RESULTS}/logs/synthetic/{{ldm}}/{{sample_set}}/sample.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("sample"),
    params:
        settings=sample_set_json,
    shell:
        "python -m workflow_scripts.sample --ldm {input.ldm:q} --vae {input.vae:q}"
        " --settings {params.settings:q} --name {wildcards.sample_set} --out {output:q} > {log} 2>&1"


rule synthetic:
    input:
        [f"{sample_set_dirs(name)[0]}/volumes.h5" for name in config["sample_sets"]],
