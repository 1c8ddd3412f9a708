rule segment:
    """Instance segmentation of heatmap block {block}; ids are local to the block."""
    input:
        unpack(segment_inputs),
    output:
        R.seg_block(),
    log:
        R.log("segment", "{vol}/block_{block}"),
    benchmark:
        R.benchmark("segment", "{vol}/block_{block}")
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=mem_mb(block_slices_of, 24),
        runtime=runtime_minutes(120),
    params:
        settings=decoder_settings_arg,
        config=stage_params(
            "segment", segment={"support_set": SUPPORT_SET} if NEEDS_SUPPORT else {}
        ),
    shell:
        "emmito segment {input.heat} {output} {params.settings} --params {params.config}"
        ' --runtime "$EMMITO_RUNTIME_SEGMENT" > {log} 2>&1'
