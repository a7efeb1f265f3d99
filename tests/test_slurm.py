"""profiles/slurm on a real single-node SLURM cluster (issue 9): jobs, resources, failures, resumption.

The cluster (tests/slurm_cluster.py) is installed and started once per session; without root or apt-get
these tests skip with the reason. Every run goes through `--workflow-profile profiles/slurm` with fast
status polling, bounded by `timeout -s INT` (Snakemake ignores SIGTERM while it waits on jobs).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slurm_cluster import ClusterUnavailable, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
FAST_POLLING = ("--slurm-init-seconds-before-status-checks=1", "--seconds-between-status-checks=1")
ACCT_FIELDS = ("JobID", "JobName", "Comment", "State", "Partition", "ReqMem", "Timelimit", "ReqCPUS",
               "ReqTRES", "ExitCode")


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = SlurmCluster()
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no test SLURM cluster here: {exc}")
    yield cluster
    cluster.stop()


def snakemake_cmd(workdir: Path, *args: str, limit_s: int = 240) -> list[str]:
    return ["timeout", "-s", "INT", "-k", "30", str(limit_s), SNAKEMAKE, "--workflow-profile", str(PROFILE),
            *FAST_POLLING, "--directory", str(workdir), *args]


def run_snakemake(workdir: Path, *args: str, limit_s: int = 240) -> subprocess.CompletedProcess:
    """Snakemake through the profile in workdir (the Snakefile there unless args name one)."""
    return subprocess.run(snakemake_cmd(workdir, *args, limit_s=limit_s), capture_output=True, text=True,
                          cwd=workdir)


def run_id(output: str) -> str:
    """The plugin's run ID: the SLURM job name of every job this Snakemake run submitted."""
    found = re.findall(r"SLURM run ID: (\S+)", output)
    assert len(found) == 1, output[-3000:]
    return found[0]


def jobs_of_run(cluster: SlurmCluster, output: str, count: int) -> list[dict[str, str]]:
    """The accounting records of the jobs a Snakemake run submitted, once all `count` have arrived."""
    name = run_id(output)
    deadline = time.monotonic() + 30
    while True:
        jobs = [job for job in cluster.sacct(*ACCT_FIELDS) if job["JobName"] == name]
        if len(jobs) >= count or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


