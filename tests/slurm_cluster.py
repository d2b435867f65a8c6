"""A one-machine Slurm cluster for a test: slurmctld, slurmd, slurmdbd (accounting, so that
`sacct` works), MariaDB under slurmdbd and munge, all in one temporary folder.

    with SlurmCluster.start() as cluster:
        cluster.run("sbatch", "--wrap", "true")
        cluster.env        # PATH and SLURM_CONF for Slurm's client commands

Debian's `slurm-wlm` 22.05 packages are installed with apt when a command is missing
(needs root, as do slurmd and the jobs it starts as root). The node is this machine with
its real CPUs and memory (`slurmd -C`) and one GPU: Slurm counts and hands out a
`gres/gpu` there, backed by a dummy character device (a copy of /dev/null's numbers,
made with mknod: slurmd accepts only a character or block device as a GPU's File), so
jobs asking for `--gpus=1` run one at a time and see CUDA_VISIBLE_DEVICES=0 while torch
sees no CUDA.

Nothing here touches the machine's own Slurm or munge setup: every daemon runs in the
foreground of a process of its own (`-D`/`-F`), with its configuration, state, logs,
sockets and pid files in the temporary folder, on free TCP ports chosen at start below
the ephemeral port range, and
the client commands find the configuration through SLURM_CONF. Accounting needs slurmdbd,
and slurmdbd needs MySQL/MariaDB (Slurm 22.05 has no file-based accounting store any
more; `jobcomp/filetxt` only feeds `sacct --completion`, which has no AllocTRES and is
not what snakemake-executor-plugin-slurm queries). MariaDB runs with
--skip-grant-tables on 127.0.0.1 only: a throwaway database for the test's jobs.

`stop()` (also on leaving the `with` block) cancels what is still queued, stops every
daemon (SIGTERM, then SIGKILL after a grace period), kills any job process still
carrying the cluster's SLURM_CONF, and deletes the folder; a cluster that fails to come
up is stopped the same way, and the error says why with the end of the daemons' logs.
"""

from __future__ import annotations

import getpass
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "slurmdbd", "munge", "mariadb-server")
# Each command of the packages above that the cluster runs.
REQUIRED_COMMANDS = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "srun", "sacct", "sacctmgr", "sinfo", "squeue",
                     "scontrol", "scancel", "munged", "mariadbd", "mariadb-install-db")
# Client commands that get a wrapper in <folder>/bin exporting SLURM_CONF. Needed for srun
# inside a job: snakemake-executor-plugin-slurm-jobstep starts each job's step with
# `srun` after removing every SLURM_* variable but a few (SLURM_CONF among the removed),
# so without the wrapper srun would look for /etc/slurm/slurm.conf, which on a real
# cluster is where the configuration is and here is not.
CLIENT_COMMANDS = ("sbatch", "srun", "salloc", "sacct", "sacctmgr", "sinfo", "squeue", "scontrol", "scancel",
                   "sshare", "sstat")
CLUSTER_NAME = "imgpipetest"
PARTITION = "main"
ACCOUNT = "imgpipe"
STOP_GRACE_S = 20


class SlurmClusterError(RuntimeError):
    pass


