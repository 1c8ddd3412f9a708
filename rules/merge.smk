rule merge:
    """The chunks of block {block} (plus the overlap into the next block) -> one heatmap block."""
    input:
        merge_chunks,
    output:
        "results/{vol}/heat/block_{block}.h5",
    log:
        "results/logs/merge/{vol}/block_{block}.log",
    benchmark:
        "results/benchmarks/merge/{vol}/block_{block}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(chunk_slices_of, 4),
        runtime=runtime_minutes(30),
    params:
        config=stage_params("infer", "merge"),
    shell:
        "emmito merge {output} {input} --block {wildcards.block} --params {params.config} > {log} 2>&1"
