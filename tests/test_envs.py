"""envs/*.yaml, the conda environments of `--software-deployment-method conda`: what they install and that pip,
run as conda runs it, finds this checkout through QUANTBENCH_ROOT (conda itself is not on the test machines)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))


def _pip_lines(env: Path) -> list[str]:
    spec = yaml.safe_load(env.read_text(encoding="utf-8"))
    assert spec["channels"] == ["conda-forge", "nodefaults"]
    (pip,) = [d["pip"] for d in spec["dependencies"] if isinstance(d, dict)]
    assert {"pip", "python =3.12"} <= {d for d in spec["dependencies"] if isinstance(d, str)}
    return pip


def test_every_rule_names_an_env_file_that_installs_this_checkout() -> None:
    rules = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "rules").glob("*.smk")))
    named = set(re.findall(r'"\.\./(envs/[\w-]+\.yaml)"', rules))
    assert named == {p.relative_to(REPO).as_posix() for p in ENVS} == {"envs/quantbench.yaml", "envs/vllm.yaml"}
    assert len(re.findall(r"^\s*rule \w+:", rules, re.M)) == len(re.findall(r"^\s*conda:", rules, re.M)) == 8
    for env in ENVS:
        assert _pip_lines(env)[-1] == "--editable ${QUANTBENCH_ROOT}", env.name
    assert "os.environ.update(QUANTBENCH_ROOT=workflow.basedir)" in (REPO / "Snakefile").read_text(encoding="utf-8")


@pytest.mark.parametrize("env", ENVS, ids=[p.stem for p in ENVS])
def test_pip_run_as_conda_runs_it_finds_the_checkout(env: Path, tmp_path: Path) -> None:
    """Snakemake copies the env file into its conda prefix and conda runs pip there on a requirements file of the
    pip section; a path relative to envs/ would miss the checkout, the variable the Snakefile sets does not."""
    prefix = tmp_path / ".snakemake" / "conda"  # where Snakemake puts the copy: no checkout around it
    prefix.mkdir(parents=True)
    requirements = prefix / "condaenv.requirements.txt"
    requirements.write_text(_pip_lines(env)[-1] + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--no-index",
         "-r", requirements.name],
        cwd=prefix, env={**os.environ, "QUANTBENCH_ROOT": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Would install quantbench-" in proc.stdout
