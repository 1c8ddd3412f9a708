# Plots for `snakemake --report report.html`: training curves, scores, overlays, object sizes.


report: "../report/workflow.rst"


rule report_training:
    """Loss, learning rate and validation IoU of the training run."""
    input:
        f"{MODEL_DIR}/metrics.jsonl",
    output:
        report(
            f"{MODEL_DIR}/report/training.png",
            caption="../report/training.rst",
            category="Training",
        ),
    log:
        f"{MODEL_DIR}/report/training.log",
    benchmark:
        f"{MODEL_DIR}/report/training.benchmark.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(no_slices, 0, base_mb=1000),
        runtime=runtime_minutes(10),
    shell:
        "emmito report --training {input} {output} > {log} 2>&1"


rule report_scores:
    """Precision, recall, F1 against IoU threshold, and metrics.json as a table."""
    input:
        "results/{vol}/metrics.json",
    output:
        plot=report(
            "results/{vol}/report/scores.png",
            caption="../report/scores.rst",
            category="Evaluation",
            subcategory="{vol}",
        ),
        table=report(
            "results/{vol}/report/metrics.html",
            caption="../report/metrics.rst",
            category="Evaluation",
            subcategory="{vol}",
        ),
    log:
        "results/logs/report/{vol}.scores.log",
    benchmark:
        "results/benchmarks/report/{vol}.scores.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(no_slices, 0, base_mb=1000),
        runtime=runtime_minutes(10),
    shell:
        "emmito report --scores {input} {output.plot} {output.table} > {log} 2>&1"


rule report_volume:
    """EM slices with the segmentation overlaid, and the object size histogram."""
    input:
        seg="results/{vol}/seg.h5",
        image="results/{vol}/image.h5",
        id_map="results/{vol}/trace.json",
    output:
        overlays=report(
            "results/{vol}/report/overlays.png",
            caption="../report/overlays.rst",
            category="Segmentation",
            subcategory="{vol}",
        ),
        sizes=report(
            "results/{vol}/report/sizes.png",
            caption="../report/sizes.rst",
            category="Segmentation",
            subcategory="{vol}",
        ),
    log:
        "results/logs/report/{vol}.volume.log",
    benchmark:
        "results/benchmarks/report/{vol}.volume.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(one_slice, 40, base_mb=1000),
        runtime=runtime_minutes(10),
    shell:
        "emmito report --volume {input.seg} {input.image} {input.id_map} {output.overlays} {output.sizes}"
        " > {log} 2>&1"
