# Latent diffusion: one model per `ldm` config entry, trained on its autoencoder's latents.
# The run directory (checkpoints, metrics.csv, tensorboard) is not an output, so a failed or
# time-limited job keeps it and the rerun resumes. vae.pt is an input for its sha256 and to decode
# the live samples (train.sample_every).


rule train_ldm:
    input:
        latents=lambda wc: f"{ldm_vae_dir(wc)}/latents.h5",
        vae=lambda wc: f"{ldm_vae_dir(wc)}/vae.pt",
        init=ldm_init_input,
    output:
        f"{RESULTS}/ldm/{{ldm}}/ldm.pt",
    log:
        f"{RESULTS}/logs/ldm/{{ldm}}/train_ldm.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    priority: 1  # the training chain before side jobs (FID features, classifiers, segmenter)
    resources:
        **rule_resources("train_ldm"),
    params:
        settings=lambda wc: trainer_settings(ldm_entry(wc.ldm)),
        cadence=runtime_only(lambda wc: trainer_cadence(ldm_entry(wc.ldm))),
        decoding=runtime_only(lambda wc: settings_json(config["vae"][ldm_entry(wc.ldm)["vae"]]["inference"])),
        run_dir=lambda wc: f"{RESULTS}/runs/ldm/{wc.ldm}",
        init=ldm_init_arg,
        python=python_launcher,
    shell:
        "{params.python} -m workflow_scripts.train_ldm --settings {params.settings:q}"
        " --cadence {params.cadence:q}"
        " --latents {input.latents:q} --vae {input.vae:q} {params.init} --decoding {params.decoding:q} --run-dir {params.run_dir:q}"
        " --out {output:q} > {log} 2>&1"
