# Only where the workflow trains its model (model.checkpoint empty: TRAINS, rules/common.smk).
if TRAINS:

    rule train:
        """Train the U-Net on the labelled volumes (GPU rule; runs on CPU where there is none); an embedding head also writes its support set."""
        input:
            train_inputs,
        output:
            **train_outputs(),
        log:
            R.train_log(MODEL),
        benchmark:
            R.train_benchmark(MODEL)
        conda:
            CONDA_ENV
        threads: 2
        resources:
            gpu=1,
            mem_mb=mem_mb(no_slices, 0, base_mb=8000),
            runtime=runtime_minutes(24 * 60),
        params:
            volumes=train_args,
            support=support_arg,
            config=stage_params("train"),
        shell:
            "emmito train {params.volumes} --checkpoint {output.checkpoint} --metrics {output.metrics}"
            ' {params.support} --params {params.config} --runtime "$EMMITO_RUNTIME_TRAIN" > {log} 2>&1'
