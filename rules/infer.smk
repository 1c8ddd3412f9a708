rule infer:
    """Heatmap of chunk {chunk}: its slices only, computed with a z-halo (GPU rule)."""
    input:
        image=R.image(),
        checkpoint=CHECKPOINT,
    output:
        R.heat_chunk(),
    log:
        R.log("infer", "{vol}/chunk_{chunk}"),
    benchmark:
        R.benchmark("infer", "{vol}/chunk_{chunk}")
    conda:
        CONDA_ENV
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb(chunk_slices_of, 24, base_mb=2000),
        runtime=runtime_minutes(120),
    params:
        config=stage_params("infer"),
    shell:
        "emmito infer {input.image} {input.checkpoint} {output} --chunk {wildcards.chunk}"
        ' --params {params.config} --runtime "$EMMITO_RUNTIME_INFER" > {log} 2>&1'
