"""The rerun matrix (issue 15): after a finished run, a change reruns exactly what it affects.

The tiny project runs once to the end. Then, for each change below, written
as an overlay config file (``snakemake -n --configfile overlay.yaml``, on top
of the project's config.yaml), the dry run must list exactly the jobs given:
which rules, for which volume, how many. Each rule's params hold only the keys
that change its output (``emmito.config.stage_params``, from the schema's
x-stages); runtime keys reach the jobs through ``--runtime``, outside the
params; and the package version is in no params.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from tinyproject import BIN, make_project, snakemake

import emmito

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

# The tiny project: volume "deploy" has 20 slices -> 5 chunks of 4, 3 blocks of 8; it has labels.
DEPLOY, CHUNKS, BLOCKS = "deploy", 5, 3
# A volume added later: the training slices (12 -> 3 chunks, 2 blocks) under a new name, with labels.
EXTRA = {"images": "data/train/images", "labels": "data/train/labels", "label_format": "vast"}


def jobs(vol: str | None, **counts: int) -> Counter:
    return Counter({(rule, vol): n for rule, n in counts.items()})


# What reruns downstream of each stage, for one volume (the reports too).
FROM_EVALUATE = {"evaluate": 1, "report_scores": 1}
FROM_UPSAMPLE = {"upsample": 1, "measure": 1, "suggest": 1, "export": 1, "ome_zarr": 1, "report_volume": 1, "report_objects": 1}
FROM_TRACE = {"trace": 1, **FROM_UPSAMPLE, **FROM_EVALUATE}
FROM_SEGMENT = {"segment": BLOCKS, **FROM_TRACE}
FROM_MERGE = {"merge": BLOCKS, **FROM_SEGMENT}
FROM_INFER = {"infer": CHUNKS, **FROM_MERGE}
# The model's own jobs: a new checkpoint, its training report, the decoder settings tuned for it and their report.
TUNING = jobs(None, tune=1, report_decoder=1)
TRAINING = jobs(None, train=1, report_training=1) + TUNING
NOTHING = Counter()

MATRIX = {
    "segment key": ({"segment": {"min_size": 21}}, jobs(DEPLOY, **FROM_SEGMENT)),
    # a segment key the tune rule does not choose is one it tunes under: tune reruns too (not train, not infer)
    "segment key tune works under": ({"segment": {"blur_sigma": 0.5}}, TUNING + jobs(DEPLOY, **FROM_SEGMENT)),
    "trace key": ({"trace": {"threshold": 0.6}}, jobs(DEPLOY, **FROM_TRACE)),
    "merge key": ({"merge": {"block_overlap": 3}}, jobs(DEPLOY, **FROM_MERGE)),
    "infer.tta": ({"infer": {"tta": 4}}, jobs(DEPLOY, **FROM_INFER)),
    "infer.tile_overlap": ({"infer": {"tile_overlap": 0.25}}, jobs(DEPLOY, **FROM_INFER)),
    "infer.tile": ({"infer": {"tile": [8, 32, 32]}}, jobs(DEPLOY, **FROM_INFER)),
    "infer.tile_memory_mb": ({"infer": {"tile_memory_mb": 64}}, jobs(DEPLOY, **FROM_INFER)),
    # jobs of 3 chunks: 2 infer jobs; their folders are new, so merge and after rerun (to the same bytes)
    "infer.chunks_per_job": ({"infer": {"chunks_per_job": 3}}, jobs(DEPLOY, **{**FROM_INFER, "infer": 2})),
    "a volume added to infer.volumes": (
        {"volumes": {"extra": EXTRA}, "infer": {"volumes": [DEPLOY, "extra"]}},
        jobs("extra", convert=1, convert_labels=1, infer=3, merge=2, segment=2, trace=1, **FROM_UPSAMPLE, **FROM_EVALUATE),
    ),
    # how grey values map to uint8: every volume's image.h5 and all that follows it (labels stay)
    "convert key": (
        {"convert": {"percentiles": [1, 99]}},
        TRAINING + jobs("train", convert=1) + jobs(DEPLOY, convert=1, **FROM_INFER),
    ),
    "measure key": ({"measure": {"mesh_reduction": 5}}, jobs(DEPLOY, measure=1, suggest=1, export=1, report_objects=1)),
    "export.tiff switched on": ({"export": {"tiff": True}}, jobs(DEPLOY, tiff=1)),
    "evaluate key": ({"evaluate": {"iou_threshold": 0.6}}, jobs(DEPLOY, **FROM_EVALUATE)),
    "thread counts": ({"train": {"threads": 1}, "infer": {"threads": 1}, "segment": {"threads": 1}}, NOTHING),
    "infer.batch_size": ({"infer": {"batch_size": 2, "prefetch_batches": 3}}, NOTHING),
    "model key": ({"model": {"upsample": "nearest"}}, TRAINING + jobs(DEPLOY, **FROM_INFER)),
    "train key": ({"train": {"learning_rate": 0.001}}, TRAINING + jobs(DEPLOY, **FROM_INFER)),
}

JOB = re.compile(r"^(?:local)?rule (\w+):$")
TOTAL = re.compile(r"^total\s+(\d+)$")


def dry_run_jobs(output: str) -> tuple[Counter, dict[str, str]]:
    """The jobs a ``snakemake -n`` output lists, as {(rule, vol or None): count} (rule all left out); and a reason per rule."""
    listed: list[list] = []
    reasons: dict[str, str] = {}
    total = None
    for line in output.splitlines():
        if match := JOB.match(line):
            listed.append([match.group(1), None])
        elif listed and line.startswith("    wildcards: "):
            found = re.search(r"\bvol=([^,\s]+)", line)
            listed[-1][1] = found.group(1) if found else None
        elif listed and line.startswith("    reason: "):
            reasons.setdefault(listed[-1][0], line.strip())
        elif match := TOTAL.match(line.strip()):
            total = int(match.group(1))
    found = Counter((rule, vol) for rule, vol in listed if rule != "all")
    assert total is None or total == len(listed), f"parsed {len(listed)} jobs, the job table says {total}"
    return found, reasons


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = make_project(tmp_path_factory.mktemp("rerun") / "project")
    snakemake(project, "--cores", "2")
    return project


def dry_run(project: Path, overlay: dict, name: str, env: dict[str, str] | None = None) -> tuple[Counter, dict[str, str]]:
    path = project / f"overlay_{re.sub(r'[^A-Za-z0-9]+', '_', name)}.yaml"
    path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    result = snakemake(project, "-n", "--configfile", path.name, env=env)
    return dry_run_jobs(result.stdout + result.stderr)


def test_the_finished_run_has_nothing_to_do(project):
    found, reasons = dry_run(project, {}, "nothing")
    assert found == NOTHING, reasons


@pytest.mark.parametrize("name", list(MATRIX))
def test_a_change_reruns_exactly_what_it_affects(project, name):
    overlay, expected = MATRIX[name]
    found, reasons = dry_run(project, overlay, name)
    assert found == expected, (
        f"{name}: unexpected {dict(found - expected)}, missing {dict(expected - found)}; reasons: {reasons}"
    )


def test_a_new_emmito_patch_version_reruns_nothing(project, tmp_path):
    """The package version is in no params: a release that changes no output version reruns nothing.

    The dry run's Python is started with a ``sitecustomize`` on PYTHONPATH that
    sets ``emmito.__version__`` to the next patch release before the Snakefile
    is parsed: what rules/common.smk and every emmito module then see.
    """
    major, minor, patch = (int(re.match(r"\d+", part).group()) for part in emmito.__version__.split(".")[:3])
    bumped = f"{major}.{minor}.{patch + 1}"
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(f"import emmito\nemmito.__version__ = {bumped!r}\n")
    env = {"PYTHONPATH": f"{shim}:{os.environ.get('PYTHONPATH', '')}"}
    seen = subprocess.run(
        [str(BIN / "python"), "-c", "import emmito.contract, emmito; print(emmito.__version__)"],
        env={**os.environ, **env}, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert seen == bumped != emmito.__version__
    found, reasons = dry_run(project, {}, "new version", env=env)
    assert found == NOTHING, reasons


def test_a_slice_added_to_the_folder_reruns_that_volume_from_convert(project):
    """convert's input is the slice folder (issue 18: no job's parse lists the slices): a new slice reruns it.

    Last in this module: it changes the project's data.
    """
    folder = project / "data" / DEPLOY / "images"
    slices = sorted(folder.iterdir())
    (folder / f"slice_{len(slices):04d}{slices[-1].suffix}").write_bytes(slices[-1].read_bytes())
    found, reasons = dry_run(project, {}, "a slice added")
    assert found[("convert", DEPLOY)] == 1 and found[("convert", "train")] == 0, reasons
    assert found[("infer", DEPLOY)] == CHUNKS + 1 and found[("train", None)] == 0, reasons  # 21 slices: one chunk more
