rule evaluate:
    """Voxel and instance metrics of the final segmentation against the ground-truth labels."""
    input:
        unpack(evaluate_inputs),
    output:
        R.metrics(),
    log:
        R.log("evaluate", "{vol}"),
    benchmark:
        R.benchmark("evaluate", "{vol}")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(block_slices_of, 40),
        runtime=runtime_minutes(60),
    params:
        config=stage_params("evaluate"),
    shell:
        "emmito evaluate {input.seg} {input.label} {output} --params {params.config}"
        ' --runtime "$EMMITO_RUNTIME_EVALUATE" > {log} 2>&1'
