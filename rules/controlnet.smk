# ControlNet (medldm/diffusion/controlnet.py): one per `controlnet` config entry, trained on its
# frozen base ldm and the latents (with label maps or masks) that base learned from. The base
# ldm.pt is an input only; controlnet.pt records its sha256. The run directory (checkpoints,
# metrics.csv) is not an output, so a failed or time-limited job resumes.


rule train_controlnet:
    input:
        ldm=lambda wc: f"{RESULTS}/ldm/{controlnet_entry(wc.controlnet)['ldm']}/ldm.pt",
        latents=controlnet_latents,
    output:
        f"{RESULTS}/controlnet/{{controlnet}}/controlnet.pt",
    log:
        f"{RESULTS}/logs/controlnet/{{controlnet}}/train_controlnet.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    priority: 1  # the training chain before side jobs (FID features, classifiers, segmenter)
    resources:
        **rule_resources("train_controlnet"),
    wildcard_constraints:
        controlnet="[A-Za-z0-9][A-Za-z0-9._-]*",
    params:
        settings=lambda wc: trainer_settings(controlnet_entry(wc.controlnet)),
        cadence=runtime_only(lambda wc: trainer_cadence(controlnet_entry(wc.controlnet))),
        run_dir=lambda wc: f"{RESULTS}/runs/controlnet/{wc.controlnet}",
        python=python_launcher,
    shell:
        "{params.python} -m workflow_scripts.train_controlnet --settings {params.settings:q}"
        " --cadence {params.cadence:q} --ldm {input.ldm:q} --latents {input.latents:q}"
        " --run-dir {params.run_dir:q} --out {output:q} > {log} 2>&1"
