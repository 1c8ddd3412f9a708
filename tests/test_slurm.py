"""The workflow on a real (one-node) SLURM cluster through profiles/slurm.

Needs the cluster of ``sudo tests/slurm/start-slurm.sh`` (``.ci/run`` starts it);
without one the cluster tests skip. The profile checks at the top need no cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest
import yaml
from tinyproject import BIN, REPO, make_project, snakemake

BASE_PROFILE = REPO / "profiles" / "slurm" / "config.v8+.yaml"
CI_PROFILE = REPO / "tests" / "slurm" / "profile" / "config.v8+.yaml"
SLURM_PROFILES = ("--profile", "profiles/slurm", "--profile", "tests/slurm/profile")
GPU_RULES = {"train", "infer", "tune"}
# Rules whose GPU count the rule itself sets (train: train.devices), which the profile must not pin.
GPU_COUNT_FROM_RULE = {"train"}
CORE_RULES = {"convert", "train", "infer", "merge", "segment", "trace", "upsample", "evaluate"}
# Bounds for a whole run on the CI cluster; `timeout -k` because snakemake waits for its
# running cluster jobs on SIGTERM (and with a broken status command it would wait for ever).
WORKFLOW_LIMIT_S = 420
# Fewer, bigger pieces than the tiny project's default: every cluster job costs a few
# seconds of start-up, and two chunks and two blocks still exercise merge and trace.
SLURM_OVERRIDES = {"infer": {"chunk_slices": 10}, "merge": {"block_slices": 10}}
FAILURE_LIMIT_S = 120
# What a cluster run must give byte for byte as a local run.
COMPARED = ("results/deploy/seg.h5", "results/deploy/metrics.json")


def _python_literal(value: str) -> str:
    """A profile resource such as "'gpu'" is a Python expression; return the string it means."""
    return value.strip("'\"")


def _gpu_resources_declared() -> dict[str, str]:
    """Rules in rules/*.smk whose resources ask for a GPU: {rule: the gpu resource's expression}."""
    rules = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        # Rules may sit inside an `if` (train, tune): match them at any indentation.
        for block in re.split(r"^(?=\s*rule \w+:)", smk.read_text(), flags=re.M):
            match = re.match(r"\s*rule (\w+):", block)
            # A count ([1-9]...) or a name (train's TRAIN_DEVICES), never 0.
            resource = re.search(r"^\s+gpu\s*=\s*([1-9]\d*|[A-Za-z_]\w*)\s*,", block, flags=re.M)
            if match and resource:
                rules[match.group(1)] = resource.group(1)
    return rules


def test_profile_routes_the_gpu_rules_to_the_gpu_partition():
    base = yaml.safe_load(BASE_PROFILE.read_text())
    assert base["executor"] == "slurm"
    cpu_partition = _python_literal(base["default-resources"]["slurm_partition"])
    routed_to_gpu = {
        rule
        for rule, resources in base["set-resources"].items()
        if "slurm_partition" in resources and _python_literal(resources["slurm_partition"]) != cpu_partition
    }
    assert routed_to_gpu == GPU_RULES
    declared = _gpu_resources_declared()
    for rule in GPU_RULES - GPU_COUNT_FROM_RULE:
        assert base["set-resources"][rule]["gpu"] == 1 and declared[rule] == "1", rule
    for rule in GPU_COUNT_FROM_RULE:
        # The profile would override the rule's count (train.devices): it leaves it alone.
        assert "gpu" not in base["set-resources"][rule], f"the profile pins {rule}'s gpu; the rule sets it"
    assert declared["train"] == "TRAIN_DEVICES"
    # The profile and the rules must agree on which rules need a GPU.
    assert set(declared) == GPU_RULES


# Resource helpers of rules/common.smk that multiply the first request by the retry attempt.
ATTEMPT_SCALED = {"mem_mb": ("mem_mb", "convert_mem_mb", "tune_mem_mb"), "runtime": ("runtime_minutes",)}


def test_every_rule_asks_for_more_memory_and_time_on_each_retry():
    """The README's promise: a job SLURM killed for memory or time comes back with attempt x its request."""
    common = (REPO / "rules" / "common.smk").read_text()
    for helper in {h for helpers in ATTEMPT_SCALED.values() for h in helpers}:
        body = re.search(rf"^def {helper}\(.*?(?=^\S)", common, flags=re.M | re.S)
        assert body and re.search(r"\*\s*attempt\b", body.group(0)), f"{helper} does not multiply by attempt"
    rules = 0
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"^(?=\s*rule \w+:)", smk.read_text(), flags=re.M):
            name = re.match(r"\s*rule (\w+):", block)
            if not name:
                continue
            rules += 1
            for resource, helpers in ATTEMPT_SCALED.items():
                value = re.search(rf"^\s+{resource}=(\w+)", block, flags=re.M)
                assert value and value.group(1) in helpers, f"rule {name.group(1)}: {resource} does not grow with attempt"
    assert rules >= 10


def test_ci_overlay_keeps_the_real_routing():
    base = yaml.safe_load(BASE_PROFILE.read_text())
    overlay = yaml.safe_load(CI_PROFILE.read_text())
    # Profiles merge per top-level key: an overlay set-resources would hide the real routing.
    assert "set-resources" not in overlay
    assert overlay["default-resources"]["slurm_partition"] == base["default-resources"]["slurm_partition"]
    # No accounting database on the CI cluster: sacct would make the run hang.
    assert overlay["slurm-status-command"] == "squeue"


# ---- on the cluster ----------------------------------------------------------------------


_LOCAL_REFERENCE: dict[str, Path] = {}


def local_reference_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project (SLURM_OVERRIDES) run locally to the end: the bytes a cluster run must give.

    Made once per session and shared with tests/test_slurm_faults.py, whose fault runs start
    from copies of it. Callers must not change it.
    """
    if "project" not in _LOCAL_REFERENCE:
        local = make_project(tmp_path_factory.mktemp("slurm-reference") / "local", SLURM_OVERRIDES)
        snakemake(local, "--cores", "2", *COMPARED, timeout=WORKFLOW_LIMIT_S)
        _LOCAL_REFERENCE["project"] = local
    return _LOCAL_REFERENCE["project"]


@pytest.fixture
def local_reference(slurm_cluster, tmp_path_factory) -> Path:
    return local_reference_project(tmp_path_factory)


def _timed_snakemake(project: Path, args: tuple[str, ...], limit_s: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    result = subprocess.run(
        ["timeout", "-k", "30", str(limit_s), str(BIN / "snakemake"), *args],
        cwd=project, env=env, capture_output=True, text=True, timeout=limit_s + 60,
    )
    return result, time.monotonic() - started


def run_id_of(output: str) -> str | None:
    """The SLURM run ID that snakemake prints at its start: every job of the run carries it as its name."""
    match = re.search(r"SLURM run ID: (\S+)", output)
    return match.group(1) if match else None


def cancel_run(run_id: str | None) -> None:
    """Cancel this run's jobs only (a killed snakemake leaves them queued)."""
    if run_id:
        subprocess.run(["scancel", f"--name={run_id}"], capture_output=True, timeout=30)


def jobs_of_run(run_id: str | None) -> list[dict[str, str]]:
    """The run's jobs as squeue still lists them (finished ones for MinJobAge s), oldest first.

    Each: id, partition, state, limit (time), memory, key (the plugin's comment, rule and
    wildcards), rule, reason (why it waits).
    """
    if run_id is None:
        return []
    listing = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i|%j|%P|%T|%l|%m|%k|%r"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    jobs = []
    for line in listing.splitlines():
        job_id, name, partition, state, limit, memory, comment, reason = line.strip().split("|", 7)
        if name != run_id:
            continue
        # The plugin comments each job "rule_<rule>" or "rule_<rule>_wildcards_<values>".
        rule = comment.removeprefix("rule_").split("_wildcards_")[0]
        jobs.append(dict(id=job_id, partition=partition, state=state, limit=limit, memory=memory,
                         key=comment, rule=rule, reason=reason))
    return sorted(jobs, key=lambda job: int(job["id"]))


@pytest.mark.slurm
@pytest.mark.workflow
@pytest.mark.slow
def test_workflow_on_slurm_routes_jobs_and_matches_a_local_run(slurm_cluster, local_reference, tmp_path):
    local = local_reference
    on_slurm = make_project(tmp_path / "slurm", SLURM_OVERRIDES, data_from=local)

    result, elapsed = _timed_snakemake(on_slurm, SLURM_PROFILES, WORKFLOW_LIMIT_S)
    run_id = run_id_of(result.stderr + result.stdout)
    try:
        assert result.returncode == 0, f"SLURM run failed ({result.returncode}) after {elapsed:.0f} s:\n{result.stderr[-4000:]}"
    finally:
        cancel_run(run_id)
    print(f"workflow on SLURM: {elapsed:.1f} s", file=sys.stderr)

    assert run_id is not None, "no 'SLURM run ID' in snakemake's output: did it use the slurm executor?"
    jobs = jobs_of_run(run_id)
    rules_run = {job["rule"] for job in jobs}
    assert CORE_RULES <= rules_run, f"rules missing from the cluster's job list: {sorted(CORE_RULES - rules_run)}"
    for job in jobs:
        expected = "gpu" if job["rule"] in GPU_RULES else "cpu"
        assert job["partition"] == expected, f"job {job['id']} of rule {job['rule']} ran in partition {job['partition']}"
        assert job["state"] == "COMPLETED", f"job {job['id']} of rule {job['rule']} is {job['state']}"
    infer_jobs = [job for job in jobs if job["rule"] == "infer"]
    assert len(infer_jobs) == 2  # 20 slices in chunks of 10: one cluster job each

    with h5py.File(on_slurm / "results/deploy/seg.h5") as f_slurm, h5py.File(local / "results/deploy/seg.h5") as f_local:
        seg_slurm, seg_local = f_slurm["main"][...], f_local["main"][...]
    assert seg_slurm.dtype == seg_local.dtype == np.uint32
    assert seg_slurm.max() > 0, "the tiny model found nothing, so the comparison would prove little"
    assert np.array_equal(seg_slurm, seg_local)
    assert (on_slurm / COMPARED[1]).read_bytes() == (local / COMPARED[1]).read_bytes()


FAILING_WORKFLOW = """\
rule all:
    input:
        "results/never.txt",


localrules:
    all,


rule fail_on_purpose:
    output:
        "results/never.txt",
    log:
        "logs/fail_on_purpose.log",
    shell:
        "echo 'emmito test: failing on purpose' > {log}; exit 1"
"""


@pytest.mark.slurm
@pytest.mark.workflow
def test_failed_cluster_job_fails_the_run_and_names_rule_and_log(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(FAILING_WORKFLOW)
    profiles = ("--profile", str(REPO / "profiles/slurm"), "--profile", str(REPO / "tests/slurm/profile"))

    result, elapsed = _timed_snakemake(tmp_path, profiles, FAILURE_LIMIT_S)
    output = result.stderr + result.stdout
    cancel_run(run_id_of(output))

    assert result.returncode not in (0, 124, 137), f"expected a failure, not rc {result.returncode}:\n{output[-3000:]}"
    assert elapsed < FAILURE_LIMIT_S
    assert "Error in rule fail_on_purpose" in output
    assert "logs/fail_on_purpose.log" in output
    slurm_logs = re.findall(r"\S*\.snakemake/slurm_logs/rule_fail_on_purpose/\d+\.log", output)
    assert slurm_logs, f"the output does not name the job's SLURM log:\n{output[-3000:]}"
    assert "failing on purpose" in (tmp_path / "logs/fail_on_purpose.log").read_text()
    assert Path(slurm_logs[0]).exists()
