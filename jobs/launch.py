"""Submitting work: one code path for every profile (local, slurm-local, a real site).

`start_run` writes the run record; `submit_array` / `submit_job` wrap the function in a
recording `Task`, submit it through the profile's executor, and record SUBMITTED rows;
`Submission.wait` follows the jobs to their end using the suite's own records and the
scheduler (never sacct, which needs slurmdbd).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from esm3.metrics.catalog import query
from esm3.metrics.lake import now, write_rows
from jobs import records
from jobs import workspace as wsp
from jobs.clusters import ClusterProfile, Resources, make_executor

log = logging.getLogger("esm3.launch")


class JobFailed(RuntimeError):
    """A job of the submission failed, was cancelled or was lost; the message has its error."""


def start_run(
    ws: Path,
    *,
    kind: str,
    name: str,
    profile: ClusterProfile,
    config: dict[str, Any] | None = None,
    nodes: int | None = None,
    world_size: int | None = None,
    token_budget: int | None = None,
    param_count: int | None = None,
    run_id: str | None = None,
) -> str:
    run_id = run_id or records.new_run_id(kind)
    image = profile.container.image or None
    records.record_run(
        ws,
        run_id,
        kind=kind,
        name=name,
        status="SUBMITTED",
        cluster=profile.name,
        config=json.dumps(config or {}, sort_keys=True, default=str),
        git_rev=records.git_revision(),
        image=image,
        nodes=nodes or profile.nodes,
        world_size=world_size or (nodes or profile.nodes) * profile.tasks_per_node,
        token_budget=token_budget,
        param_count=param_count,
        submitted_at=now(),
    )
    return run_id


@dataclass
class Submission:
    ws: Path
    run_id: str
    stage: str
    profile: ClusterProfile
    jobs: list[submitit.Job[Any]]

    @property
    def job_ids(self) -> list[str]:
        return [str(j.job_id) for j in self.jobs]

    def _result_files(self, job: submitit.Job[Any]) -> list[Path]:
        subs = getattr(job, "_sub_jobs", None) or []
        return [s.paths.result_pickle for s in subs] or [job.paths.result_pickle]

    def _finished(self, job: submitit.Job[Any]) -> bool:
        return all(p.exists() for p in self._result_files(job))

    def wait(
        self, *, timeout_s: float | None = None, poll_s: float = 0.5, progress: bool | None = None
    ) -> list[Any]:
        """Wait for every job; return their results in order, or raise JobFailed."""
        from tqdm import tqdm

        show = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(total=len(self.jobs), desc=f"{self.stage}", unit="job", disable=not show)
        pending = list(range(len(self.jobs)))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_check = time.monotonic()
        try:
            while pending:
                done = [i for i in pending if self._finished(self.jobs[i])]
                if done:
                    bar.update(len(done))
                    pending = [i for i in pending if i not in done]
                    continue
                if time.monotonic() - last_check > 5:
                    last_check = time.monotonic()
                    self._raise_if_dead()
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.stage}: {len(pending)} job(s) not finished after {timeout_s:.0f}s: "
                        + ", ".join(self.job_ids[i] for i in pending[:10])
                    )
                time.sleep(poll_s)
        finally:
            bar.close()
        out = []
        for j in self.jobs:
            try:
                res = j.results()
            except Exception as e:  # the job raised: its own record has the traceback
                raise JobFailed(f"{self.stage}: job {j.job_id} failed: {self._error(j)}") from e
            out.append(res[0] if len(res) == 1 else res)
        return out

    def _error(self, job: submitit.Job[Any]) -> str:
        df = query(
            self.ws,
            "SELECT error FROM jobs WHERE run_id = ? AND job_id = ? "
            "AND error IS NOT NULL ORDER BY updated_at DESC LIMIT 1",
            [self.run_id, str(job.job_id)],
        )
        log_file = job.paths.stdout
        where = f" (log: {log_file})"
        return (_last_line(df.error[0]) if len(df) else "no error recorded") + where

    def _raise_if_dead(self) -> None:
        records.reconcile(self.ws, self.run_id)
        df = query(
            self.ws,
            "SELECT job_id, state, error FROM jobs WHERE run_id = ? "
            "AND list_contains(?, job_id) AND state IN ('CANCELLED','LOST','TIMEOUT','FAILED')",
            [self.run_id, [str(i) for i in self.job_ids]],
        )
        if len(df):
            # a FAILED job still writes its result file; give it a moment to appear
            time.sleep(1.0)
            unfinished = [j for j in self.jobs if not self._finished(j)]
            bad = df[df["job_id"].isin([str(j.job_id) for j in unfinished])]
            if len(bad):
                r = bad.iloc[0]
                raise JobFailed(
                    f"{self.stage}: job {r['job_id']} is {r['state']}: {_last_line(r['error'] or '')}"
                )


def _last_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _record_submitted(sub: Submission, t0: Any, indexed: bool) -> None:
    rows = []
    for i, j in enumerate(sub.jobs):
        rows.append(
            dict(
                run_id=sub.run_id,
                stage=sub.stage,
                job_id=str(j.job_id),
                array_index=i if indexed else None,
                attempt=0,
                rank=0,
                state="SUBMITTED",
                cluster=sub.profile.name,
                submitted_at=t0,
                # stamped at submission time, so a job that starts at once supersedes it
                updated_at=t0,
            )
        )
    write_rows(sub.ws, "jobs", rows)
    if sub.profile.executor == "slurm":
        ids = sorted({str(j.job_id).split("_")[0] for j in sub.jobs})
        records.update_run(sub.ws, sub.run_id, slurm_job_id=",".join(ids))


def submit_array(
    ws: Path,
    profile: ClusterProfile,
    *,
    run_id: str,
    stage: str,
    fn: Callable[..., Any],
    items: Sequence[Any],
    resources: Resources | None = None,
) -> Submission:
    """One array task per item: task i runs fn(*items[i]); each records its lifecycle."""
    if not items:
        raise ValueError(f"{stage}: nothing to submit (no items)")
    folder = wsp.submitit_folder(ws, run_id)
    if profile.executor == "local" and (resources is None or resources.cpus_per_task is None):
        # the local executor starts every task at once: share the cores between them
        share = max(1, (os.cpu_count() or 1) // len(items))
        resources = dataclasses.replace(resources or Resources(), cpus_per_task=share)
    ex = make_executor(profile, folder, workspace=ws, job_name=f"{stage}", resources=resources)
    task = records.Task(str(ws), run_id, stage, profile.name, fn, indexed=True)
    t0 = now()
    jobs = ex.map_array(task, list(range(len(items))), [tuple(it) for it in items])
    sub = Submission(ws, run_id, stage, profile, jobs)
    _record_submitted(sub, t0, indexed=True)
    log.info("%s: submitted %d task(s) on %s: %s", stage, len(jobs), profile.name, sub.job_ids[:3])
    return sub


def submit_job(
    ws: Path,
    profile: ClusterProfile,
    *,
    run_id: str,
    stage: str,
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    resources: Resources | None = None,
) -> Submission:
    """One job (nodes x tasks from the profile or `resources`) running fn(*args) on every rank."""
    folder = wsp.submitit_folder(ws, run_id)
    ex = make_executor(profile, folder, workspace=ws, job_name=f"{stage}", resources=resources)
    task = records.Task(str(ws), run_id, stage, profile.name, fn)
    t0 = now()
    job = ex.submit(task, *args)
    sub = Submission(ws, run_id, stage, profile, [job])
    _record_submitted(sub, t0, indexed=False)
    log.info("%s: submitted job %s on %s", stage, job.job_id, profile.name)
    return sub


def finish_run(ws: Path, run_id: str, status: str) -> None:
    records.update_run(ws, run_id, status=status, finished_at=now())
