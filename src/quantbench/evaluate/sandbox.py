"""Run generated programs (HumanEval) outside the workflow's process, and score pass@1.

Each program runs in a fresh ``python -I -S`` process (stdlib only) in its own temporary directory (also its HOME and
TMPDIR), with a scrubbed environment, in a new session whose whole process group is killed at the wall
timeout. A prelude, executed before the program, sets hard resource limits (CPU seconds, address space,
file size, process count, core dumps) and replaces the socket module's constructors so the program
cannot open connections; where ``unshare`` can create a network namespace, the process also runs
without any network interface. stdout and stderr go to files in the temporary directory (bounded by the
file-size limit), never into this process's memory. Note: the kernel does not apply the process-count
limit to root; the wall timeout and the process-group kill still bound a program that forks.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from quantbench.evaluate.benchmarks import SandboxLimits

log = logging.getLogger(__name__)

PASSED, FAILED, TIMEOUT = "passed", "failed", "timeout"

# Runs first in the child: limits, then no sockets, then the program (argv[1]) as __main__.
_PRELUDE = """\
import json, resource, socket, sys
_limits = json.loads(sys.argv[2])
for _name, _value in _limits.items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the quantbench sandbox")
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _no_network
socket.getaddrinfo = socket.create_server = _no_network
_path = sys.argv[1]
sys.argv = [_path]
with open(_path, encoding="utf-8") as _handle:
    _code = compile(_handle.read(), _path, "exec")
exec(_code, {"__name__": "__main__", "__file__": _path, "__builtins__": __builtins__})
"""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one program: ``passed`` (exit 0), ``failed`` or ``timeout``, and stderr's tail."""

    status: str
    returncode: int | None
    stderr_tail: str

    @property
    def passed(self) -> bool:
        return self.status == PASSED


@functools.cache
def network_namespace_prefix() -> tuple[str, ...]:
    """``unshare`` arguments that give the child an empty network namespace, or () where that fails."""
    unshare = shutil.which("unshare")
    if unshare is None:
        log.warning("sandbox: no 'unshare' command; relying on the socket guard for network isolation")
        return ()
    for prefix in ((unshare, "--net"), (unshare, "--map-root-user", "--net")):
        probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return prefix
    log.warning("sandbox: 'unshare --net' is not permitted here; relying on the socket guard")
    return ()


def isolation() -> dict[str, Any]:
    """How programs are isolated on this machine (recorded in results)."""
    return {
        "process": "python -I -S, own session, scrubbed env, temporary cwd",
        "network": "namespace+socket-guard" if network_namespace_prefix() else "socket-guard",
        "rlimits": ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE"],
    }


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    return {
        "RLIMIT_CPU": math.ceil(limits.timeout_s),
        "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
        "RLIMIT_FSIZE": limits.output_kb * 1024,
        "RLIMIT_NPROC": 1,
        "RLIMIT_CORE": 0,
    }


def run_program(source: str, limits: SandboxLimits) -> Verdict:
    """Run ``source`` as a Python program in the sandbox; a zero exit status within the limits passes."""
    with tempfile.TemporaryDirectory(prefix="quantbench-sandbox-") as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(source, encoding="utf-8")
        (work / "prelude.py").write_text(_PRELUDE, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        argv = [
            *network_namespace_prefix(),
            sys.executable,
            "-I",
            "-S",
            "prelude.py",
            "program.py",
            json.dumps(_rlimits(limits)),
        ]
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
            try:
                returncode: int | None = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(proc)
        stderr_tail = (work / "stderr").read_bytes()[-2000:].decode("utf-8", errors="replace")
    if returncode is None:
        return Verdict(TIMEOUT, None, stderr_tail)
    return Verdict(PASSED if returncode == 0 else FAILED, returncode, stderr_tail)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def complete_programs(resps: Iterable[Sequence[str]], docs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """lm-eval filter for HumanEval: each completion appended to its problem's prompt (the function)."""
    return [[doc["prompt"] + completion for completion in completions] for completions, doc in zip(resps, docs)]


def humaneval_program(candidate: str, test: str) -> str:
    """The program that checks one candidate: the completed function, then the problem's test code."""
    return candidate + "\n" + test


def score_programs(
    candidates: Sequence[str], tests: Sequence[str], limits: SandboxLimits
) -> list[Verdict]:
    """Run every candidate against its test (greedy, one sample each: pass@1 is the pass rate)."""
    if len(candidates) != len(tests):
        raise ValueError(f"{len(candidates)} candidates but {len(tests)} tests")
    programs = [humaneval_program(c, t) for c, t in zip(candidates, tests)]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        runs = pool.map(functools.partial(run_program, limits=limits), programs)
        return list(tqdm(runs, total=len(programs), desc="sandbox", unit="program"))
