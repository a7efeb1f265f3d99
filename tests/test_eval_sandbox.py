"""The HumanEval sandbox: each program runs in its own process, temporary directory and session, with
a scrubbed environment, no network, resource limits and a wall timeout that kills its process group; as
root (where the suite and cluster jobs run), a read-only file system but for its directory and a user id
of its own. The escape tests try for real: writing outside, forking without bound, reaching a server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from quantbench.evaluate.benchmarks import SandboxLimits
from quantbench.evaluate.sandbox import MAX_PROCESSES, isolation, probe_isolation, run_program

LIMITS = SandboxLimits(timeout_s=5.0, memory_mb=512, output_kb=256)


def test_passing_failing_and_exit_codes() -> None:
    assert run_program("assert sum([1, 2]) == 3\n", LIMITS).passed
    failed = run_program("def f():\n    return 1\nassert f() == 2, 'wrong'\n", LIMITS)
    assert (failed.status, failed.returncode) == ("failed", 1)
    assert "AssertionError: wrong" in failed.stderr_tail
    assert run_program("raise SystemExit(3)\n", LIMITS).returncode == 3


def test_runs_in_another_process_in_a_temporary_directory_that_is_removed() -> None:
    code = (
        "import os, sys\n"
        "print(os.getpid(), os.getcwd(), file=sys.stderr)\n"
        "assert sorted(os.listdir('.')) == ['prelude.py', 'program.py', 'stderr', 'stdout']\n"
        "assert os.environ['HOME'] == os.getcwd()\n"
    )
    verdict = run_program(code, LIMITS)
    assert verdict.passed, verdict.stderr_tail
    pid, cwd = verdict.stderr_tail.strip().split(" ", 1)
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
    if not probe_isolation().prefix:
        pytest.skip("'unshare --net' is not permitted on this machine (the socket guard still applies)")
    code = "import socket\nnames = [n for _, n in socket.if_nameindex()]\nassert names == ['lo'], names\n"
    verdict = run_program(code, LIMITS)
    assert verdict.passed, verdict.stderr_tail


def test_memory_and_file_size_limits() -> None:
    memory = run_program("x = bytearray(1024 * 1024 * 1024)\n", LIMITS)
    assert memory.status == "failed" and "MemoryError" in memory.stderr_tail
    big = run_program("open('big', 'wb').write(b'x' * (1024 * 1024))\n", LIMITS)
    assert big.status == "failed" and "File too large" in big.stderr_tail


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_the_program_and_its_children() -> None:
    child = "import time; time.sleep(30)"
    code = (
        "import subprocess, sys\n"
        f"print(subprocess.Popen([sys.executable, '-c', {child!r}]).pid, file=sys.stderr, flush=True)\n"
        "while True:\n    pass\n"
    )
    started = time.monotonic()
    verdict = run_program(code, SandboxLimits(timeout_s=1.0, memory_mb=512, output_kb=256))
    assert verdict.status == "timeout" and verdict.returncode is None
    assert time.monotonic() - started < 4.0
    child_pid = int(verdict.stderr_tail.split()[0])
    assert not alive(child_pid)


# --- escapes, tried for real -------------------------------------------------------------------------

needs_full = pytest.mark.skipif(
    probe_isolation().name != "full",
    reason="full isolation needs root and unshare with mount namespaces (not permitted on this machine)",
)


def report_of(verdict) -> dict:
    """The JSON report a program printed as its last stderr line."""
    assert verdict.passed, verdict.stderr_tail
    return json.loads(verdict.stderr_tail.strip().splitlines()[-1])


@needs_full
def test_generated_code_cannot_write_outside_its_directory() -> None:
    open_dir = Path(tempfile.mkdtemp(prefix="qb-world-writable-", dir="/tmp"))
    open_dir.chmod(0o777)  # permissions would let anyone write here: only the read-only mount stands in the way
    targets = [
        open_dir / "escape",
        Path("/tmp") / f"qb-escape-{os.getpid()}",
        Path("/dev/shm") / f"qb-escape-{os.getpid()}",
        Path("/var/tmp") / f"qb-escape-{os.getpid()}",
        Path(__file__).with_name("qb-escape"),
    ]
    code = f"""
import ctypes, json, os, sys
report = {{}}
for path in {[str(t) for t in targets]!r} + ["own"]:
    try:
        with open(path, "w") as handle:
            handle.write("escaped")
        report[path] = "written"
    except OSError as exc:
        report[path] = exc.strerror
for name, attempt in [("setuid(0)", lambda: os.setuid(0)), ("chmod /tmp", lambda: os.chmod("/tmp", 0o777)),
                      ("unlink /etc/hostname", lambda: os.unlink("/etc/hostname"))]:
    try:
        attempt()
        report[name] = "done"
    except OSError as exc:
        report[name] = exc.strerror
