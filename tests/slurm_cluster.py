"""A throwaway single-node SLURM cluster on localhost, for the profile tests (issue 9).

Owns: installing Debian's packages (slurmctld, slurmd, slurm-client, munge, slurmdbd, mariadb-server) when
they are missing, writing /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf, starting munged, MariaDB,
slurmdbd, slurmctld and slurmd as foreground child processes, waiting until the node is idle, and stopping
exactly those processes (by PID) afterwards. Nothing uses systemd or cgroups.

Everything the daemons write lives under STATE_DIR, fresh for every start. MariaDB listens on its own
socket and a free TCP port, so a system MariaDB, if any, is left alone; munged must serve the default
socket (/run/munge), so a munged already answering there is used as it is. The configuration must sit
at /etc/slurm/slurm.conf: the executor plugin's job step strips SLURM_* variables, so SLURM_CONF would
not reach its inner srun. A slurm.conf without this module's marker line belongs to someone else: the
cluster then refuses to start. One cluster per machine: a second test session waits for the first.

Where the cluster cannot exist here (not root, not Linux, no apt-get, a failed install, a foreign
slurm.conf, SLURM ports taken) `start()` raises `ClusterUnavailable`, which the tests turn into a skip;
a daemon that fails to come up is a real failure and raises `RuntimeError` with its log.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
BINARIES = (
    "munged",
    "mariadbd",
    "mariadb-install-db",
    "mariadb",
    "slurmdbd",
    "slurmctld",
    "slurmd",
    "sbatch",
    "sacct",
    "sinfo",
    "scontrol",
    "scancel",
    "squeue",
)
CONF_DIR = Path("/etc/slurm")
STATE_DIR = Path("/var/tmp/quantbench-slurm")
LOCK_FILE = Path("/var/tmp/quantbench-slurm.lock")
MARKER = "# Written by quantbench's tests/slurm_cluster.py for a throwaway test cluster; removed on stop."
SLURM_PORTS = {"slurmctld": 6817, "slurmd": 6818, "slurmdbd": 6819}
STOP_ORDER = ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged")
APT_TIMEOUT_S = 600
LOCK_WAIT_S = 900
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


class ClusterUnavailable(Exception):
    """This machine cannot host the test cluster; the message says why (the tests skip with it)."""


def _run(cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def install_packages() -> float:
    """apt-get the packages if any binary is missing; return the seconds spent (0 when nothing to do).

    A policy-rc.d that denies service starts is put in place for the install (and removed afterwards,
    if this function created it), so the packages' init scripts start nothing: the cluster owns its daemons.
    """
    if not missing_binaries():
        return 0.0
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"SLURM binaries {missing_binaries()} are missing and there is no apt-get")
    policy = Path("/usr/sbin/policy-rc.d")
    created_policy = not policy.exists()
    if created_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    start = time.monotonic()
    try:
        for cmd in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=120", "--no-install-recommends", *PACKAGES],
        ):
            try:
                done = _run(cmd, timeout=APT_TIMEOUT_S, env=env)
            except subprocess.TimeoutExpired:
                raise ClusterUnavailable(f"`{' '.join(cmd)}` took over {APT_TIMEOUT_S} s") from None
            if done.returncode != 0:
                raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
    finally:
        if created_policy:
            policy.unlink()
    if missing_binaries():
        raise ClusterUnavailable(f"installed {PACKAGES} but {missing_binaries()} are still missing")
    return time.monotonic() - start


def _munge_works() -> bool:
    """True when a credential encoded through MUNGE_SOCKET decodes again."""
    try:
        cred = _run(["munge", "-n", f"--socket={MUNGE_SOCKET}"], timeout=10)
        return (
            cred.returncode == 0
            and _run(["unmunge", f"--socket={MUNGE_SOCKET}"], input=cred.stdout, timeout=10).returncode == 0
        )
    except subprocess.TimeoutExpired:
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(what: str, ready, timeout: float, logs: list[Path], procs: list[subprocess.Popen]) -> None:
    """Poll ready() until true; fail with the tail of the given logs when a process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            reason = f"exited with status {dead[0].returncode}" if dead else f"not ready after {timeout:.0f} s"
            tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.exists())
            raise RuntimeError(f"{what} {reason}\n{tails}")
        time.sleep(0.2)


