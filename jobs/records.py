"""Run and job records in the lake: every submission writes a `runs` row, and every job,
array task and rank records its own lifecycle in `jobs`, so `esm3 status` works on
clusters without SLURM accounting. Jobs killed from outside are found by `reconcile`."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from esm3.metrics.catalog import query
from esm3.metrics.lake import now, write_rows

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ACTIVE = ("SUBMITTED", "PENDING", "RUNNING")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "LOST")
FINAL_RUN = ("COMPLETED", "FAILED", "CANCELLED")
# a run whose jobs all ended but whose planned stages did not all run is closed as FAILED
# only after this long: its driver may be about to submit the next stage
DRIVER_GRACE_S = 20.0


def new_run_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or os.environ.get("ESM3_GIT_REV", "unknown")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("ESM3_GIT_REV", "unknown")


def record_run(workspace: Path, run_id: str, **fields: Any) -> None:
    """Write a new version of the run's record (the view keeps the latest)."""
    fields.setdefault("updated_at", now())
    write_rows(workspace, "runs", [{"run_id": run_id, **fields}])


def update_run(workspace: Path, run_id: str, **changes: Any) -> None:
    """A new version of the run record: the latest one with `changes` applied."""
    df = query(workspace, "SELECT * FROM runs_latest WHERE run_id = ?", [run_id])
    base = df.iloc[0].to_dict() if len(df) else {"run_id": run_id}
    base = {k: (None if _isnull(v) else v) for k, v in base.items()}
    base.update(changes, updated_at=now())
    write_rows(workspace, "runs", [base])


def record_job(workspace: Path, **fields: Any) -> None:
    fields.setdefault("updated_at", now())
    write_rows(workspace, "jobs", [fields])


def _isnull(v: Any) -> bool:
    try:
        return v is None or v != v  # NaN/NaT
    except (TypeError, ValueError):
        return False


@dataclass
class Task:
    """What a job runs: `fn(*args)`, wrapped so the job records its own lifecycle.

    Picklable (submitit sends it to the job). Inside the job it reads submitit's
    environment for the job id, rank and node; the attempt is SLURM_RESTART_COUNT.
    """

    workspace: str
    run_id: str
    stage: str
    cluster: str
    fn: Callable[..., Any]
    indexed: bool = False  # array task: called as (index, args-tuple) -> fn(*args-tuple)

    def identity(self, args: tuple[Any, ...]) -> dict[str, Any]:
        import submitit

        env = submitit.JobEnvironment()
        return {
            "run_id": self.run_id,
            "stage": self.stage,
            "job_id": str(env.job_id),
            "array_index": int(args[0]) if self.indexed else None,
            "attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "rank": int(env.global_rank),
            "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            "cluster": self.cluster,
        }

    def run(self, ident: dict[str, Any], args: tuple[Any, ...]) -> Any:
        """The job's work; array tasks get (index, item-args tuple)."""
        return self.fn(*args[1]) if self.indexed else self.fn(*args)

    def on_interrupted(self, ident: dict[str, Any]) -> None:
        """After an `Interrupted` attempt is recorded: a job that can requeue does it here."""

    def on_sigterm(self) -> None:
        """SIGTERM (scancel, a requeue, a lost node): stop the work now. A job that must
        stop at a safe point (collectives) overrides this to set a flag instead."""
        raise_terminated()

    def __call__(self, *args: Any) -> Any:
        ws = Path(self.workspace)
        ident = self.identity(args)
        started = now()
        _watch_sigterm(self.on_sigterm)
        record_job(ws, **ident, state="RUNNING", started_at=started)

        def ended(state: str, **fields: Any) -> None:
            record_job(ws, **ident, state=state, started_at=started, ended_at=now(), **fields)

        try:
            result = self.run(ident, args)
        except BaseException as e:
            if sigterm_received():
                # the scheduler is ending this attempt: say why in its words, and leave no
                # result file (the attempt did not finish; a requeued one will write it)
                state, why = interruption_verdict(ident["attempt"])
                ended(state, exit_code=128 + signal.SIGTERM, error=why)
                raise SystemExit(128 + signal.SIGTERM) from e
            if isinstance(e, Interrupted):
                ended("REQUEUED", error=str(e))
                self.on_interrupted(ident)
                raise
            ended("FAILED", exit_code=1, error="".join(traceback.format_exception(e))[-8000:])
            raise
        ended("COMPLETED", exit_code=0)
        return result


class Interrupted(Exception):
    """Raised by a job's work when this attempt stops to be requeued (preemption, time
    limit): recorded as REQUEUED, not FAILED."""


class Terminated(BaseException):
    """SIGTERM reached the job: recorded as the scheduler says (CANCELLED, REQUEUED).

    Raised from the signal handler at whatever line the job is on, so it is no `Exception`:
    a stage's per-record `except Exception` (a bad file becomes a reject) must not take it
    for a bad record and finish its shard without that record."""


_SIGTERM = {"at": 0.0}


def raise_terminated() -> None:
    """The default reaction to SIGTERM: stop the work where it is."""
    raise Terminated("stopped by SIGTERM")


