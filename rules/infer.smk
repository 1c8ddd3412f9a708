rule infer:
    """Heatmaps of the chunks of job {job}, one file each: their slices only, the windows run once (GPU rule)."""
    input:
        image=R.image(),
        checkpoint=CHECKPOINT,
    output:
        directory(R.heat_job()),
    log:
        R.log("infer", "{vol}/job_{job}"),
    benchmark:
        R.benchmark("infer", "{vol}/job_{job}")
    conda:
        CONDA_ENV
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb(
            job_slices_of, 24, base_mb=2000 + config["infer"]["tile_memory_mb"]
        ),
        runtime=runtime_minutes(120 * CHUNKS_PER_JOB),
    params:
        chunks=job_chunks,
        config=stage_params("infer"),
    shell:
        "emmito infer {input.image} {input.checkpoint} {output} --chunks {params.chunks}"
        ' --params {params.config} --runtime "$EMMITO_RUNTIME_INFER" > {log} 2>&1'
