"""Cluster faults on the one-node CI SLURM: each job SLURM kills comes back, to the same bytes (issue 20).

A cancelled job (scancel), a time limit, a memory limit, a drained node, and Snakemake itself
killed and restarted. Each fault runs the tiny project through
``--profile profiles/slurm --profile tests/slurm/profile``, from a copy of the local reference
run (tests/test_slurm.py) with the stages from the faulty one on removed, and must end with
``seg.h5`` data and ``metrics.json`` byte-identical to the local run. It also checks what the
job's SLURM log, Snakemake's output and emmito's own log line say.

Needs the cluster of ``sudo tests/slurm/start-slurm.sh`` (.ci/run starts it), which enforces
memory and time limits. The time-limit fault waits minutes for SLURM's timer, so the five runs
go at once, in threads started by the ``faults`` fixture (the time limit first); each test
then waits for its own. ``pytest -k <name>`` runs a fault alone: that is how to time one.

Jobs are held on purpose by a test-only stand-in for ``emmito`` first on PATH (``HOLD_SHIM``):
it runs emmito itself, after a sleep inside the stage for the first attempt of the one job
named in ``EMMITO_TEST_HOLD``. Nothing in emmito or the workflow knows about it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest
import yaml
from test_slurm import (
    BASE_PROFILE,
    SLURM_PROFILES,
    WORKFLOW_LIMIT_S,
    cancel_run,
    jobs_of_run,
    local_reference_project,
    run_id_of,
)
from tinyproject import BIN, SNAKEMAKE

pytestmark = [pytest.mark.slurm, pytest.mark.workflow, pytest.mark.slow]

TARGETS = ("results/deploy/seg.h5", "results/deploy/metrics.json")
# What a fault run makes again (under results/deploy/), by the stage it starts from; the rest
# (convert, train, tune and the stages before) is the reference's, copied.
REDO = {
    "infer": ("heat", "seg", "seg_infer.h5", "trace.json", "seg.h5", "metrics.json"),
    "segment": ("seg", "seg_infer.h5", "trace.json", "seg.h5", "metrics.json"),
    "trace": ("seg_infer.h5", "trace.json", "seg.h5", "metrics.json"),
}
RULES_FROM = {
    "infer": {"infer", "merge", "segment", "trace", "upsample", "evaluate"},
    "segment": {"segment", "trace", "upsample", "evaluate"},
    "trace": {"trace", "upsample", "evaluate"},
}
NODE = "localhost"
HOLD_S = 600  # a held first attempt sleeps this long: SLURM, scancel or the test ends it first
DRAINED_S = 10  # how long the drain test keeps its jobs waiting on the drained node
# squeue's reasons for a job that waits for a drained node (SLURM 22.05).
DRAIN_REASONS = r"ReqNodeNotAvail|DOWN, DRAINED"
SCENARIO_LIMIT_S = WORKFLOW_LIMIT_S + 120

# The test-only stand-in for emmito (see the module's docstring).
HOLD_SHIM = '''#!{python}
"""Test-only stand-in for emmito (tests/test_slurm_faults.py), first on PATH in the fault runs.

