"""A real SLURM cluster on this host, from Debian's packages, for development and tests.

`up` starts munged, slurmctld and one slurmd per emulated node (`slurmd -N nodeX`), with
config, state, logs and pid files under one folder (env ESM3_SLURM_DIR, default
`<project>/.slurm`), and resumes nodes that an earlier `down` of its own left drained.
`down` cancels this cluster's jobs, waits (bounded) for their steps, then stops the
daemons whose pid files `up` wrote and the slurmstepd processes of this cluster (found by
their sockets in this cluster's spool folder or their SLURM_CONF, never by name alone:
another cluster may run on the same host), TERM first and SIGKILL after a bound.
The settings are the ones seen to work on one host (see DESIGN.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field, replace
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
    resumed: tuple[str, ...] = ()  # nodes `up` returned to service (drained by our own down)
    # more slurm.conf lines, e.g. (("MaxArraySize", "11"),) for a test of array limits
    settings: tuple[tuple[str, str], ...] = ()

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
        *(f"{key}={value}" for key, value in c.settings),
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
    return {node: state for node, (state, _) in node_info(c).items()}


def node_info(c: LocalCluster) -> dict[str, tuple[str, str]]:
    """node -> (state, reason) as sinfo reports them (empty when the controller is silent)."""
    try:
        proc = subprocess.run(
            [_need("sinfo"), "-h", "-N", "-o", "%N|%T|%E"],
            env=c.env(),
            capture_output=True,
            text=True,
            timeout=15,
        )
    except subprocess.TimeoutExpired:
        return {}
    out = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        parts = line.split("|", 2)
        if len(parts) == 3:
            out[parts[0]] = (parts[1].rstrip("*~#$@+-"), parts[2].strip())
    return out


# reasons slurmctld gives a node whose daemons were stopped under running steps: after a
# `down` of ours they are our doing, and `up` returns such nodes to service
OWN_DOWN_REASONS = ("Kill task failed", "Not responding", "Node unexpectedly rebooted")
_OUT_OF_SERVICE = ("drained", "draining", "down", "fail", "failing")


def _down_marker(root: Path) -> Path:
    return root / "run" / "down.json"


def _resume_ours(c: LocalCluster, info: dict[str, tuple[str, str]]) -> list[str]:
    """Ask slurmctld to resume the nodes that our own earlier `down` left out of service;
    returns the nodes asked."""
    if not _down_marker(c.root).exists():
        return []  # no down of ours before: a drained node is someone's decision
    done = []
    for n in c.node_names:
        state, reason = info.get(n, ("", ""))
        if state in _OUT_OF_SERVICE and reason.startswith(OWN_DOWN_REASONS):
            proc = subprocess.run(
                [_need("scontrol"), "update", f"nodename={n}", "state=resume"],
                env=c.env(),
                capture_output=True,
                text=True,
                timeout=15,
            )
            # before the node's slurmd has registered again slurmctld may answer "Invalid
            # node state specified" and still clear the drain: `up` asks again while the
            # node stays out of service, and counts it resumed once it is back
            log.info("resuming %s (%s: %s, left by the last `slurm down`)%s", n, state, reason,
                     "" if proc.returncode == 0 else f"; slurmctld said: {proc.stderr.strip()}")  # fmt: skip
            done.append(n)
    return done


def up(
    nodes: int = DEFAULT_NODES,
    *,
    root: Path | None = None,
    timeout_s: float = 90,
    port: int | None = None,
    settings: dict[str, str] | None = None,
) -> LocalCluster:
    """Start the cluster (idempotent); return once every node is idle (or allocated/mixed).

    `port` (default env ESM3_SLURM_PORT) is slurmctld's, the nodes' follow it; `settings`
    are more slurm.conf lines (a changed config restarts a running cluster). Nodes that
    our own `down` left drained or down ("Kill task failed") are resumed; the returned
    cluster's `resumed` names them."""
    c = LocalCluster(root or state_dir(), nodes=nodes, settings=tuple((settings or {}).items()))
    if port is not None:
        c = replace(c, port=port)
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
    info: dict[str, tuple[str, str]] = {}
    resumed: list[str] = []
    while time.monotonic() < deadline:
        info = node_info(c)
        resumed += [n for n in _resume_ours(c, info) if n not in resumed]
        if info and all(
            info.get(n, ("",))[0] in ("idle", "mixed", "allocated") for n in c.node_names
        ):
            _down_marker(c.root).unlink(missing_ok=True)
            return replace(c, resumed=tuple(resumed))
        time.sleep(0.5)
    said = {n: f"{st} ({why})" if why and why != "none" else st for n, (st, why) in info.items()}
    raise SlurmLocalError(
        f"local SLURM cluster did not become idle within {timeout_s:.0f}s (sinfo: {said or 'no answer'}); "
        f"logs in {c.root / 'log'}"
    )