@dataclass
class SlurmCluster:
    """One node (this host) with two partitions on it: `cpu` (the default) and `gpu`.

    The node declares `cpus` CPUs and `real_memory_mb` of memory whatever the machine has
    (SlurmdParameters=config_overrides; without cgroups nothing enforces them), so that the tests'
    jobs run side by side, and alike on any machine. It has no GPUs; GresTypes=gpu is declared so that
    a GPU request is understood, recorded in accounting, and refused.
    """

    state_dir: Path = STATE_DIR
    cpus: int = 8
    partitions: tuple[str, ...] = ("cpu", "gpu")
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    real_memory_mb: int = 64000
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    install_seconds: float = 0.0
    start_seconds: float = 0.0
    _lock: object | None = field(default=None, repr=False)

    # ----------------------------------------------------------------------------------------------- start

    def start(self) -> SlurmCluster:
        if os.name != "posix" or not Path("/proc").is_dir():
            raise ClusterUnavailable("the test cluster needs Linux")
        if os.geteuid() != 0:
            raise ClusterUnavailable("the test cluster needs root (it installs packages and writes /etc/slurm)")
        self._acquire_lock()
        try:
            self.install_seconds = install_packages()
            began = time.monotonic()
            self._stop_leftovers()
            self._check_free()
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)
            for sub in ("log", "ctld", "slurmd", "munge", "mysql", "mysql-run", "run"):
                (self.state_dir / sub).mkdir(parents=True)
            self._start_munge()
            db_port = self._start_mariadb()
            self._write_configs(db_port)
            self._start_slurm()
            self.start_seconds = time.monotonic() - began
        except BaseException:
            self.stop()
            raise
        log.info("test cluster up in %.1f s (install %.1f s)", self.start_seconds, self.install_seconds)
        return self

    def _acquire_lock(self) -> None:
        """One cluster per machine: a second test session waits for the first one to stop its cluster."""
        handle = open(LOCK_FILE, "w")  # noqa: SIM115 - held open while the cluster runs: closing drops the lock
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    raise ClusterUnavailable(
                        f"another test session held {LOCK_FILE} (its test cluster) for over {LOCK_WAIT_S} s"
                    ) from None
                time.sleep(1)
        self._lock = handle

    def _pid_file(self) -> Path:
        return self.state_dir / "run" / "started.pids"

    def _stop_leftovers(self) -> None:
        """Stop daemons that an earlier, killed session of this module started (recorded in its PID file)."""
        pid_file = self._pid_file()
        if not pid_file.exists():
            return
        for line in pid_file.read_text().split("\n"):
            if not line:
                continue
            name, pid = line.split()
            cmdline = Path(f"/proc/{pid}/cmdline")
            if cmdline.exists() and name in cmdline.read_bytes().decode(errors="replace"):
                log.warning("stopping leftover %s (pid %s) from an earlier session", name, pid)
                _terminate(int(pid))
        pid_file.unlink()

    def _check_free(self) -> None:
        conf = CONF_DIR / "slurm.conf"
        if conf.exists() and MARKER not in conf.read_text(errors="replace"):
            raise ClusterUnavailable(f"{conf} exists and was not written by this test fixture; not touching it")
        for daemon, port in SLURM_PORTS.items():
            if _port_in_use(port):
                raise ClusterUnavailable(f"port {port} ({daemon}) is already in use on this machine")

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        with open(self.state_dir / "log" / f"{name}.out", "wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
            )
        self.processes[name] = proc
        with open(self._pid_file(), "a") as handle:
            handle.write(f"{name} {proc.pid}\n")
        return proc

    def _start_munge(self) -> None:
        """Use the munged already serving MUNGE_SOCKET, if any; otherwise start one as the munge user.

        The socket must be the default one: slurmctld's connection to slurmdbd ignores AuthInfo=socket=.
        """
        if MUNGE_SOCKET.exists() and _munge_works():
            log.info("using the munged already listening on %s", MUNGE_SOCKET)
            return
        munge_dir = self.state_dir / "munge"
        key = munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        MUNGE_SOCKET.parent.mkdir(mode=0o755, exist_ok=True)
        for path in (munge_dir, key, MUNGE_SOCKET.parent):
            shutil.chown(path, "munge", "munge")
        munge_dir.chmod(0o700)
        proc = self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={MUNGE_SOCKET}",
                f"--key-file={key}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--pid-file={MUNGE_SOCKET.parent / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            user="munge",
            group="munge",
        )
        _wait("munged", _munge_works, 15, [munge_dir / "munged.log", self.state_dir / "log" / "munged.out"], [proc])

    def _start_mariadb(self) -> int:
        data, run = self.state_dir / "mysql", self.state_dir / "mysql-run"
        for path in (data, run):
            shutil.chown(path, "mysql", "mysql")
        sock = run / "mysqld.sock"
        base = [
            "--no-defaults",
            f"--datadir={data}",
            "--user=mysql",
            "--innodb-log-file-size=8M",
            "--innodb-buffer-pool-size=32M",
        ]
        done = _run(
            ["mariadb-install-db", *base, "--auth-root-authentication-method=socket", "--skip-test-db"], timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        port = _free_port()
        err_log = self.state_dir / "log" / "mariadb.err"
        proc = self._spawn(
            "mariadbd",
            [
                "mariadbd",
                *base,
                f"--socket={sock}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                f"--pid-file={run / 'mysqld.pid'}",
                f"--log-error={err_log}",
            ],
        )
        client = ["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root"]
        _wait("mariadbd", lambda: _run([*client, "-e", "SELECT 1"]).returncode == 0, 60, [err_log], [proc])
        self._db_password = secrets.token_hex(16)
        sql = (
            f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password}'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        done = _run([*client, "-e", sql])
        if done.returncode != 0:
            raise RuntimeError(f"creating the slurm database user failed: {done.stderr}")
        return port

    def _write_configs(self, db_port: int) -> None:
        s = self.state_dir
        auth = "AuthType=auth/munge\n"
        nodes = (
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN\n"
        )
        parts = "".join(
            f"PartitionName={name} Nodes={self.node} Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE State=UP\n"
            for i, name in enumerate(self.partitions)
        )
        slurm_conf = (
            f"{MARKER}\nClusterName=quantbench\nSlurmctldHost={self.node}(127.0.0.1)\n"
            "SlurmUser=root\nSlurmdUser=root\n" + auth + "CredType=cred/munge\n"
            f"SlurmctldPort={SLURM_PORTS['slurmctld']}\nSlurmdPort={SLURM_PORTS['slurmd']}\n"
            f"StateSaveLocation={s / 'ctld'}\nSlurmdSpoolDir={s / 'slurmd'}\n"
            f"SlurmctldPidFile={s / 'run' / 'slurmctld.pid'}\nSlurmdPidFile={s / 'run' / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={s / 'log' / 'slurmctld.log'}\nSlurmdLogFile={s / 'log' / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\nGresTypes=gpu\nAccountingStorageTRES=gres/gpu\nDefMemPerCPU=1000\n"
            "MpiDefault=none\nReturnToService=2\nSlurmdParameters=config_overrides\nSchedulerType=sched/backfill\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
            f"AccountingStoragePort={SLURM_PORTS['slurmdbd']}\nAccountingStoreFlags=job_comment\n" + nodes + parts
        )
        dbd_conf = (
            f"{MARKER}\n" + auth + f"DbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={SLURM_PORTS['slurmdbd']}\n"
            "SlurmUser=root\nStorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={db_port}\nStorageUser=slurm\nStoragePass={self._db_password}\n"
            f"StorageLoc=slurm_acct_db\nPidFile={s / 'run' / 'slurmdbd.pid'}\nLogFile={s / 'log' / 'slurmdbd.log'}\n"
        )
        CONF_DIR.mkdir(parents=True, exist_ok=True)
        (CONF_DIR / "slurm.conf").write_text(slurm_conf)
        dbd = CONF_DIR / "slurmdbd.conf"
        dbd.write_text(dbd_conf)
        dbd.chmod(0o600)

    def _start_slurm(self) -> None:
        logs = self.state_dir / "log"
        dbd = self._spawn("slurmdbd", ["slurmdbd", "-D"])
        _wait(
            "slurmdbd",
            lambda: _port_in_use(SLURM_PORTS["slurmdbd"]),
            60,
            [logs / "slurmdbd.log", logs / "slurmdbd.out"],
            [dbd],
        )
        ctld = self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i"])
        _wait(
            "slurmctld",
            lambda: _run(["scontrol", "ping"]).returncode == 0,
            60,
            [logs / "slurmctld.log", logs / "slurmctld.out"],
            [dbd, ctld],
        )
        slurmd = self._spawn("slurmd", ["slurmd", "-D", "-N", self.node])
        _wait(
            "node idle",
            lambda: self.node_state() == "idle",
            60,
            [logs / "slurmd.log", logs / "slurmd.out", logs / "slurmctld.log"],
            [dbd, ctld, slurmd],
        )
        _wait(
            "accounting", lambda: _run(["sacct", "-n", "-X"]).returncode == 0, 30, [logs / "slurmdbd.log"], [dbd, ctld]
        )

    # ------------------------------------------------------------------------------------------- queries

    def node_state(self) -> str:
        done = _run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"])
        return done.stdout.split("\n")[0].strip() if done.returncode == 0 else ""

    def sacct(self, *fields: str) -> list[dict[str, str]]:
        """Every job's allocation record (no steps) in the accounting database, as {field: value}."""
        done = _run(["sacct", "-X", "-n", "-P", "-a", "--starttime=2000-01-01", "-o", ",".join(fields)])
        if done.returncode != 0:
            raise RuntimeError(f"sacct failed: {done.stderr}")
        return [dict(zip(fields, line.split("|"))) for line in done.stdout.splitlines() if line]

    # ------------------------------------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Cancel remaining jobs, stop the daemons this object started (by PID), remove its config files."""
        try:
            if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
                _run(["scancel", "--full", "--user=root"], timeout=15)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and _run(["squeue", "-h"], timeout=15).stdout.strip():
                    time.sleep(0.5)
            for name in STOP_ORDER:
                proc = self.processes.pop(name, None)
                if proc is not None:
                    _terminate(proc.pid, proc)
            for conf in (CONF_DIR / "slurm.conf", CONF_DIR / "slurmdbd.conf"):
                if conf.exists() and MARKER in conf.read_text(errors="replace"):
                    conf.unlink()
            if self._pid_file().exists():
                self._pid_file().unlink()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None


def _terminate(pid: int, proc: subprocess.Popen | None = None, grace_s: float = 20) -> None:
    """SIGTERM one process by PID, SIGKILL it if it is still there after grace_s."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if proc is not None:
        proc.wait(timeout=10)
