"""The HumanEval sandbox: each program runs in its own process, temporary directory and session, with
a scrubbed environment, no network, resource limits and a wall timeout that kills its process group."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from quantbench.evaluate.benchmarks import SandboxLimits
from quantbench.evaluate.sandbox import network_namespace_prefix, run_program

LIMITS = SandboxLimits(timeout_s=5.0, memory_mb=512, output_kb=256)


def test_passing_failing_and_exit_codes() -> None:
    assert run_program("assert sum([1, 2]) == 3\n", LIMITS).passed
    failed = run_program("def f():\n    return 1\nassert f() == 2, 'wrong'\n", LIMITS)
    assert (failed.status, failed.returncode) == ("failed", 1)
    assert "AssertionError: wrong" in failed.stderr_tail
    assert run_program("raise SystemExit(3)\n", LIMITS).returncode == 3


def test_runs_in_another_process_in_a_temporary_directory_that_is_removed(tmp_path: Path) -> None:
    report = tmp_path / "report"
    code = (
        "import os\n"
        f"open({str(report)!r}, 'w').write(f'{{os.getpid()}} {{os.getcwd()}}')\n"
        "assert sorted(os.listdir('.')) == ['prelude.py', 'program.py', 'stderr', 'stdout']\n"
        "assert os.environ['HOME'] == os.getcwd()\n"
    )
    assert run_program(code, LIMITS).passed
    pid, cwd = report.read_text().split(" ", 1)
    assert int(pid) != os.getpid()
    assert "quantbench-sandbox-" in cwd and not Path(cwd).exists()


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QB_TEST_SECRET", "hunter2")
    code = "import os\nassert 'QB_TEST_SECRET' not in os.environ\nassert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'PYTHONHASHSEED', 'LC_CTYPE'}\n"
    verdict = run_program(code, LIMITS)
    assert verdict.passed, verdict.stderr_tail


def test_sockets_are_refused() -> None:
    verdict = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", LIMITS)
    assert verdict.status == "failed"
    assert "network access is disabled in the quantbench sandbox" in verdict.stderr_tail


def test_network_namespace_has_only_loopback() -> None:
    if not network_namespace_prefix():
        pytest.skip("'unshare --net' is not permitted on this machine (the socket guard still applies)")
    code = "import socket\nnames = [n for _, n in socket.if_nameindex()]\nassert names == ['lo'], names\n"
    verdict = run_program(code, LIMITS)
    assert verdict.passed, verdict.stderr_tail


def test_memory_and_file_size_limits() -> None:
    memory = run_program("x = bytearray(1024 * 1024 * 1024)\n", LIMITS)
    assert memory.status == "failed" and "MemoryError" in memory.stderr_tail
    big = run_program("open('big', 'wb').write(b'x' * (1024 * 1024))\n", LIMITS)
    assert big.status == "failed" and "File too large" in big.stderr_tail


def test_timeout_kills_the_program_and_its_children(tmp_path: Path) -> None:
    marker = tmp_path / "child-survived"
    child = f"import time; time.sleep(2); open({str(marker)!r}, 'w')"
    code = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nwhile True:\n    pass\n"
    started = time.monotonic()
    verdict = run_program(code, SandboxLimits(timeout_s=1.0, memory_mb=512, output_kb=256))
    assert verdict.status == "timeout" and verdict.returncode is None
    assert time.monotonic() - started < 4.0
    time.sleep(2.5)
    assert not marker.exists()