EMMITO_TEST_HOLD="<verb>:<text in an argument>:<seconds>:<folder>": the first job of <verb>
with that text in an argument sleeps <seconds> inside the stage (after emmito has set its
SIGTERM handler) and leaves <folder>/<verb>.held while it sleeps; later attempts run at once.
"""
import importlib
import os
import sys
import time
from pathlib import Path

from emmito import cli

spec = os.environ.get("EMMITO_TEST_HOLD", "")
if spec:
    verb, needle, seconds, folder = spec.split(":", 3)
    held = Path(folder) / (verb + ".held")
    if sys.argv[1:2] == [verb] and any(needle in arg for arg in sys.argv[2:]) and not held.exists():
        module = importlib.import_module("emmito." + verb)
        run_cli = module.run_cli

        def hold(args, params):
            held.write_text(str(os.getpid()))
            print(f"test_slurm_faults: first attempt held for {{seconds}} s on purpose", file=sys.stderr, flush=True)
            time.sleep(float(seconds))
            return run_cli(args, params)

        module.run_cli = hold
sys.exit(cli.main())
'''


# ---- the cluster --------------------------------------------------------------------------


def _squeue(*args: str) -> str:
    return subprocess.run(["squeue", *args], capture_output=True, text=True, timeout=30, check=True).stdout


def _node_state() -> str:
    return subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%T"], capture_output=True, text=True,
                          timeout=30).stdout.split()[0]


def _resume_node() -> None:
    if _node_state().rstrip("*").startswith(("drain", "drng")):
        subprocess.run(["scontrol", "update", f"nodename={NODE}", "state=resume"], check=True, timeout=30)


def _wait_for(what: str, condition: Callable[[], object], timeout: float, run: Run | None = None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run is not None and run.process.poll() is not None:
            raise AssertionError(f"snakemake ended ({run.process.returncode}) before {what}:\n{run.output()[-4000:]}")
        time.sleep(0.25)
    tail = run.output()[-4000:] if run is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


# ---- one snakemake on the cluster ---------------------------------------------------------


@dataclass
class Run:
    """One snakemake through the SLURM profiles, in the background, its output in a file."""

    project: Path
    name: str
    args: tuple[str, ...] = ()
    hold: str | None = None  # EMMITO_TEST_HOLD's "<verb>:<text>" (seconds and folder added here)
    process: subprocess.Popen = field(init=False)
    started: float = field(init=False)
    elapsed: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.log = self.project / f"snakemake-{self.name}.out"
        env = {**os.environ, "PATH": f"{self.project.parent / 'bin'}:{BIN}:{os.environ.get('PATH', '')}"}
        if self.hold:
            env["EMMITO_TEST_HOLD"] = f"{self.hold}:{HOLD_S}:{self.project}"
        command = ["timeout", "-k", "30", str(WORKFLOW_LIMIT_S), SNAKEMAKE, *SLURM_PROFILES, *TARGETS, *self.args]
        self.started = time.monotonic()
        with open(self.log, "wb") as out:
            # A process group of its own: the kill test kills it whole (the cluster jobs are not in it).
            self.process = subprocess.Popen(command, cwd=self.project, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def run_id(self) -> str | None:
        return run_id_of(self.output())

    def wait(self) -> int:
        try:
            code = self.process.wait(timeout=WORKFLOW_LIMIT_S + 60)
        finally:
            self.elapsed = time.monotonic() - self.started
        return code

    def kill(self) -> None:
        """SIGKILL snakemake and its process group, as when a login node dies."""
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own meanwhile
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.elapsed = time.monotonic() - self.started

    def stop(self) -> None:
        """Whatever happened: snakemake killed if it still runs, then its jobs cancelled."""
        if self.process.poll() is None:
            self.kill()
        cancel_run(self.run_id)

    def held(self, verb: str) -> bool:
        return (self.project / f"{verb}.held").exists()


@dataclass
class Outcome:
    """What a fault scenario leaves for its test to check."""

    project: Path
    runs: list[Run]
    code: int  # the last snakemake's exit status
    jobs: list[dict[str, str]]  # the last run's jobs
    seconds: float  # wall time of the scenario's snakemake runs
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return "\n".join(run.output() for run in self.runs)

    def by_key(self, key: str) -> list[dict[str, str]]:
        return [job for job in self.jobs if job["key"] == key]

    def slurm_log(self, job: dict[str, str]) -> str:
        (path,) = (self.project / ".snakemake" / "slurm_logs").glob(f"rule_{job['rule']}/**/{job['id']}.log")
        return path.read_text(errors="replace")


def _fault_project(reference: Path, root: Path, name: str, redo_from: str) -> Path:
    """A copy of the reference project without the outputs from stage ``redo_from`` on."""

    def skip(folder: str, names: list[str]) -> list[str]:
        if Path(folder) == reference / ".snakemake":
            return [n for n in names if n in ("log", "slurm_logs", "locks", "incomplete")]
        return []

    project = root / name
    shutil.copytree(reference, project, ignore=skip, symlinks=True)  # copy2: modification times kept
    for entry in REDO[redo_from]:
        path = project / "results" / "deploy" / entry
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return project


def _set_resources(**overrides: str) -> tuple[str, ...]:
    """--set-resources: the profile's own entries (a command-line list replaces the profile's) + overrides."""
    profile = yaml.safe_load(BASE_PROFILE.read_text())["set-resources"]
    entries = {f"{rule}:{name}": value for rule, values in profile.items() for name, value in values.items()}
    entries.update(overrides)
    return ("--set-resources", *(f"{key}={value}" for key, value in entries.items()))


def _finish(project: Path, runs: list[Run], started: float, **notes: object) -> Outcome:
    last = runs[-1]
    code = last.wait()
    return Outcome(project, runs, code, jobs_of_run(last.run_id), time.monotonic() - started, dict(notes))


# ---- the five faults ----------------------------------------------------------------------


def play_scancel(project: Path, ready: threading.Event) -> Outcome:
    """scancel the running infer job of chunk 0; snakemake (retries 1) submits it again."""
    started = time.monotonic()
    run = Run(project, "scancel", ("--retries", "1"), hold="infer:heat/job_0")
    try:
        _wait_for("infer job_0 held in emmito", lambda: run.held("infer"), 180, run)
        running = _wait_for("infer job_0 RUNNING in squeue", lambda: [
            j for j in jobs_of_run(run.run_id) if j["key"] == "rule_infer_wildcards_deploy_0" and j["state"] == "RUNNING"
        ], 60, run)
        cancelled = running[0]["id"]
        subprocess.run(["scancel", cancelled], check=True, timeout=30)
        return _finish(project, [run], started, cancelled=cancelled)
    finally:
        run.stop()


def play_time_limit(project: Path, ready: threading.Event) -> Outcome:
    """infer's first time limit is 1 minute (test-only override runtime=attempt) and job_0 takes longer."""
    started = time.monotonic()
    run = Run(project, "time-limit", ("--retries", "1", *_set_resources(**{"infer:runtime": "attempt"})),
              hold="infer:heat/job_0")
    try:
        _wait_for("infer job_0 held in emmito", lambda: run.held("infer"), 180, run)
        ready.set()  # the node may be drained now: this job runs, and its clock with it
        return _finish(project, [run], started)
    finally:
        ready.set()
        run.stop()


