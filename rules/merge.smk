rule merge:
    """The chunks of block {block} (plus the overlap into the next block) -> one heatmap block."""
    input:
        merge_jobs,
    output:
        R.heat_block(),
    log:
        R.log("merge", "{vol}/block_{block}"),
    benchmark:
        R.benchmark("merge", "{vol}/block_{block}")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(chunk_slices_of, 4),
        runtime=runtime_minutes(30),
    params:
        chunks=merge_chunk_files,
        config=stage_params("merge"),
    shell:
        "emmito merge {output} {params.chunks} --block {wildcards.block} --params {params.config}"
        ' --runtime "$EMMITO_RUNTIME_MERGE" > {log} 2>&1'
