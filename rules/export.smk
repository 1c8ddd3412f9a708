# Memory of an export job: one shard (or brick of chunks) at a time, ~30 bytes per voxel of it
# (labels, their transposed copy, the finer scale it is computed from, tensorstore's buffers).
EXPORT_MEM_MB = 1000 + int(
    config["export"]["shard_chunks"]
    * config["export"]["chunk_size"][0]
    * config["export"]["chunk_size"][1]
    * config["export"]["chunk_size"][2]
    * 30
    / 2**20
)


rule export:
    """seg.h5 + image.h5 + objects.csv + meshes -> neuroglancer precomputed volumes (multiscale) for emmito view."""
    input:
        seg=R.seg(),
        image=R.image(),
        objects=R.objects(),
        meshes=R.meshes(),
    output:
        directory(R.neuroglancer()),
    log:
        R.log("export", "{vol}"),
    benchmark:
        R.benchmark("export", "{vol}")
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=mem_mb(no_slices, 0, base_mb=EXPORT_MEM_MB),
        runtime=runtime_minutes(120),
    params:
        config=stage_params("export"),
    shell:
        "emmito export {input.seg} {input.image} {output} --objects {input.objects}"
        " --meshes {input.meshes} --params {params.config}"
        ' --runtime "$EMMITO_RUNTIME_EXPORT" > {log} 2>&1'


rule ome_zarr:
    """seg.h5 + image.h5 -> seg.ome.zarr: OME-NGFF image, the segmentation under labels/ (napari, Fiji)."""
    input:
        seg=R.seg(),
        image=R.image(),
    output:
        directory(R.ome_zarr()),
    log:
        R.log("export", "{vol}.ome_zarr"),
    benchmark:
        R.benchmark("export", "{vol}.ome_zarr")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        # a slab of image (1 byte) and labels (4), their coarser levels and the encoded chunks
        mem_mb=mem_mb(eight_slices, 16),
        runtime=runtime_minutes(120),
    params:
        output_version=OUTPUT_VERSIONS["export"],
    shell:
        "emmito export --ome-zarr {input.seg} {input.image} {output}"
        ' --runtime "$EMMITO_RUNTIME_EXPORT" > {log} 2>&1'


rule tiff:
    """seg.h5 -> seg.tif, the labels as a TIFF stack for Fiji (config export.tiff)."""
    input:
        R.seg(),
    output:
        R.seg_tiff(),
    log:
        R.log("export", "{vol}.tiff"),
    benchmark:
        R.benchmark("export", "{vol}.tiff")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        # a slab of uint32 labels and its uint16/uint32 copy
        mem_mb=mem_mb(eight_slices, 8),
        runtime=runtime_minutes(120),
    params:
        output_version=OUTPUT_VERSIONS["export"],
    shell:
        "emmito export --tiff {input} {output}"
        ' --runtime "$EMMITO_RUNTIME_EXPORT" > {log} 2>&1'
