# Only where the workflow trains its model (model.checkpoint empty: TRAINS, rules/common.smk).
if TRAINS:
    # train.devices: the GPUs the job reserves (resource gpu) and trains on, one process each
    # (emmito train starts them). auto cannot be known here, on a login node or before the job
    # lands on one, so the workflow needs a number.
    TRAIN_DEVICES = config["train"]["devices"]
    if TRAIN_DEVICES == "auto":
        raise WorkflowError(
            "train.devices auto: the train job must reserve its GPUs before it starts, so the workflow "
            "needs a number: set train.devices to the GPUs to train on (auto is for emmito train run by hand)"
        )
    if config["train"]["batch_size"] % TRAIN_DEVICES:
        raise WorkflowError(
            f"train.batch_size {config['train']['batch_size']} does not split over train.devices "
            f"{TRAIN_DEVICES}: make the batch size a multiple of the device count"
        )

    rule train:
        """Train the U-Net on the labelled volumes (GPU rule: train.devices GPUs; runs on CPU where there is none); an embedding head also writes its support set."""
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
            gpu=TRAIN_DEVICES,
            mem_mb=mem_mb(no_slices, 0, base_mb=8000),
            runtime=runtime_minutes(24 * 60),
        params:
            volumes=train_args,
            support=support_arg,
            config=stage_params("train"),
        shell:
            "emmito train {params.volumes} --checkpoint {output.checkpoint} --metrics {output.metrics}"
            ' {params.support} --params {params.config} --runtime "$EMMITO_RUNTIME_TRAIN" > {log} 2>&1'