libc = ctypes.CDLL(None, use_errno=True)
failed = libc.mount(None, b"/", None, 32 | 1, None)  # MS_REMOUNT | MS_RDONLY cleared: read-write again
report["remount / rw"] = os.strerror(ctypes.get_errno()) if failed else "done"
report["uid"] = os.getuid()
print(json.dumps(report), file=sys.stderr)
"""
    report = report_of(run_program(code, LIMITS))
    assert report.pop("own") == "written"
    assert report.pop(str(targets[0])) == "Read-only file system"
    assert 0 < report.pop("uid") != os.getuid()
    for path in targets[1:]:
        assert report.pop(str(path)) in {"Read-only file system", "Permission denied"}, path
    assert not any(path.exists() for path in targets)
    assert report == {
        "setuid(0)": "Operation not permitted",
        "chmod /tmp": "Read-only file system",
        "unlink /etc/hostname": "Read-only file system",
        "remount / rw": "Operation not permitted",
    }
    assert Path("/etc/hostname").exists()
    open_dir.rmdir()


@needs_full
def test_generated_code_cannot_fork_without_bound() -> None:
    code = """
import json, os, sys, time
children = []
for _ in range(64):  # a fork bomb, bounded at 64 tries; each child sleeps (and tries to leave the session)
    try:
        pid = os.fork()
    except OSError as exc:
        error = exc.strerror
        break
    if pid == 0:
        os.setsid()
        time.sleep(30)
        os._exit(0)
    children.append(pid)
print(json.dumps({"forked": children, "error": error, "uid": os.getuid()}), file=sys.stderr)
"""
    report = report_of(run_program(code, LIMITS))
    assert len(report["forked"]) == MAX_PROCESSES - 1 and report["error"] == "Resource temporarily unavailable"
    # the children left the session, so the process-group kill missed them: the user's kill did not
    assert not any(alive(pid) for pid in report["forked"])
    listed = subprocess.run(["ps", "-e", "-o", "uid=,stat=,pid=,ppid=,args="], capture_output=True, text=True).stdout
    left = [line for line in listed.splitlines() if line.split()[0] == str(report["uid"])]
    assert all(line.split()[1].startswith("Z") for line in left), left  # killed; a zombie until reaped


def host_addresses() -> list[str]:
    """This machine's IPv4 addresses, loopback first."""
    done = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True)
    return [line.split()[3].split("/")[0] for line in done.stdout.splitlines()] or ["127.0.0.1"]


def test_generated_code_cannot_reach_the_network() -> None:
    """A server listens on every address of this machine; the program connects with the raw _socket module
    (past the socket guard) and finds no route, and the server sees no one."""
    if not probe_isolation().prefix:
        pytest.skip("no network namespace on this machine: only the socket guard, which raw sockets pass")
    server = socket.create_server(("0.0.0.0", 0))
    port = server.getsockname()[1]
    accepted = []
    server.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[1])
            except TimeoutError:
                continue

    stop = threading.Event()
    thread = threading.Thread(target=serve)
    thread.start()
    addresses = host_addresses()
    code = f"""
import _socket, json, sys
report = {{}}
for address in {addresses!r}:
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect((address, {port}))
        report[address] = "connected"
    except OSError as exc:
        report[address] = exc.strerror or str(exc)
print(json.dumps(report), file=sys.stderr)
"""
    try:
        control = socket.create_connection(("127.0.0.1", port), timeout=2)  # the server answers from here
        control.close()
        time.sleep(0.5)
        report = report_of(run_program(code, LIMITS))
    finally:
        stop.set()
        thread.join()
        server.close()
    assert len(accepted) == 1  # the control connection only
    assert set(report) == set(addresses) and "connected" not in report.values(), report


def test_the_standard_library_is_readable() -> None:
    """Whatever the isolation hides, generated code still imports the standard library (else every program
    would fail and the score would be silently wrong)."""
    code = (
        "import bisect, collections, datetime, decimal, fractions, functools, hashlib, heapq, itertools, json, math\n"
        "import random, re, statistics, string, subprocess, typing\n"
        "assert math.comb(5, 2) == 10 and statistics.median([3, 1, 2]) == 2\n"
    )
    verdict = run_program(code, LIMITS)
    assert verdict.passed, verdict.stderr_tail


def test_isolation_is_recorded() -> None:
    recorded = isolation()
    assert recorded["level"] == probe_isolation().name
    if recorded["level"] == "full":
        assert recorded["filesystem"] == "read-only but its directory, own user id"
