# emmito: EM slices -> 3D instance segmentation of mitochondria.
# Run: snakemake --cores 2 (laptop) or snakemake --profile profiles/slurm (cluster).


from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/convert.smk"
include: "rules/train.smk"
include: "rules/tune.smk"
include: "rules/infer.smk"
include: "rules/merge.smk"
include: "rules/segment.smk"
include: "rules/trace.smk"
include: "rules/upsample.smk"
include: "rules/evaluate.smk"
include: "rules/measure.smk"
include: "rules/suggest.smk"
include: "rules/export.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