def write_snakefile(workdir: Path, text: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "Snakefile"
    path.write_text(textwrap.dedent(text))
    return path


# Rules named like the real workflow's, so the profile's per-rule settings apply to them; independent, so
# that they run side by side. Each job writes the SLURM job ID it ran under (the cluster shares this disk).
PIPELINE = """
localrules: tabulate

rule tabulate:
    input: "calib.txt", "quantized.txt", expand("evals/{b}.txt", b=["x", "y"])
    output: "table.txt"
    shell: "cat {input} > {output}"

rule calibrate:
    output: "calib.txt"
    shell: "echo calibrate $SLURM_JOB_ID > {output}"

rule quantize:
    output: "quantized.txt"
    threads: 2
    resources: mem_mb=1500, runtime=20
    shell: "echo quantize $SLURM_JOB_ID > {output}"

rule evaluate:
    output: "evals/{b}.txt"
    resources: mem_mb=700, runtime=5
    shell: "echo evaluate_{wildcards.b} $SLURM_JOB_ID > {output}"
"""


def test_jobs_run_on_the_cluster_with_the_profiles_resources(slurm_cluster, tmp_path):
    write_snakefile(tmp_path, PIPELINE)
    done = run_snakemake(tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    # every rule but the local tabulate ran as a SLURM job, COMPLETED, under the ID its output names
    jobs = {job["Comment"]: job for job in jobs_of_run(slurm_cluster, done.stderr, 4)}
    assert sorted(jobs) == ["rule_calibrate", "rule_evaluate_wildcards_x", "rule_evaluate_wildcards_y",
                            "rule_quantize"]
    assert {job["State"] for job in jobs.values()} == {"COMPLETED"}
    expected = "".join(
        f"{name} {jobs[comment]['JobID']}\n"
        for name, comment in (("calibrate", "rule_calibrate"), ("quantize", "rule_quantize"),
                              ("evaluate_x", "rule_evaluate_wildcards_x"),
                              ("evaluate_y", "rule_evaluate_wildcards_y"))
    )
    assert (tmp_path / "table.txt").read_text() == expected

    # resources as the scheduler saw them: the profile's defaults where a rule is silent, the rule's own
    # values where it declares them, the profile's per-rule partition, one CPU per thread, no GPU
    requested = {name: (job["Partition"], job["ReqMem"], job["Timelimit"], job["ReqCPUS"])
                 for name, job in jobs.items()}
    assert requested == {
        "rule_calibrate": ("cpu", "4000M", "01:00:00", "1"),
        "rule_quantize": ("gpu", "1500M", "00:20:00", "2"),
        "rule_evaluate_wildcards_x": ("gpu", "700M", "00:05:00", "1"),
        "rule_evaluate_wildcards_y": ("gpu", "700M", "00:05:00", "1"),
    }
    assert all("gres/gpu" not in job["ReqTRES"] for job in jobs.values())


def test_a_gpu_request_reaches_the_scheduler(slurm_cluster, tmp_path):
    """The node has no GPU: SLURM refuses the job, and its accounting record shows the GPU it asked for."""
    write_snakefile(tmp_path, """
        rule evaluate:
            output: "eval.txt"
            resources: gpu=2, mem_mb=500, runtime=3
            shell: "touch {output}"
        """)
    done = run_snakemake(tmp_path, "--retries", "0")
    assert done.returncode != 0
    assert "SLURM sbatch failed" in done.stderr
    assert "Requested node configuration is not available" in done.stderr
    call = re.search(r"sbatch call:\s*\n\s*(sbatch .*)", done.stderr).group(1)
    assert " --gpus=2" in call and " -p gpu" in call and " --mem 500" in call and " -t 3" in call
    (job,) = jobs_of_run(slurm_cluster, done.stderr, 1)
    assert job["State"] == "FAILED" and job["Partition"] == "gpu"
    assert "gres/gpu=2" in job["ReqTRES"].split(",")
    assert not (tmp_path / "eval.txt").exists()


def test_a_failing_job_fails_the_workflow_and_names_its_logs(slurm_cluster, tmp_path):
    write_snakefile(tmp_path, """
        rule calibrate:
            output: "calib.txt"
            log: "logs/calibrate.log"
            shell: "echo 'calibration data unreadable' > {log}; exit 3"
        """)
    done = run_snakemake(tmp_path, "--retries", "0")  # one attempt: the profile's retry would double the wait
    assert done.returncode != 0
    (job,) = jobs_of_run(slurm_cluster, done.stderr, 1)
    assert job["State"] == "FAILED"
    # the message names the rule's log and the SLURM job's log; both hold what went wrong
    error = done.stderr[done.stderr.index("Error in rule calibrate"):]
    slurm_log = tmp_path / "logs" / "slurm" / "rule_calibrate" / f"{job['JobID']}.log"
    assert f"log: logs/calibrate.log, {slurm_log} " in error
    assert (tmp_path / "logs" / "calibrate.log").read_text() == "calibration data unreadable\n"
    assert "Error in rule calibrate" in slurm_log.read_text()  # written by the job's Snakemake on the node
    assert f"SLURM-job '{job['JobID']}' failed" in error
    assert not (tmp_path / "calib.txt").exists()


def test_an_interrupted_run_resumes_without_redoing_finished_jobs(slurm_cluster, tmp_path):
    # quantize holds until the file `release` exists: the first run is interrupted while it runs
    write_snakefile(tmp_path, """
        rule quantize:
            input: "calib.txt"
            output: "quantized.txt"
            shell: "while [ ! -e release ]; do sleep 0.2; done; (cat {input}; echo quantize) > {output}"

        rule calibrate:
            output: "calib.txt"
            shell: "echo calib $SLURM_JOB_ID > {output}"
        """)
    first = subprocess.Popen(snakemake_cmd(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not running_on_cluster("rule_quantize"):
        assert first.poll() is None and time.monotonic() < deadline, "quantize never started on the cluster"
        time.sleep(0.5)
    calib_before = (tmp_path / "calib.txt").stat().st_mtime_ns
    first.send_signal(signal.SIGINT)  # `timeout` passes it on to Snakemake
    _, first_err = first.communicate(timeout=120)
    assert first.returncode != 0
    assert not (tmp_path / "quantized.txt").exists()
    first_jobs = {job["Comment"]: job for job in jobs_of_run(slurm_cluster, first_err, 2)}
    assert first_jobs["rule_calibrate"]["State"] == "COMPLETED"
    assert first_jobs["rule_quantize"]["State"].startswith("CANCELLED")  # Snakemake cancelled its job

    (tmp_path / "release").touch()
    second = run_snakemake(tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert (tmp_path / "calib.txt").stat().st_mtime_ns == calib_before
    calib_id = first_jobs["rule_calibrate"]["JobID"]
    assert (tmp_path / "quantized.txt").read_text() == f"calib {calib_id}\nquantize\n"
    second_jobs = jobs_of_run(slurm_cluster, second.stderr, 1)
    assert [(job["Comment"], job["State"]) for job in second_jobs] == [("rule_quantize", "COMPLETED")]


def running_on_cluster(comment: str) -> bool:
    done = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%k"], capture_output=True, text=True)
    return comment in done.stdout.split()
