"""A real SLURM cluster on this host, from Debian's packages, for development and tests.

`up` starts munged, slurmctld and one slurmd per emulated node (`slurmd -N nodeX`), with
config, state, logs and pid files under one folder (env ESM3_SLURM_DIR, default
`<project>/.slurm`). `down` stops only the processes whose pid files `up` wrote.
The settings are the ones seen to work on one host (see DESIGN.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("esm3.slurm")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NODES = 2
DEFAULT_PORT = 16817  # slurmctld (env ESM3_SLURM_PORT); slurmd ports follow it


class SlurmLocalError(RuntimeError):
    """The local cluster cannot be started, or is not running."""


def state_dir() -> Path:
    return Path(os.environ.get("ESM3_SLURM_DIR") or PROJECT_ROOT / ".slurm").resolve()


def conf_path(root: Path | None = None) -> Path:
    return (root or state_dir()) / "etc" / "slurm.conf"


@dataclass(frozen=True)
class LocalCluster:
    root: Path
    nodes: int = DEFAULT_NODES
    cpus_per_node: int = 0  # 0: this host's core count
    mem_mb_per_node: int = 0  # 0: a share of this host's memory
    port: int = field(default_factory=lambda: int(os.environ.get("ESM3_SLURM_PORT", DEFAULT_PORT)))

    @property
    def node_names(self) -> list[str]:
        return [f"node{i + 1}" for i in range(self.nodes)]

    @property
    def conf(self) -> Path:
        return conf_path(self.root)

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket.2"

    def pidfiles(self) -> dict[str, Path]:
        run = self.root / "run"
        out = {"munged": run / "munged.pid", "slurmctld": run / "slurmctld.pid"}
        out.update({f"slurmd-{n}": run / f"slurmd-{n}.pid" for n in self.node_names})
        return out

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def render_conf(c: LocalCluster) -> str:
    cpus = c.cpus_per_node or max(os.cpu_count() or 1, 2)
    mem = c.mem_mb_per_node or max(1024, _host_mem_mb() // max(c.nodes, 1))
    r = c.root
    lines = [
        "# written by `esm3 slurm up`; edits are overwritten",
        "ClusterName=esm3local",
        f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
        f"SlurmctldPort={c.port}",
        f"SlurmdPort={c.port + 1}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={c.munge_socket}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={r}/state",
        f"SlurmdSpoolDir={r}/spool/%n",
        f"SlurmctldPidFile={r}/run/slurmctld.pid",
        f"SlurmdPidFile={r}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={r}/log/slurmctld.log",
        f"SlurmdLogFile={r}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MpiDefault=none",
        "JobRequeue=1",
        "KillWait=5",
        "MinJobAge=3600",
        "SlurmdTimeout=60",
        "InactiveLimit=0",
        "SchedulerParameters=defer_batch",
    ]
    for i, n in enumerate(c.node_names):
        lines.append(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={c.port + 1 + i} "
            f"CPUs={cpus} RealMemory={mem} State=UNKNOWN"
        )
    lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _host_mem_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError):
        return 4096


def _alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    # a recycled pid would not be one of ours: check the command line
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return pid
    name = pidfile.stem.split("-")[0]
    return pid if name in Path(cmd).name else None


def _need(exe: str) -> str:
    path = shutil.which(exe) or (f"/usr/sbin/{exe}" if Path(f"/usr/sbin/{exe}").exists() else None)
    if not path:
        raise SlurmLocalError(
            f"{exe} not found: install Debian's slurm-wlm and munge (make setup does it as root)"
        )
    return path


def _ensure_hosts(names: list[str]) -> None:
    """torch's rendezvous resolves the node names: map them to 127.0.0.1."""
    missing = []
    for n in names:
        try:
            socket.gethostbyname(n)
        except OSError:
            missing.append(n)
    if not missing:
        return
    try:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # esm3 local SLURM nodes\n")
    except OSError as e:
        raise SlurmLocalError(
            f"node names {missing} do not resolve and /etc/hosts is not writable ({e}); "
            f"add the line '127.0.0.1 {' '.join(missing)}' to /etc/hosts"
        ) from e