def sigterm_received() -> bool:
    return bool(_SIGTERM["at"])


def _watch_sigterm(react: Callable[[], None]) -> None:
    """On SIGTERM note the time, then `react` once (a second SIGTERM is only noted, so it
    cannot interrupt the recording of the first)."""

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
        first = not _SIGTERM["at"]
        _SIGTERM["at"] = time.time()
        if first:
            react()

    signal.signal(signal.SIGTERM, handler)


def _own_slurm_job() -> str | None:
    """This job's id as squeue and scontrol name it (`71_3` for an array task)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def interruption_verdict(attempt: int) -> tuple[str, str]:
    """(state, why) for an attempt stopped by SIGTERM, from the scheduler's word: SLURM
    counts a requeue (a lost or downed node, `scontrol requeue`) before it signals the
    job, so a restart count past this attempt means REQUEUED; otherwise it was cancelled."""
    job = _own_slurm_job()
    if job is None:
        return "CANCELLED", "stopped by SIGTERM (no scheduler: killed from outside)"
    st = slurm_states([job]).get(job)
    if st is None:
        return "CANCELLED", "stopped by SIGTERM from SLURM (the job is no longer known)"
    said = f"JobState={st.state} Restarts={st.restarts}"
    if st.restarts > attempt:
        return "REQUEUED", f"stopped by SIGTERM from SLURM: requeued ({said})"
    if st.state in ("TIMEOUT", "DEADLINE"):
        return "TIMEOUT", f"stopped by SIGTERM from SLURM: time limit ({said})"
    return "CANCELLED", f"stopped by SIGTERM from SLURM: cancelled ({said})"


# --- reconciliation with the scheduler -------------------------------------------------

_SLURM_STATE = {
    "COMPLETED": "COMPLETED",
    "CANCELLED": "CANCELLED",
    "FAILED": "FAILED",
    "TIMEOUT": "TIMEOUT",
    "OUT_OF_MEMORY": "FAILED",
    "NODE_FAIL": "LOST",
    "BOOT_FAIL": "LOST",
    "DEADLINE": "TIMEOUT",
    "PREEMPTED": "REQUEUED",
}


@dataclass(frozen=True)
class SlurmJob:
    """What SLURM says of one job or array task."""

    state: str  # JobState: PENDING, RUNNING, COMPLETING, COMPLETED, CANCELLED, ...
    exit_code: str  # "0:0"; empty while it is listed
    restarts: int  # requeues so far: the attempt SLURM runs or will run
    listed: bool  # squeue still lists it (pending, running or completing)


def slurm_states(job_ids: list[str], env: dict[str, str] | None = None) -> dict[str, SlurmJob]:
    """job id -> SlurmJob from squeue, then scontrol for jobs squeue no longer lists."""
    out = {j: v for j, v in squeue(env).items() if j in set(job_ids)}
    for j in job_ids:
        if j in out:
            continue
        try:
            sc = subprocess.run(
                ["scontrol", "show", "job", "-o", j],
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if sc.returncode != 0:
            continue
        kv = dict(tok.split("=", 1) for tok in sc.stdout.split() if "=" in tok)
        if "JobState" in kv:
            restarts = int(kv.get("Restarts", "0") or 0)
            out[j] = SlurmJob(kv["JobState"], kv.get("ExitCode", ""), restarts, listed=False)
    return out


def squeue(env: dict[str, str] | None = None) -> dict[str, SlurmJob]:
    """Every job and array task squeue lists (pending, running, completing)."""
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-O", "JobArrayID:64,State:24,RestartCnt:12"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    out: dict[str, SlurmJob] = {}
    if proc.returncode != 0:
        return out
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].isdigit():
            out[parts[0]] = SlurmJob(parts[1], "", int(parts[2]), listed=True)
    return out


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by its parent) is not alive
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def reconcile(workspace: Path, run_id: str | None = None) -> int:
    """Close job records the scheduler knows have ended without the job saying so.

    Returns the number of records written (state CANCELLED, TIMEOUT, FAILED, LOST, ...).
    """
    from jobs.clusters import load_profile  # local import: clusters imports submitit

    df = query(
        workspace,
        """SELECT * FROM jobs WHERE list_contains($active, state)
                AND ($run_id IS NULL OR run_id = $run_id)
            QUALIFY row_number() OVER (PARTITION BY run_id, job_id, rank ORDER BY attempt DESC) = 1""",
        {"active": list(ACTIVE), "run_id": run_id or None},
    )
    if df.empty:
        return reconcile_runs(workspace, run_id)
    rows: list[dict[str, Any]] = []
    stamp = now()
    for cluster, group in df.groupby(df["cluster"].fillna("local")):
        try:
            prof = load_profile(str(cluster))
        except Exception:
            prof = None
        if prof is not None and prof.executor == "local":
            for rec in group.to_dict("records"):
                if not _pid_alive(rec["job_id"].split("_")[0]):
                    rows.append(
                        _closed(
                            rec, "LOST", "the job's process ended without recording its end", stamp
                        )
                    )
            continue
        env = dict(os.environ)
        conf = prof.slurm_conf_path() if prof is not None else None
        if conf is not None:
            env["SLURM_CONF"] = str(conf)
        states = slurm_states(sorted(set(group["job_id"])), env)
        if not states and _scheduler_down(env):
            continue  # cannot tell; leave the records as they are
        for rec in group.to_dict("records"):
            row = _reconciled(rec, states.get(rec["job_id"]), stamp)
            if row is not None:
                rows.append(row)
    if rows:
        write_rows(workspace, "jobs", rows)
    return len(rows) + reconcile_runs(workspace, run_id)


def _reconciled(rec: dict[str, Any], st: SlurmJob | None, stamp: datetime) -> dict[str, Any] | None:
    """The closing record SLURM's word gives one open attempt, or None while it may run.

    SLURM keeps one state per job, that of its latest attempt: an earlier attempt that
    never recorded its end (killed, then requeued) did not complete, whatever the job did
    since."""
    if st is None:
        why = "SLURM no longer knows this job and it never reported an end"
        return _closed(rec, "LOST", why, stamp)
    attempt = int(rec["attempt"] or 0)
    if st.restarts > attempt:
        why = (
            f"attempt {attempt} ended without recording its end (killed); SLURM has since "
            f"requeued the job (Restarts={st.restarts}, JobState={st.state})"
        )
        return _closed(rec, "LOST", why, stamp)
    mapped = _SLURM_STATE.get(st.state)
    if mapped and mapped != rec["state"]:
        msg = f"reconciled from SLURM: JobState={st.state} ExitCode={st.exit_code or '?'}"
        return _closed(rec, mapped, msg, stamp, exit_code=_exit(st.exit_code))
    return None


def reconcile_runs(workspace: Path, run_id: str | None = None) -> int:
    """Close run records that no driver will close: a run is live while any of its jobs
    is (their records are its heartbeat), so a detached run ends when its jobs do. It is
    COMPLETED only when every planned stage finished; FAILED or CANCELLED as its jobs say.
    Returns the number of run records written."""
    runs = query(
        workspace,
        "SELECT run_id, stages FROM runs_latest WHERE list_contains($open, status) "
        "AND ($run_id IS NULL OR run_id = $run_id)",
        {"open": ["SUBMITTED", "RUNNING"], "run_id": run_id or None},
    )
    if runs.empty:
        return 0
    jobs = query(
        workspace,
        """SELECT run_id, stage, state, coalesce(ended_at, updated_at) AS ended FROM jobs
            WHERE list_contains($runs, run_id)
            QUALIFY row_number() OVER (PARTITION BY run_id, job_id, rank ORDER BY attempt DESC) = 1""",
        {"runs": runs.run_id.tolist()},
    )
    written = 0
    for rec in runs.to_dict("records"):
        mine = jobs[jobs.run_id == rec["run_id"]]
        status = _run_verdict(mine, rec.get("stages"))
        if status is not None:
            ended = mine.ended.max().to_pydatetime()
            update_run(workspace, rec["run_id"], status=status, finished_at=ended)
            written += 1
    return written


def _run_verdict(jobs: Any, stages: str | None) -> str | None:
    """A run's final status from its jobs' latest attempts, or None while it may go on."""
    if jobs.empty or not set(jobs.state) <= set(TERMINAL):
        return None  # nothing submitted yet, or something still pending, running, requeued
    if jobs.state.isin(["FAILED", "LOST", "TIMEOUT"]).any():
        return "FAILED"
    if (jobs.state == "CANCELLED").any():
        return "CANCELLED"
    planned = [s for s in (stages or "").split(",") if s] if not _isnull(stages) else []
    if set(planned) <= set(jobs.stage):
        return "COMPLETED"  # every planned stage ran, and every job of it completed
    ended = jobs.ended.max()
    if (now() - ended).total_seconds() < DRIVER_GRACE_S:
        return None  # its driver may be submitting the next stage
    return "FAILED"  # its driver stopped before submitting every stage


def _scheduler_down(env: dict[str, str]) -> bool:
    try:
        return (
            subprocess.run(["sinfo", "-h"], capture_output=True, env=env, timeout=15).returncode
            != 0
        )
    except (OSError, subprocess.SubprocessError):
        return True


def _exit(code: str) -> int | None:
    try:
        a, _, b = code.partition(":")
        return int(a) or (128 + int(b) if b and int(b) else 0)
    except ValueError:
        return None


def _closed(
    rec: dict[str, Any], state: str, error: str, stamp: datetime, exit_code: int | None = None
) -> dict[str, Any]:
    keep = ("run_id", "stage", "job_id", "array_index", "attempt", "rank", "node", "cluster")
    row = {k: (None if _isnull(rec.get(k)) else rec.get(k)) for k in keep}
    for k in ("submitted_at", "started_at"):
        row[k] = None if _isnull(rec.get(k)) else rec.get(k)
    row.update(state=state, error=error, exit_code=exit_code, ended_at=stamp, updated_at=stamp)
    return row
