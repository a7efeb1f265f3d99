"""Run generated programs (HumanEval) outside the workflow's process, and score pass@1.

Each program runs in a fresh ``python -I -S`` process (stdlib only) in its own temporary directory (also its
HOME and TMPDIR), with a scrubbed environment, in a new session whose process group is killed at the wall
timeout. A prelude, executed before the program, sets hard resource limits (CPU seconds, address space,
file size, processes, core dumps) and replaces the socket module's constructors. How much more holds
depends on what this machine allows (:func:`isolation`, probed once and recorded in the results):

* as root, where ``unshare`` can create mount and network namespaces (``full``): the prelude, still
  root inside the new namespaces, makes every mount read-only and nosuid except the program's own
  directory (a directory on the way to Python's standard library that other users cannot enter, such as
  /root under a pyenv install, is first replaced by an empty one that shows only the library), sets
  no-new-privileges, and drops to a user id of its own (no groups; one fresh id per program, so programs
  cannot signal, trace or read each other). The process limit then binds (the kernel
  does not apply it to root), the program can write nowhere but its directory, and it has no network
  interface but a loopback that is down. Processes of that user left at the end are killed.
* otherwise, an empty network namespace where ``unshare`` allows one (also unprivileged, through a user
  namespace), else the socket guard alone; files as the calling user may write them.

stdout and stderr go to files in the temporary directory (bounded by the file-size limit), never into this
process's memory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from quantbench.evaluate.benchmarks import SandboxLimits

log = logging.getLogger(__name__)

PASSED, FAILED, TIMEOUT = "passed", "failed", "timeout"
MAX_PROCESSES = 4  # the program and up to three children, threads included (RLIMIT_NPROC)
USER_IDS = (1_900_000_000, 2_000_000_000)  # a fresh id per program, from a range no account uses

# Runs first in the child: the mounts and the user switch (full isolation, still root in the new
# namespaces), limits, no sockets, then the program (argv[1]) as __main__. argv[2]: the settings.
# Mounts, in order: nothing propagates to the host; the program's directory becomes a mount of its own; a
# directory on the way to Python's standard library that others cannot enter (e.g. /root of a pyenv
# install) is covered by an empty tmpfs re-exposing only the library (also hiding the rest of it); then
# every mount but the program's directory is made read-only and nosuid.
_PRELUDE = r"""
import ctypes, json, os, re, resource, socket, sys
_settings = json.loads(sys.argv[2])
if _settings["readonly_except"] is not None:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    def _mount(target, flags, source=None, fstype=None, data=None):
        if _libc.mount(source and source.encode(), target.encode(), fstype, flags, data) != 0:
            _errno = ctypes.get_errno()
            raise OSError(_errno, f"sandbox: mount flags {flags:#x} on {target}: {os.strerror(_errno)}")
    _own = _settings["readonly_except"]
    _mount("/", 1 << 14 | 1 << 18)  # MS_REC | MS_PRIVATE
    _mount(_own, 1 << 12, _own)  # MS_BIND
    _library = sys.base_prefix
    _parts = _library.split("/")
    _closed = next(("/".join(_parts[:i]) for i in range(2, len(_parts)) if not os.stat("/".join(_parts[:i])).st_mode & 1), None)
    if _closed is not None:
        _fd = os.open(_library, os.O_PATH | os.O_DIRECTORY)
        _mount(_closed, 2 | 4, "tmpfs", b"tmpfs", b"mode=755")  # MS_NOSUID | MS_NODEV
        os.makedirs(_library, mode=0o755)
        _mount(_library, 1 << 12 | 1 << 14, f"/proc/self/fd/{_fd}")  # MS_BIND | MS_REC
        os.close(_fd)
    for _line in open("/proc/self/mountinfo", encoding="utf-8").read().splitlines():
        _fields = _line.split()
        _point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), _fields[4])
        if _point == _own:
            continue
        _keep = {"nodev": 4, "noexec": 8}
        # MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, keeping nodev and noexec
        _mount(_point, 32 | 1 << 12 | 1 | 2 | sum(v for k, v in _keep.items() if k in _fields[5].split(",")))
    os.chdir(_own)  # the old working directory is the read-only mount below the new one
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
if _settings["user"] is not None:
    os.setgroups([])
    os.setgid(_settings["user"])
    os.setuid(_settings["user"])
for _name, _value in _settings["rlimits"].items():
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
# What a probe imports: the standard library must be readable by the program's user.
_PROBE = "import collections, functools, hashlib, heapq, itertools, math, re, string, subprocess, typing\n"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one program: ``passed`` (exit 0), ``failed`` or ``timeout``, and stderr's tail."""

    status: str
    returncode: int | None
    stderr_tail: str

    @property
    def passed(self) -> bool:
        return self.status == PASSED


