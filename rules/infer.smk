rule infer:
    """Heatmap of chunk {chunk}: its slices only, computed with a z-halo (GPU rule)."""
    input:
        image="results/{vol}/image.h5",
        checkpoint=f"{MODEL_DIR}/checkpoint.pt",
    output:
        "results/{vol}/heat/chunk_{chunk}.h5",
    log:
        "results/logs/infer/{vol}/chunk_{chunk}.log",
    benchmark:
        "results/benchmarks/infer/{vol}/chunk_{chunk}.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        gpu=1,
        mem_mb=mem_mb(chunk_slices_of, 24, base_mb=2000),
        runtime=runtime_minutes(120),
    params:
        config=stage_params("model", "infer"),
    shell:
        "emmito infer {input.image} {input.checkpoint} {output} --chunk {wildcards.chunk}"
        " --params {params.config} > {log} 2>&1"
