rule trace:
    """Block-local ids -> one volume of global ids (inference resolution) + the id map."""
    input:
        trace_blocks,
    output:
        seg=R.traced(),
        id_map=R.id_map(),
    log:
        R.log("trace", "{vol}"),
    benchmark:
        R.benchmark("trace", "{vol}")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(block_slices_of, 12),
        runtime=runtime_minutes(120),
    params:
        config=stage_params("trace"),
    shell:
        "emmito trace {output.seg} {output.id_map} {input} --params {params.config}"
        ' --runtime "$EMMITO_RUNTIME_TRACE" > {log} 2>&1'