def _start_munge(c: LocalCluster) -> None:
    pidfile = c.pidfiles()["munged"]
    if _alive(pidfile):
        return
    d = c.root / "munge"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    key = d / "munge.key"
    if not key.exists():
        subprocess.run(
            [_need("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True
        )
    os.chmod(key, 0o600)
    c.munge_socket.unlink(missing_ok=True)
    subprocess.run(
        [
            _need("munged"),
            "--force",
            f"--socket={c.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={pidfile}",
            f"--log-file={c.root / 'log' / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}",
        ],
        check=True,
        capture_output=True,
        text=True,
    )


def _run_daemon(cmd: list[str], c: LocalCluster, what: str) -> None:
    proc = subprocess.run(cmd, env=c.env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmLocalError(
            f"{what} failed to start (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}; "
            f"see {c.root / 'log'}"
        )


def sinfo_states(c: LocalCluster) -> dict[str, str]:
    """node -> state as sinfo reports it (empty when the controller does not answer)."""
    try:
        proc = subprocess.run(
            [_need("sinfo"), "-h", "-N", "-o", "%N %T"],
            env=c.env(),
            capture_output=True,
            text=True,
            timeout=15,
        )
    except subprocess.TimeoutExpired:
        return {}
    if proc.returncode != 0:
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1].rstrip("*~#$@+-")
    return out


def up(
    nodes: int = DEFAULT_NODES, *, root: Path | None = None, timeout_s: float = 90
) -> LocalCluster:
    """Start the cluster (idempotent); return once every node is idle (or allocated/mixed)."""
    c = LocalCluster(root or state_dir(), nodes=nodes)
    for sub in ("etc", "state", "spool", "run", "log"):
        (c.root / sub).mkdir(parents=True, exist_ok=True)
    _ensure_hosts(c.node_names)
    conf = render_conf(c)
    running = any(_alive(p) for k, p in c.pidfiles().items() if k != "munged")
    if c.conf.exists() and c.conf.read_text() != conf and running:
        log.info("slurm.conf changed: restarting the local cluster")
        down(root=c.root)
    c.conf.write_text(conf)
    _start_munge(c)
    if not _alive(c.pidfiles()["slurmctld"]):
        # -i: ignore state saved by an earlier cluster with other nodes
        _run_daemon([_need("slurmctld"), "-i", "-f", str(c.conf)], c, "slurmctld")
    for n in c.node_names:
        if not _alive(c.pidfiles()[f"slurmd-{n}"]):
            _run_daemon([_need("slurmd"), "-N", n, "-f", str(c.conf)], c, f"slurmd {n}")
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = sinfo_states(c)
        if states and all(states.get(n) in ("idle", "mixed", "allocated") for n in c.node_names):
            return c
        time.sleep(0.5)
    raise SlurmLocalError(
        f"local SLURM cluster did not become idle within {timeout_s:.0f}s (sinfo: {states or 'no answer'}); "
        f"logs in {c.root / 'log'}"
    )


def down(*, root: Path | None = None, timeout_s: float = 20) -> list[str]:
    """Stop the daemons `up` started (by their pid files); returns the names stopped."""
    c = LocalCluster(root or state_dir())
    pidfiles = {k: p for k, p in _all_pidfiles(c.root).items()}
    if "slurmctld" in pidfiles and _alive(pidfiles["slurmctld"]) and shutil.which("scancel"):
        # our cluster's jobs only: SLURM_CONF points at this cluster
        subprocess.run(["scancel", "--full", "-u", "root"], env=c.env(), capture_output=True)
    stopped = []
    # slurmd before slurmctld, munged last
    order = sorted(pidfiles, key=lambda k: (k == "munged", k == "slurmctld"))
    for name in order:
        pid = _alive(pidfiles[name])
        if pid is None:
            pidfiles[name].unlink(missing_ok=True)
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pidfiles[name]):
            time.sleep(0.1)
        if _alive(pidfiles[name]):
            os.kill(pid, signal.SIGKILL)
        pidfiles[name].unlink(missing_ok=True)
        stopped.append(name)
    return stopped


def _all_pidfiles(root: Path) -> dict[str, Path]:
    run = root / "run"
    if not run.is_dir():
        return {}
    return {p.stem: p for p in run.glob("*.pid")}


def status(*, root: Path | None = None) -> dict[str, object]:
    c = LocalCluster(root or state_dir())
    procs = {k: _alive(p) for k, p in _all_pidfiles(c.root).items()}
    return {"root": str(c.root), "conf": str(c.conf), "processes": procs, "nodes": sinfo_states(c)}


def require_running(conf: Path) -> None:
    """Raise SlurmLocalError with the fix unless the cluster behind `conf` answers."""
    if not conf.exists():
        raise SlurmLocalError(
            f"the local SLURM cluster is not running (no {conf}); start it with "
            "`make slurm-up` or `esm3 slurm up`"
        )
    c = LocalCluster(conf.parent.parent)
    if not sinfo_states(c):
        raise SlurmLocalError(
            f"the local SLURM cluster of {conf} does not answer; start it with "
            "`make slurm-up` or `esm3 slurm up`"
        )
