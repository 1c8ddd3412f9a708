# Plots for `snakemake --report report.html`: training curves, scores, overlays, object sizes,
# object volume and length (objects.csv).


report: "../report/workflow.rst"


rule report_training:
    """Loss, learning rate and validation IoU of the training run."""
    input:
        R.training_log(MODEL),
    output:
        report(
            R.model_report(MODEL),
            caption="../report/training.rst",
            category="Training",
        ),
    log:
        R.model_report(MODEL, "training.log"),
    benchmark:
        R.model_report(MODEL, "training.benchmark.tsv")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(no_slices, 0, base_mb=1000),
        runtime=runtime_minutes(10),
    params:
        output_version=OUTPUT_VERSIONS["report"],
    shell:
        "emmito report --training {input} {output} > {log} 2>&1"


rule report_scores:
    """Precision, recall, F1 against IoU threshold, and metrics.json as a table."""
    input:
        R.metrics(),
    output:
        plot=report(
            R.report(name="scores.png"),
            caption="../report/scores.rst",
            category="Evaluation",
            subcategory="{vol}",
        ),
        table=report(
            R.report(name="metrics.html"),
            caption="../report/metrics.rst",
            category="Evaluation",
            subcategory="{vol}",
        ),
    log:
        R.log("report", "{vol}.scores"),
    benchmark:
        R.benchmark("report", "{vol}.scores")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(no_slices, 0, base_mb=1000),
        runtime=runtime_minutes(10),
    params:
        output_version=OUTPUT_VERSIONS["report"],
    shell:
        "emmito report --scores {input} {output.plot} {output.table} > {log} 2>&1"


rule report_volume:
    """EM slices with the segmentation overlaid, and the object size histogram."""
    input:
        seg=R.seg(),
        image=R.image(),
        id_map=R.id_map(),
    output:
        overlays=report(
            R.report(name="overlays.png"),
            caption="../report/overlays.rst",
            category="Segmentation",
            subcategory="{vol}",
        ),
        sizes=report(
            R.report(name="sizes.png"),
            caption="../report/sizes.rst",
            category="Segmentation",
            subcategory="{vol}",
        ),
    log:
        R.log("report", "{vol}.volume"),
    benchmark:
        R.benchmark("report", "{vol}.volume")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(one_slice, 40, base_mb=1000),
        runtime=runtime_minutes(10),
    params:
        output_version=OUTPUT_VERSIONS["report"],
    shell:
        "emmito report --volume {input.seg} {input.image} {input.id_map} {output.overlays} {output.sizes}"
        " > {log} 2>&1"


rule report_objects:
    """Distributions of object volume and skeleton length (objects.csv)."""
    input:
        R.objects(),
    output:
        report(
            R.report(name="objects.png"),
            caption="../report/objects.rst",
            category="Segmentation",
            subcategory="{vol}",
        ),
    log:
        R.log("report", "{vol}.objects"),
    benchmark:
        R.benchmark("report", "{vol}.objects")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(no_slices, 0, base_mb=1000),
        runtime=runtime_minutes(10),
    params:
        output_version=OUTPUT_VERSIONS["report"],
    shell:
        "emmito report --objects {input} {output} > {log} 2>&1"


# Only where segment reads tuned settings (DECODER_SETTINGS, rules/common.smk).
if DECODER_SETTINGS:

    rule report_decoder:
        """The decoder settings tuned for the model (decoder.json) as a table: chosen values, scores, volumes."""
        input:
            DECODER_SETTINGS,
        output:
            report(
                R.model_report(MODEL, "decoder.html"),
                caption="../report/decoder.rst",
                category="Training",
            ),
        log:
            R.model_report(MODEL, "decoder.log"),
        benchmark:
            R.model_report(MODEL, "decoder.benchmark.tsv")
        conda:
            CONDA_ENV
        threads: 1
        resources:
            mem_mb=mem_mb(no_slices, 0, base_mb=1000),
            runtime=runtime_minutes(10),
        params:
            output_version=OUTPUT_VERSIONS["report"],
        shell:
            "emmito report --decoder {input} {output} > {log} 2>&1"
