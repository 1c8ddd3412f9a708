rule upsample:
    """Traced labels -> full image resolution (nearest) + a mode-downsampled pyramid for viewing."""
    input:
        traced="results/{vol}/seg_infer.h5",
        image="results/{vol}/image.h5",
    output:
        "results/{vol}/seg.h5",
    log:
        "results/logs/upsample/{vol}.log",
    benchmark:
        "results/benchmarks/upsample/{vol}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(block_slices_of, 40),
        runtime=runtime_minutes(120),
    params:
        config=stage_params("upsample"),
    shell:
        "emmito upsample {input.traced} {input.image} {output} --params {params.config} > {log} 2>&1"
