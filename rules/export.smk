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
    """seg.h5 + image.h5 -> neuroglancer precomputed volumes (multiscale) for emmito view."""
    input:
        seg=R.seg(),
        image=R.image(),
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
        "emmito export {input.seg} {input.image} {output} --params {params.config}"
        ' --runtime "$EMMITO_RUNTIME_EXPORT" > {log} 2>&1'
