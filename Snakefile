# medldm: latent-diffusion synthesis of 3D medical images.
# `snakemake --cores 2` runs the demo; see README.md and config/schemas/config.schema.yaml.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/prepare.smk"
include: "rules/vae.smk"
include: "rules/ldm.smk"
include: "rules/controlnet.smk"
include: "rules/sample.smk"
include: "rules/decode.smk"
include: "rules/evaluate.smk"


rule all:
    default_target: True
    input:
        rules.prepared.input,
        rules.autoencoders.input,
        rules.synthetic.input,
        rules.report.output.html,