# --- down ----------------------------------------------------------------------------------

_DAEMONS = ("munged", "slurmctld", "slurmscriptd", "slurmd", "slurmstepd")


@dataclass
class DownReport:
    """What `down` did, for a truthful report."""

    cancelled: list[str] = field(default_factory=list)  # job ids scancel was given
    stopped: list[str] = field(default_factory=list)  # ended on SIGTERM
    killed: list[str] = field(default_factory=list)  # needed SIGKILL
    left: list[str] = field(default_factory=list)  # still alive at the end

    def lines(self) -> list[str]:
        out = []
        if self.cancelled:
            out.append(f"cancelled {len(self.cancelled)} job(s): {', '.join(self.cancelled)}")
        if self.stopped:
            out.append("stopped: " + ", ".join(self.stopped))
        if self.killed:
            out.append("killed (SIGKILL, did not end on SIGTERM): " + ", ".join(self.killed))
        if self.left:
            out.append("STILL RUNNING: " + ", ".join(self.left))
        return out or ["nothing was running"]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process; None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _gone(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is None or st[0] in ("Z", "X")  # a zombie has ended; its parent may never reap it


def _our_socket_inodes(root: Path) -> set[str]:
    """Inodes of unix sockets bound under this cluster's folder (slurmstepd's step sockets
    live in its spool folder)."""
    prefix = f"{root}/"
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {f[6] for f in (ln.split() for ln in lines) if len(f) >= 8 and f[7].startswith(prefix)}


def _belongs(pid: int, root: Path, conf: Path, inodes: set[str]) -> bool:
    proc = Path(f"/proc/{pid}")
    try:
        if f"{root}/".encode() in (proc / "cmdline").read_bytes():
            return True  # munged, slurmctld, slurmd: started with paths under root
        if f"SLURM_CONF={conf}".encode() in (proc / "environ").read_bytes().split(b"\0"):
            return True  # slurmscriptd, slurmstepd: inherit the daemons' environment
        fds = [os.readlink(f) for f in (proc / "fd").iterdir()] if inodes else []
    except OSError:
        return False
    return any(f.startswith("socket:[") and f[8:-1] in inodes for f in fds)


def cluster_processes(root: Path | None = None) -> dict[int, str]:
    """pid -> name of every SLURM/munge daemon of the cluster under `root` (slurmstepd
    included): the daemon's name and a tie to this cluster's paths, never the name alone."""
    root = (root or state_dir()).resolve()
    conf, inodes = conf_path(root), _our_socket_inodes(root)
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or _gone(int(proc.name)):
            continue
        try:
            comm = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if comm in _DAEMONS and _belongs(int(proc.name), root, conf, inodes):
            out[int(proc.name)] = comm
    return out


def _descendants(pids: set[int]) -> set[int]:
    """Every process below `pids` (a job's shell, srun, its tasks under a slurmstepd)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        st = _proc_stat(int(proc.name)) if proc.name.isdigit() else None
        if st is not None:
            children.setdefault(st[1], []).append(int(proc.name))
    out, todo = set(), list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _stop(procs: dict[int, str], grace_s: float, report: DownReport) -> None:
    """SIGTERM `procs`; SIGKILL what is left after `grace_s`; record the outcome."""
    for pid in procs:
        _signal(pid, signal.SIGTERM)
    _wait_gone(procs, grace_s)
    hard = [p for p in procs if not _gone(p)]
    for pid in hard:
        _signal(pid, signal.SIGKILL)
    _wait_gone(procs, 5)
    for pid, name in procs.items():
        label = f"{name} (pid {pid})"
        if not _gone(pid):
            report.left.append(label)
        elif name:  # unnamed: a job's own process, reported as a count below
            (report.killed if pid in hard else report.stopped).append(label)
    jobs = [p for p, n in procs.items() if not n and _gone(p)]
    if jobs:
        report.killed.append(f"{len(jobs)} process(es) of the jobs' steps")


def _cmdline(pid: int) -> str:
    """The name a process shows (slurmstepd sets it to e.g. "slurmstepd: [12.batch]")."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid}"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or f"pid {pid}"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pids: dict[int, str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)


def _squeue_ids(c: LocalCluster) -> list[str]:
    try:
        proc = subprocess.run(
            [_need("squeue"), "-h", "-o", "%A"], env=c.env(), capture_output=True, text=True,
            timeout=15,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return []
    return sorted(set(proc.stdout.split())) if proc.returncode == 0 else []


def _cancel_jobs(c: LocalCluster, timeout_s: float, report: DownReport) -> None:
    """scancel every job of this cluster (SLURM_CONF points at it), then wait (bounded) for
    the jobs to leave the queue and their slurmstepd processes to end."""
    ids = _squeue_ids(c)
    if not ids:
        return
    subprocess.run([_need("scancel"), "--full", *ids], env=c.env(), capture_output=True, timeout=30)
    report.cancelled = ids
    if not any(n == "slurmd" for n in cluster_processes(c.root).values()):
        return  # no slurmd to end the steps: waiting would not help
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = [p for p, n in cluster_processes(c.root).items() if n == "slurmstepd"]
        if not steps and not _squeue_ids(c):
            return
        time.sleep(0.5)
    log.warning("jobs of %s did not end within %.0fs of scancel: stopping them", c.root, timeout_s)


def down(*, root: Path | None = None, timeout_s: float = 20) -> DownReport:
    """Cancel this cluster's jobs, then stop its daemons: slurmd, the slurmstepd left with
    their jobs' processes, slurmctld, munged; SIGKILL after `timeout_s`."""
    c = LocalCluster((root or state_dir()).resolve())
    report = DownReport()
    pidfiles = _all_pidfiles(c.root)
    alive = {name: _alive(p) for name, p in pidfiles.items()}
    if alive.get("slurmctld"):
        _cancel_jobs(c, timeout_s, report)
    by_name = {pid: name for name, pid in alive.items() if pid}
    found = cluster_processes(c.root)
    steps = {p for p, n in found.items() if n == "slurmstepd"}
    # slurmd first (no new steps), then the steps with their jobs' processes, then slurmctld
    groups: list[dict[int, str]] = [
        {p: n for p, n in by_name.items() if n.startswith("slurmd")},
        {**dict.fromkeys(_descendants(steps), ""), **{p: _cmdline(p) for p in steps}},
        {p: n for p, n in by_name.items() if n == "slurmctld"},
    ]
    for group in groups:
        if group:
            _stop(group, timeout_s, report)
    # what is still ours besides munged (slurmscriptd, a stepd that started late), then munged
    rest = {p: n for p, n in cluster_processes(c.root).items() if n != "munged"}
    if rest:
        _stop(rest, timeout_s, report)
    munged = {p: n for p, n in by_name.items() if n == "munged"}
    munged.update({p: n for p, n in cluster_processes(c.root).items() if n == "munged"})
    if munged:
        _stop(munged, timeout_s, report)
    for path in pidfiles.values():
        if not _alive(path):
            path.unlink(missing_ok=True)
    if by_name or found:  # the next `up` may resume nodes this stop leaves drained
        _down_marker(c.root).write_text(json.dumps({"at": time.time(), "pid": os.getpid()}))
    return report


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