@dataclass(frozen=True)
class Isolation:
    """How programs run here: the ``unshare`` prefix, whether the file system is read-only but for the
    program's directory and the program runs as a user of its own, and a one-word name."""

    prefix: tuple[str, ...]
    private_files: bool
    name: str


NO_ISOLATION = Isolation((), False, "socket-guard")


@functools.cache
def probe_isolation() -> Isolation:
    """The strongest isolation this machine allows (module docstring): each candidate runs a trivial
    program, and the first that passes is used."""
    unshare = shutil.which("unshare")
    candidates = []
    if unshare is not None and os.geteuid() == 0:
        candidates.append(Isolation((unshare, "--mount", "--net"), True, "full"))
    if unshare is not None:
        candidates += [
            Isolation((unshare, "--net"), False, "network-namespace"),
            Isolation((unshare, "--map-root-user", "--net"), False, "network-namespace"),
        ]
    for candidate in candidates:
        verdict = _run(candidate, _PROBE, SandboxLimits(timeout_s=30.0))
        if verdict.passed:
            return candidate
        log.warning(
            "sandbox: %s isolation fails here (%s); trying less", candidate.name, verdict.stderr_tail.strip()[-300:]
        )
    log.warning("sandbox: no namespace can be created here; relying on the socket guard, files unprotected")
    return NO_ISOLATION


def isolation() -> dict[str, Any]:
    """How programs are isolated on this machine (recorded in results)."""
    chosen = probe_isolation()
    return {
        "process": "python -I -S, own session, scrubbed env, temporary cwd",
        "level": chosen.name,
        "network": "namespace+socket-guard" if chosen.prefix else "socket-guard",
        "filesystem": "read-only but its directory, own user id" if chosen.private_files else "the caller's user",
        "rlimits": ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE"],
    }


def _rlimits(limits: SandboxLimits) -> dict[str, int]:
    return {
        "RLIMIT_CPU": math.ceil(limits.timeout_s),
        "RLIMIT_AS": limits.memory_mb * 1024 * 1024,
        "RLIMIT_FSIZE": limits.output_kb * 1024,
        "RLIMIT_NPROC": MAX_PROCESSES,
        "RLIMIT_CORE": 0,
    }


def run_program(source: str, limits: SandboxLimits) -> Verdict:
    """Run ``source`` as a Python program in the sandbox; a zero exit status within the limits passes."""
    return _run(probe_isolation(), source, limits)


def _run(isolation: Isolation, source: str, limits: SandboxLimits) -> Verdict:
    with tempfile.TemporaryDirectory(prefix="quantbench-sandbox-") as tmp:
        work = Path(tmp).resolve()
        (work / "program.py").write_text(source, encoding="utf-8")
        (work / "prelude.py").write_text(_PRELUDE, encoding="utf-8")
        user = random.SystemRandom().randrange(*USER_IDS) if isolation.private_files else None
        if user is not None:
            os.chown(work, user, user)
        settings = {
            "rlimits": _rlimits(limits),
            "readonly_except": str(work) if isolation.private_files else None,
            "user": user,
        }
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
        }
        argv = [*isolation.prefix, sys.executable, "-I", "-S", "prelude.py", "program.py", json.dumps(settings)]
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
            try:
                returncode: int | None = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(proc)
                if user is not None:
                    _kill_user(user)
        stderr_tail = (work / "stderr").read_bytes()[-2000:].decode("utf-8", errors="replace")
    if returncode is None:
        return Verdict(TIMEOUT, None, stderr_tail)
    return Verdict(PASSED if returncode == 0 else FAILED, returncode, stderr_tail)


def _kill_user(user: int) -> None:
    """SIGKILL every process of ``user`` (children that left the program's session), from a process of that user."""
    for _ in range(2):  # a second pass for any forked while the first one ran
        subprocess.run(["kill", "-KILL", "-1"], user=user, group=user, extra_groups=[], capture_output=True, timeout=30)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def complete_programs(resps: Iterable[Sequence[str]], docs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """lm-eval filter for HumanEval: each completion appended to its problem's prompt (the function)."""
    return [[doc["prompt"] + completion for completion in completions] for completions, doc in zip(resps, docs)]


def humaneval_program(candidate: str, test: str) -> str:
    """The program that checks one candidate: the completed function, then the problem's test code."""
    return candidate + "\n" + test


def score_programs(candidates: Sequence[str], tests: Sequence[str], limits: SandboxLimits) -> list[Verdict]:
    """Run every candidate against its test (greedy, one sample each: pass@1 is the pass rate)."""
    if len(candidates) != len(tests):
        raise ValueError(f"{len(candidates)} candidates but {len(tests)} tests")
    programs = [humaneval_program(c, t) for c, t in zip(candidates, tests)]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        runs = pool.map(functools.partial(run_program, limits=limits), programs)
        return list(tqdm(runs, total=len(programs), desc="sandbox", unit="program"))