def play_memory(project: Path, ready: threading.Event) -> Outcome:
    """segment's first memory request is 300 MB (test-only override 300 * attempt); a job needs ~470."""
    started = time.monotonic()
    run = Run(project, "memory", ("--retries", "2", *_set_resources(**{"segment:mem_mb": "300 * attempt"})))
    try:
        return _finish(project, [run], started)
    finally:
        run.stop()


def play_drain(project: Path, ready: threading.Event) -> Outcome:
    """Drain the node, start the run: its jobs (and the other faults' new ones) wait; resume after DRAINED_S s."""
    # The time limit's held job must be running first, or the drain would hold it back too.
    assert ready.wait(300), "the time-limit fault's job never started"
    started = time.monotonic()
    reason = f"emmito CI: drained on purpose by {Path(__file__).name}"
    subprocess.run(["scontrol", "update", f"nodename={NODE}", "state=drain", f"reason={reason}"], check=True, timeout=30)
    drained_at = time.monotonic()
    run = None
    try:
        run = Run(project, "drain")
        _wait_for("a job of the run PENDING on the drained node", lambda: [
            j for j in jobs_of_run(run.run_id) if j["state"] == "PENDING"
        ], 120, run)
        time.sleep(DRAINED_S)
        # The job first in line waits for the node; those behind it show "Priority". squeue
        # names the reason once the scheduler has looked at the jobs.
        waiting = _wait_for("a job PENDING for the drained node", lambda: [
            line for line in _squeue("-h", "-t", "PENDING", "-o", "%i %r").splitlines() if re.search(DRAIN_REASONS, line)
        ], 60, run)
        notes = dict(node_state=_node_state(), waiting=waiting, sinfo_reasons=subprocess.run(
            ["sinfo", "-R"], capture_output=True, text=True, timeout=30).stdout,
            still_pending=[j for j in jobs_of_run(run.run_id) if j["state"] == "PENDING"])
        _resume_node()
        notes["drained_s"] = time.monotonic() - drained_at
        outcome = _finish(project, [run], started, **notes)
        outcome.notes["node_after"] = _node_state()
        return outcome
    finally:
        _resume_node()
        if run is not None:
            run.stop()


