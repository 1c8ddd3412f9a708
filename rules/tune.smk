# Only where there are labelled volumes to tune on (TUNE_VOLUMES, rules/common.smk).
if TUNE_VOLUMES:

    rule tune:
        """Choose the decoder's thresholds for the model on the labelled volumes; decoder.json beside the checkpoint (GPU rule; runs on CPU where there is none)."""
        input:
            unpack(tune_inputs),
        output:
            R.decoder_settings(MODEL),
        log:
            R.log("tune", MODEL),
        benchmark:
            R.benchmark("tune", MODEL)
        conda:
            CONDA_ENV
        threads: 2
        resources:
            gpu=1,
            mem_mb=tune_mem_mb,
            runtime=runtime_minutes(120),
        params:
            volumes=tune_args,
            support=tune_support_arg,
            config=stage_params(
                "tune", segment={"support_set": SUPPORT_SET} if NEEDS_SUPPORT else {}
            ),
        shell:
            "emmito tune {input.checkpoint} {output} {params.volumes} {params.support}"
            ' --params {params.config} --runtime "$EMMITO_RUNTIME_TUNE" > {log} 2>&1'
