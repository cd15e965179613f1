# Named sample sets: results/synthetic/<ldm>/<set>/latents.h5 (unscaled latents, ready to decode).
# A set's job depends only on its own settings and the trained models, so adding a set to the
# config never reruns training. An inpaint set also reads its autoencoder's latents (the real rows
# and their masks).


rule sample:
    input:
        unpack(sample_set_inputs),
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
        real=real_latents_arg,
    shell:
        "python -m workflow_scripts.sample --ldm {input.ldm:q} --vae {input.vae:q} {params.real}"
        " --settings {params.settings:q} --name {wildcards.sample_set} --out {output:q} > {log} 2>&1"


rule synthetic:
    input:
        [f"{sample_set_dirs(name)[0]}/volumes.h5" for name in config["sample_sets"]],