def free_port(taken: set[int] = frozenset()) -> int:
    """A TCP port nothing listens on, below the kernel's ephemeral range.

    Not a port the kernel picks (bind to port 0): those come from the ephemeral range,
    which is also where every outgoing connection gets its source port, so one of the
    cluster's own connections (sacctmgr to slurmdbd, slurmdbd to MariaDB) could take it
    before the daemon meant to listen there binds it.
    """
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low, high = (20000, ephemeral_low - 1) if ephemeral_low > 21000 else (ephemeral_low - 1000, ephemeral_low - 1)
    for _ in range(200):
        port = random.randint(low, high)
        if port in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("", port))  # all interfaces: the Slurm daemons listen on all of them
            except OSError:
                continue
        return port
    raise SlurmClusterError(f"no free TCP port found in {low}-{high}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure_installed() -> list[str]:
    """Install the Debian packages when a command is missing (idempotent); return what apt installed.

    Services that the packages' install scripts would start (munge, mariadb, slurmctld,
    slurmd, slurmdbd with the system's configuration) are kept from starting by a
    temporary /usr/sbin/policy-rc.d (exit 101), unless the machine has one already.
    """
    missing = [command for command in REQUIRED_COMMANDS if shutil.which(command) is None]
    if not missing:
        return []
    if os.geteuid() != 0:
        raise SlurmClusterError(f"Slurm commands missing ({', '.join(missing)}) and not root, so they cannot be "
                                f"installed: run as root, or `apt-get install {' '.join(APT_PACKAGES)}` first")
    if shutil.which("apt-get") is None:
        raise SlurmClusterError(f"Slurm commands missing ({', '.join(missing)}) and no apt-get to install "
                                f"{' '.join(APT_PACKAGES)} with")
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\n# written by imgpipe's tests/slurm_cluster.py while apt installs Slurm\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in (["apt-get", "update"],
                        ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES]):
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                raise SlurmClusterError(f"`{' '.join(command)}` failed ({result.returncode}):\n"
                                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    finally:
        if own_policy:
            policy.unlink()
    still_missing = [command for command in REQUIRED_COMMANDS if shutil.which(command) is None]
    if still_missing:
        raise SlurmClusterError(f"after installing {' '.join(APT_PACKAGES)}, still missing: {', '.join(still_missing)}")
    return list(APT_PACKAGES)


def node_hardware() -> dict[str, str]:
    """`slurmd -C`: this machine as a node line (NodeName, CPUs, ..., RealMemory)."""
    result = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60)
    fields = dict(re.findall(r"(\w+)=(\S+)", result.stdout))
    if result.returncode != 0 or "CPUs" not in fields or "RealMemory" not in fields:
        raise SlurmClusterError(f"`slurmd -C` did not describe this machine:\n{result.stdout}\n{result.stderr}")
    return fields


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.processes: dict[str, subprocess.Popen] = {}
        self.hardware: dict[str, str] = {}
        self.node = ""
        self.conf = root / "etc" / "slurm.conf"
        self.bin = root / "bin"
        self.log_dir = root / "log"
        self.gpu_device = root / "dev" / "gpu0"
        self.startup_seconds: dict[str, float] = {}
        self.installed: list[str] = []

    # ----------------------------------------------------------------- starting

    @classmethod
    def start(cls, timeout: float = 120.0) -> SlurmCluster:
        started = time.monotonic()
        installed = ensure_installed()
        installed_s = time.monotonic() - started
        root = Path(tempfile.mkdtemp(prefix="imgpipe-slurm-"))
        # munged insists that every user can traverse to its socket.
        root.chmod(0o755)
        cluster = cls(root)
        cluster.installed = installed
        cluster.startup_seconds["install"] = installed_s
        try:
            cluster._start(timeout)
        except BaseException:
            cluster.stop()
            raise
        cluster.startup_seconds["total"] = time.monotonic() - started
        return cluster

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.hardware = node_hardware()
        self.node = self.hardware.get("NodeName") or socket.gethostname().split(".")[0]
        for folder in ("etc", "bin", "log", "state", "spool", "run", "dev", "munge", "munge-key"):
            (self.root / folder).mkdir()
        (self.root / "munge-key").chmod(0o700)
        self.ports = {}
        for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb"):
            self.ports[name] = free_port(set(self.ports.values()))
        self._write_configuration()

        phase = time.monotonic()
        self._start_munge(deadline)
        self._start_mariadb(deadline)
        self.startup_seconds["munge+mariadb"] = time.monotonic() - phase
        phase = time.monotonic()
        self._start_slurmdbd(deadline)
        for args in (["add", "cluster", CLUSTER_NAME],
                     ["add", "account", ACCOUNT, f"Cluster={CLUSTER_NAME}"],
                     ["add", "user", getpass.getuser(), f"Account={ACCOUNT}", f"Cluster={CLUSTER_NAME}"]):
            self.run("sacctmgr", "-i", *args)
        self.startup_seconds["slurmdbd"] = time.monotonic() - phase
        phase = time.monotonic()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node])
        self._wait_for("the node to be idle", self._node_idle, deadline, "slurmctld", "slurmd")
        self.startup_seconds["slurmctld+slurmd"] = time.monotonic() - phase

    def _write_configuration(self) -> None:
        root, hw = self.root, self.hardware
        # A dummy GPU: a character device with /dev/null's numbers (slurmd rejects a regular file).
        os.mknod(self.gpu_device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        munge_socket = root / "munge" / "munge.sock"
        (root / "etc" / "slurm.conf").write_text(f"""\
# Written by imgpipe's tests/slurm_cluster.py: a one-machine cluster for a test.
ClusterName={CLUSTER_NAME}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ports['slurmctld']}
SlurmdPort={self.ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
MailProg=/bin/true
# No cgroups: processes are tracked through /proc, and jobs are not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
# Cores and memory are what jobs ask for and are given (sbatch --cpus-per-task, --mem).
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that waits for the GPU must not hold back jobs behind it that could run now:
# backfill every 2 s instead of every 30 s.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
GresTypes=gpu
# Accounting through slurmdbd: what sacct reads. The GPU is counted as a TRES (AllocTRES
# shows gres/gpu=1), and job comments are kept (the plugin writes the rule name there).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self.ports['slurmdbd']}
AccountingStoragePass={munge_socket}
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MinJobAge=300
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={hw['CPUs']} Boards={hw.get('Boards', 1)} \
SocketsPerBoard={hw.get('SocketsPerBoard', 1)} CoresPerSocket={hw.get('CoresPerSocket', hw['CPUs'])} \
ThreadsPerCore={hw.get('ThreadsPerCore', 1)} RealMemory={hw['RealMemory']} Gres=gpu:1 State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        (root / "etc" / "gres.conf").write_text(f"NodeName={self.node} Name=gpu File={self.gpu_device}\n")
        dbd_conf = root / "etc" / "slurmdbd.conf"  # found next to slurm.conf (SLURM_CONF's folder)
        dbd_conf.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.ports['slurmdbd']}
SlurmUser=root
LogFile={self.log_dir}/slurmdbd.log
PidFile={root}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports['mariadb']}
StorageUser=slurm
StorageLoc=slurm_acct_db
""")
        dbd_conf.chmod(0o600)  # slurmdbd refuses a configuration others can read
        for command in CLIENT_COMMANDS:
            wrapper = self.bin / command
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf}\nexport SLURM_CONF\n'
                               f'exec {shutil.which(command) or "/usr/bin/" + command} "$@"\n')
            wrapper.chmod(0o755)

    def _start_munge(self, deadline: float) -> None:
        key = self.root / "munge-key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = self.root / "munge" / "munge.sock"
        self._spawn("munged", ["munged", "-F", f"--socket={socket_path}", f"--key-file={key}",
                               f"--pid-file={self.root}/run/munged.pid", f"--log-file={self.log_dir}/munged.log",
                               f"--seed-file={self.root}/munge-key/munged.seed"])

        def munge_works():
            encoded = subprocess.run(["munge", "-n", "-S", str(socket_path)], capture_output=True, timeout=10)
            return encoded.returncode == 0
        self._wait_for("munged", munge_works, deadline, "munged")

    def _start_mariadb(self, deadline: float) -> None:
        datadir = self.root / "mariadb"
        result = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                                 "--auth-root-authentication-method=socket", "--skip-test-db"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise SlurmClusterError(f"mariadb-install-db failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={datadir}", "--user=root",
                                 f"--socket={self.root}/run/mariadb.sock", f"--port={self.ports['mariadb']}",
                                 "--bind-address=127.0.0.1", f"--pid-file={self.root}/run/mariadb.pid",
                                 f"--log-error={self.log_dir}/mariadb.log", "--skip-grant-tables",
                                 "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M",
                                 "--innodb-lock-wait-timeout=900"])
        self._wait_for("MariaDB", lambda: self._port_open(self.ports["mariadb"]), deadline, "mariadbd")

    def _start_slurmdbd(self, deadline: float) -> None:
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait_for("slurmdbd", lambda: self._port_open(self.ports["slurmdbd"]), deadline, "slurmdbd")

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as probe:
            probe.settimeout(1)
            return probe.connect_ex(("127.0.0.1", port)) == 0

    def _node_idle(self) -> bool:
        result = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return result.returncode == 0 and result.stdout.split() == ["idle"]

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.log_dir / f"{name}.out", "w")
        self.processes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        log.close()

    def _wait_for(self, what: str, ready, deadline: float, *daemons: str) -> None:
        while True:
            for name in daemons:
                if self.processes[name].poll() is not None:
                    raise SlurmClusterError(f"{name} exited ({self.processes[name].returncode}) while waiting for "
                                            f"{what}:\n{self.logs(name)}")
            try:
                if ready():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"timed out waiting for {what}:\n" + "\n".join(self.logs(n) for n in daemons))
            time.sleep(0.2)

    # ----------------------------------------------------------------- using

    @property
    def env(self) -> dict[str, str]:
        """os.environ with this cluster's client commands first on PATH and SLURM_CONF set."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}"}

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmClusterError(f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stdout}\n"
                                    f"{result.stderr}")
        return result

    def sacct(self, *fields: str, extra: tuple[str, ...] = ()) -> list[dict[str, str]]:
        """Every job of the cluster (allocations only, no steps) as {field: value}."""
        result = self.run("sacct", "-X", "--allusers", "--parsable2", "--noheader", "--starttime", "2000-01-01",
                          f"--format={','.join(fields)}", *extra)
        return [dict(zip(fields, line.split("|"))) for line in result.stdout.splitlines() if line.strip()]

    def logs(self, *names: str, lines: int = 25) -> str:
        names = names or tuple(self.processes)
        parts = []
        for name in names:
            for path in (self.log_dir / f"{name}.log", self.log_dir / f"{name}.out"):
                if path.exists():
                    parts.append(f"--- {path.name} (last {lines} lines)\n{_tail(path, lines)}")
        return "\n".join(parts)

    # ----------------------------------------------------------------- stopping

    def stop(self, keep_logs_in: Path | None = None) -> None:
        """Cancel every job, stop every daemon, kill what is left of the jobs, delete the folder."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            try:
                queued = self.run("squeue", "-h", "-o", "%i", check=False, timeout=15).stdout.split()
                if queued:
                    self.run("scancel", *queued, check=False, timeout=15)
                    end = time.monotonic() + 15
                    while time.monotonic() < end and self.run("squeue", "-h", "-o", "%i", check=False,
                                                                  timeout=15).stdout.strip():
                        time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        # Compute daemons first, the database last: each reports to the one after it.
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(10)
        self._kill_leftovers()
        if keep_logs_in is not None and self.log_dir.exists():
            shutil.copytree(self.log_dir, keep_logs_in, dirs_exist_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """Kill processes of this cluster that outlived their daemon: slurmstepd and job
        processes (they run with SLURM_CONF pointing here) and anything started in its folder."""
        marker = str(self.root).encode()
        for _ in range(2):
            found = False
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == os.getpid():
                    continue
                try:
                    environ = (entry / "environ").read_bytes()
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"SLURM_CONF=" + marker in environ or marker in cmdline:
                    try:
                        os.kill(int(entry.name), signal.SIGKILL)
                        found = True
                    except (ProcessLookupError, PermissionError):
                        pass
            if not found:
                return
            time.sleep(0.5)

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
