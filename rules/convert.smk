rule convert:
    """PNG slices -> results/{vol}/image.h5 (uint8, z y x)."""
    input:
        convert_images,
    output:
        R.image(),
    log:
        R.log("convert", "{vol}"),
    benchmark:
        R.benchmark("convert", "{vol}")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(one_slice, 32),
        runtime=runtime_minutes(60),
    params:
        images=images_arg,
        voxel_size=voxel_size_arg,
        output_version=OUTPUT_VERSIONS["convert"],
    shell:
        "emmito convert --images {params.images} --voxel-size {params.voxel_size}"
        " --image-out {output} > {log} 2>&1"


rule convert_labels:
    """Label PNG slices -> results/{vol}/label.h5 (uint32 instance ids, z y x)."""
    input:
        convert_labels,
    output:
        R.label(),
    log:
        R.log("convert_labels", "{vol}"),
    benchmark:
        R.benchmark("convert_labels", "{vol}")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=mem_mb(one_slice, 64, base_mb=2000),
        runtime=runtime_minutes(60),
    params:
        images=images_arg,
        labels=labels_arg,
        voxel_size=voxel_size_arg,
        output_version=OUTPUT_VERSIONS["convert"],
    shell:
        "emmito convert --images {params.images} {params.labels} --voxel-size {params.voxel_size}"
        " --label-out {output} > {log} 2>&1"
