"""Run and job records in the lake: every submission writes a `runs` row, and every job,
array task and rank records its own lifecycle in `jobs`, so `esm3 status` works on
clusters without SLURM accounting. Jobs killed from outside are found by `reconcile`."""

from __future__ import annotations

import os
import secrets
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

    def __call__(self, *args: Any) -> Any:
        ws = Path(self.workspace)
        ident = self.identity(args)
        started = now()
        record_job(ws, **ident, state="RUNNING", started_at=started)

        def ended(state: str, **fields: Any) -> None:
            record_job(ws, **ident, state=state, started_at=started, ended_at=now(), **fields)

        try:
            result = self.run(ident, args)
        except Interrupted as e:
            ended("REQUEUED", error=str(e))
            self.on_interrupted(ident)
            raise
        except BaseException as e:
            ended("FAILED", exit_code=1, error="".join(traceback.format_exception(e))[-8000:])
            raise
        ended("COMPLETED", exit_code=0)
        return result


class Interrupted(Exception):
    """Raised by a job's work when this attempt stops to be requeued (preemption, time
    limit): recorded as REQUEUED, not FAILED."""


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


def slurm_states(
    job_ids: list[str], env: dict[str, str] | None = None
) -> dict[str, tuple[str, str]]:
    """job id -> (SLURM state, exit code) from squeue, then scontrol for finished jobs."""
    out: dict[str, tuple[str, str]] = {}
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return out
    if proc.returncode == 0:
        listed = dict(line.split()[:2] for line in proc.stdout.splitlines() if line.strip())
        out.update({j: (listed[j], "") for j in job_ids if j in listed})
    for j in job_ids:
        if j in out:
            continue
        sc = subprocess.run(
            ["scontrol", "show", "job", "-o", j],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        if sc.returncode != 0:
            continue
        kv = dict(tok.split("=", 1) for tok in sc.stdout.split() if "=" in tok)
        if "JobState" in kv:
            out[j] = (kv["JobState"], kv.get("ExitCode", ""))
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
        return 0
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
            st = states.get(rec["job_id"])
            if st is None:
                rows.append(
                    _closed(
                        rec,
                        "LOST",
                        "SLURM no longer knows this job and it never reported an end",
                        stamp,
                    )
                )
                continue
            mapped = _SLURM_STATE.get(st[0])
            if mapped and mapped != rec["state"]:
                msg = f"reconciled from SLURM: JobState={st[0]} ExitCode={st[1] or '?'}"
                rows.append(_closed(rec, mapped, msg, stamp, exit_code=_exit(st[1])))
    if rows:
        write_rows(workspace, "jobs", rows)
    return len(rows)


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
