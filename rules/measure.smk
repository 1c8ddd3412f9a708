# Memory of a measure job: 8 slices of seg.h5 at a time while counting (the labels and two
# copies, 4 bytes a voxel each), then one object's bounding box at a time (about 20 bytes a
# voxel of it: mask, smoothed copy, distance field, skeleton labels) and a 256 MB chunk cache.


rule measure:
    """objects.csv (one row per object: volume, surface, length, ...) and its meshes, from seg.h5."""
    input:
        R.seg(),
    output:
        objects=R.objects(),
        meshes=directory(R.meshes()),
    log:
        R.log("measure", "{vol}"),
    benchmark:
        R.benchmark("measure", "{vol}")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        # slice_voxels is at inference resolution: seg.h5 has downsample_xy^2 times more.
        mem_mb=mem_mb(
            eight_slices, 12 * config["model"]["downsample_xy"] ** 2, base_mb=3000
        ),
        runtime=runtime_minutes(120),
    params:
        config=stage_params("measure"),
        block_slices=config["merge"]["block_slices"],
    shell:
        "emmito measure {input} {output.objects} --meshes {output.meshes}"
        " --block-slices {params.block_slices} --params {params.config}"
        ' --runtime "$EMMITO_RUNTIME_MEASURE" > {log} 2>&1'
