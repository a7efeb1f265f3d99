"""profiles/default: on a workstation, GPU jobs are serialised per GPU through the `gpu` resource."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.workflow

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "default"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

# Two one-GPU jobs; each records the system uptime (seconds) when it starts and when it ends.
SNAKEFILE = """
rule all:
    input: "gpu1.txt", "gpu2.txt"

rule gpu_job:
    output: "gpu{i}.txt"
    resources: gpu=1
    shell: "(cat /proc/uptime; sleep 1; cat /proc/uptime) | cut -d' ' -f1 > {output}"
"""


@pytest.mark.parametrize(("extra", "overlapping"), [((), False), (("--resources", "gpu=2"), True)])
def test_gpu_jobs_share_no_gpu(tmp_path, extra, overlapping):
    """The profile's one GPU runs the jobs one after the other; with two GPUs they run side by side."""
    (tmp_path / "Snakefile").write_text(textwrap.dedent(SNAKEFILE))
    done = subprocess.run(
        [SNAKEMAKE, "--workflow-profile", str(PROFILE), "--cores", "2", *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (_, first_end), (second_start, _) = sorted(
        tuple(float(v) for v in (tmp_path / f"gpu{i}.txt").read_text().split()) for i in (1, 2)
    )
    assert (second_start < first_end) is overlapping
