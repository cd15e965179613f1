# Decoding latents back to images on the prepared grid: volumes.h5 (for evaluation) and one
# NIfTI folder per volume. Every latents.h5 holds unscaled latents, so decoding never rescales.
# An inpaint set's volumes get their sources' prepared voxels pasted back outside the masks.


rule decode_reconstructions:
    input:
        model=f"{RESULTS}/vae/{{vae}}/vae.pt",
        latents=f"{RESULTS}/vae/{{vae}}/latents.h5",
    output:
        volumes=reconstructions_h5(),
        nifti=directory(f"{RESULTS}/vae/{{vae}}/reconstructions/nifti"),
    log:
        f"{RESULTS}/logs/vae/{{vae}}/decode_reconstructions.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("decode_reconstructions"),
    params:
        settings=lambda wc: settings_json(config["vae"][wc.vae]["inference"]),
    shell:
        "python -m workflow_scripts.decode --vae {input.model:q} --latents {input.latents:q}"
        " --settings {params.settings:q} --out {output.volumes:q} --nifti-dir {output.nifti:q} > {log} 2>&1"


rule decode_synthetic:
    input:
        unpack(decode_synthetic_inputs),
    output:
        volumes=f"{RESULTS}/synthetic/{{ldm}}/{{sample_set}}/volumes.h5",
        nifti=directory(f"{RESULTS}/synthetic/{{ldm}}/{{sample_set}}/nifti"),
    log:
        f"{RESULTS}/logs/synthetic/{{ldm}}/{{sample_set}}/decode.log",
    conda:
        "../envs/torch.yaml"
    threads: 4
    resources:
        **rule_resources("decode_synthetic"),
    params:
        settings=decode_synthetic_settings,
        paste_back=paste_back_args,
    shell:
        "python -m workflow_scripts.decode --vae {input.model:q} --latents {input.latents:q} {params.paste_back}"
        " --settings {params.settings:q} --out {output.volumes:q} --nifti-dir {output.nifti:q} > {log} 2>&1"
