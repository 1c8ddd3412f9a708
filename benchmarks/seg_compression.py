"""seg.h5's compression: Blosc-LZ4 (needs a filter plugin) against gzip 1, gzip 4 and none (any HDF5 reader).

seg.h5 is the final product that labs open in Fiji, MATLAB or plain h5py, so it
should not need hdf5plugin; the question is what that costs the upsample stage.
On one realistic label volume (``emmito.synth`` mitochondria, traced at
inference resolution and upsampled 2x in y and x, as the workflow does) it
measures, side by side in one run, for each filter:

- writing the full-resolution labels to an HDF5 dataset (io.default_chunks, a
  slab of 8 slices at a time): MVx/s and the file's size;
- reading them back: MVx/s;
- the upsample stage itself (``upsample_files``: nearest upsampling, the mode
  pyramid s1, s2 and the writes): seconds and MVx/s of full-resolution output;

and prints each against Blosc-LZ4 (time and size ratios). The last line is
``upsample_slowdown_gzip1: X`` (the stage's time with gzip 1 over Blosc-LZ4's).

Run: .venv/bin/python benchmarks/seg_compression.py [--slices 128] [--size 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (the Blosc filter)
import numpy as np

from emmito import contract
from emmito.io import compression, default_chunks, plain_compression
from emmito.resampling import mode_pool_xy
from emmito.synth import synthesize
from emmito.upsample import upsample_files

FILTERS = {
    "blosc-lz4": compression(),
    "gzip1": plain_compression(),
    "gzip4": {**plain_compression(), "compression_opts": 4},
    "none": {},
}
SLAB = 8


def write_labels(path: Path, labels: np.ndarray, filters: dict) -> float:
    """Seconds to write ``labels`` a slab at a time into a new file's dataset."""
    start = time.perf_counter()
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(
            contract.DATASET, shape=labels.shape, dtype=labels.dtype, chunks=default_chunks(labels.shape),
            track_times=False, fillvalue=0, **filters,
        )
        for z in range(0, labels.shape[0], SLAB):
            ds[z : z + SLAB] = labels[z : z + SLAB]
    return time.perf_counter() - start


def read_labels(path: Path, labels: np.ndarray) -> float:
    start = time.perf_counter()
    with h5py.File(path, "r") as f:
        ds = f[contract.DATASET]
        for z in range(0, ds.shape[0], SLAB):
            assert np.array_equal(ds[z : z + SLAB], labels[z : z + SLAB])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--size", type=int, default=1024, help="full-resolution y and x (the traced volume is half)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per measurement")
    args = parser.parse_args()

    t0 = time.perf_counter()
    _, traced = synthesize(args.slices, args.size // 2, seed=0, object_scale=2.0)
    full = np.repeat(np.repeat(traced, 2, axis=1), 2, axis=2)
    mvx = full.size / 1e6
    print(f"labels: traced {traced.shape} -> full {full.shape} = {mvx:.0f} MVx uint32, {int(traced.max())} objects, "
          f"{(full > 0).mean():.1%} foreground (made in {time.perf_counter() - t0:.0f} s)")
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, pyramid s1, s2 in upsample")
    results = {name: {"write": [], "read": [], "stage": []} for name in FILTERS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        contract.fixture(tmp / "seg_infer.h5", "seg", traced, voxel_size=[40, 16, 16], downsample_xy=2)
        contract.fixture(tmp / "image.h5", "image", np.zeros(full.shape, np.uint8), voxel_size=[40, 8, 8])
        # Round robin over the filters, best of the repeats: a busy neighbour slows every filter alike.
        for _ in range(args.repeats):
            for name, filters in FILTERS.items():
                results[name]["write"].append(write_labels(tmp / f"{name}.h5", full, filters))
                results[name]["size"] = (tmp / f"{name}.h5").stat().st_size
                results[name]["read"].append(read_labels(tmp / f"{name}.h5", full))
                (tmp / f"{name}.h5").unlink()
                start = time.perf_counter()
                upsample_files(tmp / "seg_infer.h5", tmp / "image.h5", tmp / "seg.h5", 2, SLAB, filters=filters)
                results[name]["stage"].append(time.perf_counter() - start)
        assert np.array_equal(mode_pool_xy(full, 2), h5py.File(tmp / "seg.h5", "r")["s1"][:])
    for name, r in results.items():
        r.update({key: min(r[key]) for key in ("write", "read", "stage")})
        print(f"{name:>9}: write {mvx / r['write']:7.0f} MVx/s, read {mvx / r['read']:6.0f} MVx/s, file {r['size'] / 2**20:7.1f} MiB "
              f"({r['size'] / full.nbytes:.2%} of raw), upsample stage {r['stage']:6.2f} s ({mvx / r['stage']:5.0f} MVx/s)")
    base = results["blosc-lz4"]
    for name, r in results.items():
        print(f"{name:>9} / blosc-lz4: write time x{r['write'] / base['write']:.2f}, upsample stage x{r['stage'] / base['stage']:.2f}, "
              f"size x{r['size'] / base['size']:.2f}")
    print(f"upsample_slowdown_gzip1: {results['gzip1']['stage'] / base['stage']:.2f}")


if __name__ == "__main__":
    main()