def play_kill(project: Path, ready: threading.Event) -> Outcome:
    """SIGKILL snakemake while segment block 1 runs on the cluster (block 0 done), then restart it."""
    started = time.monotonic()
    first = Run(project, "killed", hold="segment:seg/block_1")
    try:
        _wait_for("segment block_0 finished and block_1 held", lambda: (
            first.held("segment") and re.search(r"Finished jobid: \d+ \(Rule: segment\)", first.output())
        ), 240, first)
        before = jobs_of_run(first.run_id)
        first.kill()
        left_running = [j for j in jobs_of_run(first.run_id) if j["state"] in ("RUNNING", "PENDING")]
        # As a user would after a dead login node: unlock, then the same command again.
        unlock = subprocess.run([SNAKEMAKE, "--unlock", *TARGETS], cwd=project, capture_output=True, text=True,
                                timeout=120, env={**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"})
        assert unlock.returncode == 0, unlock.stderr[-2000:]
        second = Run(project, "restarted")
        try:
            return _finish(project, [first, second], started, before=before, left_running=left_running)
        finally:
            second.stop()
    finally:
        first.stop()  # the killed run's job still holds block 1 on the cluster


SCENARIOS: dict[str, tuple[Callable[[Path, threading.Event], Outcome], str]] = {
    # name: (scenario, the stage its run starts from)
    "time_limit": (play_time_limit, "infer"),
    "scancel": (play_scancel, "infer"),
    "memory": (play_memory, "segment"),
    "drain": (play_drain, "trace"),
    "kill": (play_kill, "segment"),
}
TESTS = {
    "test_scancelled_infer_job_is_retried": "scancel",
    "test_time_limit_kills_infer_and_the_retry_gets_longer": "time_limit",
    "test_memory_kill_of_segment_is_retried_with_more_memory": "memory",
    "test_drained_node_holds_the_jobs_until_resumed": "drain",
    "test_killed_snakemake_restarts_without_redoing_finished_jobs": "kill",
}


def _check_limits_enforced() -> None:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    node = subprocess.run(["scontrol", "show", "node", NODE], capture_output=True, text=True, timeout=30).stdout
    if "OverMemoryKill" not in config or "gpu:2" not in node:
        pytest.fail("this SLURM does not enforce memory limits or has one GPU: it was started by an older "
                    "tests/slurm/start-slurm.sh; restart it: sudo tests/slurm/stop-slurm.sh && sudo tests/slurm/start-slurm.sh")


@pytest.fixture(scope="module")
def faults(request, slurm_cluster, tmp_path_factory):
    """The selected faults' scenarios, started at once: {name: Future[Outcome]}."""
    _check_limits_enforced()
    reference = local_reference_project(tmp_path_factory)
    module = sys.modules[__name__]
    wanted = [TESTS[item.name] for item in request.session.items if item.module is module and item.name in TESTS]
    root = tmp_path_factory.mktemp("slurm-faults")
    shim = root / "bin" / "emmito"
    shim.parent.mkdir()
    shim.write_text(HOLD_SHIM.format(python=sys.executable))
    shim.chmod(0o755)

    ready = threading.Event()  # set once the time limit's held job runs (the drain waits for it)
    if "time_limit" not in wanted:
        ready.set()
    pool = ThreadPoolExecutor(max_workers=len(SCENARIOS))
    futures: dict[str, Future] = {}
    try:
        for name, (play, redo_from) in SCENARIOS.items():  # the time limit first: SLURM runs its jobs first
            if name in wanted:
                futures[name] = pool.submit(play, _fault_project(reference, root, name, redo_from), ready)
        yield futures
    finally:
        pool.shutdown(wait=True)
        _resume_node()


def _outcome(faults: dict[str, Future], name: str) -> Outcome:
    outcome = faults[name].result(timeout=SCENARIO_LIMIT_S)
    print(f"SLURM fault {name}: {outcome.seconds:.0f} s of snakemake", file=sys.stderr)
    return outcome


def _assert_same_bytes(outcome: Outcome, reference: Path, redo_from: str) -> None:
    """seg.h5 data and metrics.json as the local run made them, and the stages redone on the cluster."""
    assert outcome.code == 0, f"the run failed ({outcome.code}):\n{outcome.output[-6000:]}"
    with h5py.File(outcome.project / TARGETS[0]) as f_cluster, h5py.File(reference / TARGETS[0]) as f_local:
        seg_cluster, seg_local = f_cluster["main"][...], f_local["main"][...]
    assert seg_local.max() > 0, "the tiny model found nothing, so the comparison would prove little"
    assert seg_cluster.dtype == seg_local.dtype and np.array_equal(seg_cluster, seg_local)
    assert (outcome.project / TARGETS[1]).read_bytes() == (reference / TARGETS[1]).read_bytes()
    ran = {job["rule"] for run in outcome.runs for job in jobs_of_run(run.run_id) if job["state"] == "COMPLETED"}
    assert RULES_FROM[redo_from] <= ran, f"not redone on the cluster: {sorted(RULES_FROM[redo_from] - ran)}"


def _reference(tmp_path_factory) -> Path:
    return local_reference_project(tmp_path_factory)


# ---- the tests ----------------------------------------------------------------------------


def test_scancelled_infer_job_is_retried(faults, tmp_path_factory):
    outcome = _outcome(faults, "scancel")
    _assert_same_bytes(outcome, _reference(tmp_path_factory), "infer")
    attempts = outcome.by_key("rule_infer_wildcards_deploy_0")
    assert [j["state"] for j in attempts] == ["CANCELLED", "COMPLETED"], attempts
    cancelled = attempts[0]
    assert cancelled["id"] == outcome.notes["cancelled"] and cancelled["partition"] == "gpu"
    # SLURM's log of the job, Snakemake's output (show-failed-logs: the stage log too) and emmito's line.
    assert re.search(rf"\*\*\* JOB {cancelled['id']} ON {NODE} CANCELLED AT \S+ \*\*\*", outcome.slurm_log(cancelled))
    assert f"SLURM-job '{cancelled['id']}' failed, SLURM status is: 'CANCELLED'" in outcome.output
    assert "emmito infer: terminated (SIGTERM): no partial output was kept; rerun the job" in outcome.output
    assert "Trying to restart job" in outcome.output


def test_time_limit_kills_infer_and_the_retry_gets_longer(faults, tmp_path_factory):
    outcome = _outcome(faults, "time_limit")
    _assert_same_bytes(outcome, _reference(tmp_path_factory), "infer")
    attempts = outcome.by_key("rule_infer_wildcards_deploy_0")
    assert [(j["state"], j["limit"]) for j in attempts] == [("TIMEOUT", "1:00"), ("COMPLETED", "2:00")], attempts
    timed_out = attempts[0]
    assert re.search(r"CANCELLED AT \S+ DUE TO TIME LIMIT", outcome.slurm_log(timed_out))
    assert f"SLURM-job '{timed_out['id']}' failed, SLURM status is: 'TIMEOUT'" in outcome.output
    assert "DUE TO TIME LIMIT" in outcome.output  # the SLURM log, shown by snakemake
    assert "emmito infer: terminated (SIGTERM): no partial output was kept; rerun the job" in outcome.output


def test_memory_kill_of_segment_is_retried_with_more_memory(faults, tmp_path_factory):
    outcome = _outcome(faults, "memory")
    _assert_same_bytes(outcome, _reference(tmp_path_factory), "segment")
    for block in ("0", "1"):
        attempts = outcome.by_key(f"rule_segment_wildcards_deploy_{block}")
        assert attempts[0]["state"] == "FAILED" and attempts[0]["memory"] == "300M", attempts
        assert attempts[-1]["state"] == "COMPLETED", attempts
        requests = [int(j["memory"].removesuffix("M")) for j in attempts]
        assert requests == [300 * (i + 1) for i in range(len(attempts))], "each retry asks for attempt x 300 MB"
        log = outcome.slurm_log(attempts[0])
        assert re.search(r"StepId=\d+\.0 exceeded memory limit \(\d+ > 314572800\), being killed", log), log[-3000:]
        assert "Exceeded job memory limit" in log
        # Not in snakemake's output: killed while importing, the stage log is empty, and snakemake
        # 9.27's show-failed-logs stops at an empty log, before the SLURM log that names the kill.
        assert f"SLURM-job '{attempts[0]['id']}' failed, SLURM status is: 'FAILED'" in outcome.output
        assert f"slurm_logs/rule_segment/deploy_{block}/{attempts[0]['id']}.log" in outcome.output


def test_drained_node_holds_the_jobs_until_resumed(faults, tmp_path_factory):
    outcome = _outcome(faults, "drain")
    _assert_same_bytes(outcome, _reference(tmp_path_factory), "trace")
    notes = outcome.notes
    assert notes["node_state"].startswith(("drained", "draining")), notes
    assert "emmito CI: drained" in notes["sinfo_reasons"], notes["sinfo_reasons"]  # sinfo -R cuts it at 20
    # What `squeue --me` shows the user while the node is drained.
    assert notes["waiting"], notes
    assert notes["still_pending"], f"the run's jobs did not wait {DRAINED_S} s on the drained node"
    assert all(re.search(rf"{DRAIN_REASONS}|Priority", j["reason"]) for j in notes["still_pending"]), notes
    assert all(j["state"] == "COMPLETED" for j in outcome.jobs), outcome.jobs
    assert notes["node_after"] in ("idle", "mixed", "allocated"), notes
    assert "Error in rule" not in outcome.output, "snakemake reported a failed job while the node was drained"


def test_killed_snakemake_restarts_without_redoing_finished_jobs(faults, tmp_path_factory):
    outcome = _outcome(faults, "kill")
    _assert_same_bytes(outcome, _reference(tmp_path_factory), "segment")
    before = {j["key"]: j["state"] for j in outcome.notes["before"]}
    assert before.get("rule_segment_wildcards_deploy_0") == "COMPLETED", before
    assert before.get("rule_segment_wildcards_deploy_1") == "RUNNING", before
    assert [j["key"] for j in outcome.notes["left_running"]] == ["rule_segment_wildcards_deploy_1"]
    redone = [j["key"] for j in outcome.jobs]
    assert "rule_segment_wildcards_deploy_0" not in redone, f"finished work done again: {redone}"
    assert redone.count("rule_segment_wildcards_deploy_1") == 1, redone
    assert all(j["state"] == "COMPLETED" for j in outcome.jobs), outcome.jobs
