rule trace:
    """Block-local ids -> one volume of global ids (inference resolution) + the id map."""
    input:
        trace_blocks,
    output:
        seg="results/{vol}/seg_infer.h5",
        id_map="results/{vol}/trace.json",
    log:
        "results/logs/trace/{vol}.log",
    benchmark:
        "results/benchmarks/trace/{vol}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(block_slices_of, 12),
        runtime=runtime_minutes(120),
    params:
        config=stage_params("merge", "trace"),
    shell:
        "emmito trace {output.seg} {output.id_map} {input} --params {params.config} > {log} 2>&1"
