rule upsample:
    """Traced labels -> seg.h5: full image resolution (nearest) + a mode pyramid, gzip (no filter plugin needed)."""
    input:
        traced=R.traced(),
        image=R.image(),
    output:
        R.seg(),
    log:
        R.log("upsample", "{vol}"),
    benchmark:
        R.benchmark("upsample", "{vol}")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(block_slices_of, 40),
        runtime=runtime_minutes(120),
    params:
        config=stage_params("upsample"),
    shell:
        "emmito upsample {input.traced} {input.image} {output} --params {params.config}"
        ' --runtime "$EMMITO_RUNTIME_UPSAMPLE" > {log} 2>&1'
