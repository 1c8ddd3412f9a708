# Memory of a suggest job: one slab of 8 slices at the heat's resolution at a time (heat
# channels, labels, their int16/int64 working copies: about 24 bytes a voxel), and small
# per-object sums.


rule suggest:
    """suggestions.csv: what to proofread or label first, each row with a neuroglancer view state."""
    input:
        traced=R.traced(),
        seg=R.seg(),
        objects=R.objects(),
        trace=R.id_map(),
        heat=suggest_heat_blocks,
    output:
        R.suggestions(),
    log:
        R.log("suggest", "{vol}"),
    benchmark:
        R.benchmark("suggest", "{vol}")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(eight_slices, 24),
        runtime=runtime_minutes(60),
    params:
        config=stage_params("suggest"),
    shell:
        "emmito suggest {output} --traced {input.traced} --seg {input.seg} --objects {input.objects}"
        " --trace {input.trace} --heat {input.heat} --params {params.config}"
        ' --runtime "$EMMITO_RUNTIME_SUGGEST" > {log} 2>&1'
