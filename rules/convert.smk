rule convert:
    """Images (PNG/TIFF slices, a TIFF stack, HDF5, zarr or N5) -> results/{vol}/image.h5 (uint8, z y x)."""
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
        mem_mb=convert_mem_mb("images", 1000),
        runtime=runtime_minutes(60),
    params:
        images=images_arg,
        voxel_size=voxel_size_arg,
        config=convert_params,
        output_version=OUTPUT_VERSIONS["convert"],
    shell:
        "emmito convert --images {params.images} --voxel-size {params.voxel_size}"
        " --image-out {output} --params {params.config}"
        ' --runtime "$EMMITO_RUNTIME_CONVERT" > {log} 2>&1'


rule convert_labels:
    """Labels (PNG/TIFF slices, a TIFF stack, HDF5, zarr or N5) -> results/{vol}/label.h5 (uint32 instance ids, z y x)."""
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
        mem_mb=convert_mem_mb("labels", 2000),
        runtime=runtime_minutes(60),
    params:
        images=images_arg,
        labels=labels_arg,
        voxel_size=voxel_size_arg,
        output_version=OUTPUT_VERSIONS["convert"],
    shell:
        # no convert section: how grey values map to uint8 does not change the labels
        "emmito convert --images {params.images} {params.labels} --voxel-size {params.voxel_size}"
        " --label-out {output}"
        ' --runtime "$EMMITO_RUNTIME_CONVERT" > {log} 2>&1'
