"""Submitting work: one code path for every profile (local, slurm-local, a real site).

`start_run` writes the run record; `submit_array` / `submit_job` wrap the function in a
recording `Task`, submit it through the profile's executor, and record SUBMITTED rows;
`Submission.wait` follows the jobs to their end using the suite's own records and the
scheduler (never sacct, which needs slurmdbd).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from esm3.metrics.catalog import query
from esm3.metrics.lake import now, write_rows
from jobs import arrays, records
from jobs import workspace as wsp
from jobs.clusters import ClusterProfile, Resources, make_executor

log = logging.getLogger("esm3.launch")


class JobFailed(RuntimeError):
    """A job of the submission failed, was cancelled or was lost; the message has its error
    and `state` the job's state (FAILED, CANCELLED, LOST, TIMEOUT)."""

    def __init__(self, message: str, state: str = "FAILED") -> None:
        super().__init__(message)
        self.state = state


def run_status_after(error: BaseException) -> str:
    """The final status of a run whose driver stopped on `error`: a cancelled job cancels
    the run; anything else fails it."""
    return "CANCELLED" if getattr(error, "state", None) == "CANCELLED" else "FAILED"


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
    stages: Sequence[str] = (),
) -> str:
    """Record a new run; `stages` are the stages it plans (it is COMPLETED only once each
    has run)."""
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
        stages=",".join(stages) or None,
    )
    return run_id


@dataclass
class Submission:
    """The jobs of one stage: every task of every array submitted so far, in task order.
    `queued` holds arrays still to be submitted (n tasks, submit) that `wait` submits one
    after the other (the local executor, which has no dependencies); with `flatten` each
    task returned a list of per-item results and `wait` returns them item by item."""

    ws: Path
    run_id: str
    stage: str
    profile: ClusterProfile
    jobs: list[submitit.Job[Any]]
    flatten: bool = False
    queued: list[tuple[int, Callable[[], None]]] = dataclasses.field(default_factory=list)
    plan: arrays.ArrayPlan | None = None

    @property
    def job_ids(self) -> list[str]:
        return [str(j.job_id) for j in self.jobs]

    @property
    def array_ids(self) -> list[str]:
        """The scheduler's id of each array submitted (a one-task array is a plain job)."""
        return list(dict.fromkeys(j.split("_")[0] for j in self.job_ids))

    def _result_files(self, job: submitit.Job[Any]) -> list[Path]:
        subs = getattr(job, "_sub_jobs", None) or []
        return [s.paths.result_pickle for s in subs] or [job.paths.result_pickle]

    def _finished(self, job: submitit.Job[Any], listed: dict[str, Any]) -> bool:
        """Its result files exist, and the scheduler no longer lists it: a requeued job
        may have left the files of an attempt that did not finish."""
        return str(job.job_id) not in listed and all(p.exists() for p in self._result_files(job))

    def _listed(self) -> dict[str, records.SlurmJob]:
        """The submission's jobs the scheduler still lists (none on the local executor)."""
        if self.profile.executor != "slurm":
            return {}
        mine = set(self.job_ids)
        return {j: v for j, v in records.squeue(slurm_env(self.profile)).items() if j in mine}

    def _submit_next(self) -> list[int]:
        """Submit the next queued array; the indices of its jobs."""
        first = len(self.jobs)
        _, submit = self.queued.pop(0)
        submit()
        return list(range(first, len(self.jobs)))

    def wait(
        self, *, timeout_s: float | None = None, poll_s: float = 0.5, progress: bool | None = None
    ) -> list[Any]:
        """Wait for every job (submitting queued arrays in turn); return their results in
        order, or raise JobFailed as soon as one fails, is cancelled or is lost (its
        siblings are not waited for)."""
        from tqdm import tqdm

        show = sys.stderr.isatty() if progress is None else progress
        total = len(self.jobs) + sum(n for n, _ in self.queued)
        bar = tqdm(total=total, desc=f"{self.stage}", unit="task", disable=not show)
        pending = list(range(len(self.jobs)))
        results: dict[int, Any] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_check = time.monotonic()
        listed = self._listed()
        try:
            while pending or self.queued:
                if not pending:
                    pending = self._submit_next()
                    listed = self._listed()
                    continue
                done = [i for i in pending if self._finished(self.jobs[i], listed)]
                for i in done:
                    results[i] = self._result(self.jobs[i])
                if done:
                    bar.update(len(done))
                    pending = [i for i in pending if i not in done]
                    continue
                if time.monotonic() - last_check > 2:
                    last_check = time.monotonic()
                    self._raise_if_dead([self.jobs[i] for i in pending])
                    listed = self._listed()
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.stage}: {len(pending)} job(s) not finished after {timeout_s:.0f}s: "
                        + ", ".join(self.job_ids[i] for i in pending[:10])
                    )
                time.sleep(poll_s)
        finally:
            bar.close()
        ordered = [results[i] for i in range(len(self.jobs))]
        return [r for task in ordered for r in task] if self.flatten else ordered

    def _result(self, job: submitit.Job[Any]) -> Any:
        try:
            res = job.results()
        except Exception as e:  # the job raised: its own record has the traceback
            state, line = self._failure(job)
            verb = "failed" if state == "FAILED" else f"is {state}"
            raise JobFailed(f"{self.stage}: job {job.job_id} {verb}: {line}", state) from e
        return res[0] if len(res) == 1 else res

    def _failure(self, job: submitit.Job[Any]) -> tuple[str, str]:
        """(state, the real error line and where the log is) of a job that did not finish:
        its record's error, or for a job stopped from outside the last meaningful line of
        its stderr (SLURM's own "*** JOB ... CANCELLED ***" line)."""
        df = query(
            self.ws,
            "SELECT state, error FROM jobs WHERE run_id = ? AND job_id = ? "
            "AND list_contains(?, state) ORDER BY attempt DESC, updated_at DESC LIMIT 1",
            [self.run_id, str(job.job_id), list(_BAD)],
        )
        state = df.state[0] if len(df) else "FAILED"
        recorded = error_line(df.error[0]) if len(df) and isinstance(df.error[0], str) else ""
        log_text = _read_tail(job.paths.stderr)
        said = slurm_says(log_text) if state != "FAILED" else ""
        line = said or recorded or error_line(log_text) or "no error recorded"
        return state, f"{line} (log: {job.paths.stderr})"

    def _raise_if_dead(self, pending: list[submitit.Job[Any]]) -> None:
        """Raise JobFailed for the first pending job whose current attempt is recorded (or
        reconciled) as failed, cancelled, lost or timed out. A job SLURM has requeued is
        not dead: the records of its earlier attempts do not count."""
        records.reconcile(self.ws, self.run_id)
        ids = [str(j.job_id) for j in pending]
        df = query(
            self.ws,
            """SELECT job_id, attempt, state FROM jobs WHERE run_id = ? AND list_contains(?, job_id)
                QUALIFY row_number() OVER (PARTITION BY job_id, rank ORDER BY attempt DESC) = 1""",
            [self.run_id, ids],
        )
        bad = df[df.state.isin(_BAD)]
        if bad.empty:
            return
        listed = self._listed()
        for r in bad.itertuples(index=False):
            now_running = listed.get(r.job_id)
            if now_running is not None and now_running.restarts > r.attempt:
                continue  # an earlier attempt; SLURM runs the job again
            job = pending[ids.index(r.job_id)]
            state, line = self._failure(job)
            raise JobFailed(f"{self.stage}: job {r.job_id} is {state}: {line}", state)


_BAD = ("CANCELLED", "LOST", "TIMEOUT", "FAILED")
# progress output that is not an error: `[=====>    ] 45%` (mmseqs), `45%|####  |` (tqdm)
_PROGRESS = re.compile(r"^\[[=>#.\s-]*\]|\d+%\|")
# SLURM's own account of why it stopped a job, written into the job's stderr
_SLURM_SAYS = re.compile(r"\*\*\* (JOB|STEP) \S+ ON \S+ (CANCELLED|DUE TO|TIME LIMIT)")


def _lines(text: str) -> list[str]:
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", str(text)) if ln.strip()]
    return [ln for ln in lines if not _PROGRESS.search(ln)]


def slurm_says(text: str) -> str:
    """SLURM's last "*** JOB ... CANCELLED AT ... ***" line in a job's stderr, or ""."""
    said = [ln for ln in _lines(text) if _SLURM_SAYS.search(ln)]
    return said[-1] if said else ""


def error_line(text: str) -> str:
    """The last meaningful line of a job's error output: SLURM's "*** JOB ... ***" line
    if there is one, else the last line that is not a progress bar."""
    return slurm_says(text) or (_lines(text) or [""])[-1]


def _read_tail(path: Path, size: int = 64_000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def slurm_env(profile: ClusterProfile) -> dict[str, str]:
    """This process's environment with the profile's SLURM_CONF (for SLURM's clients)."""
    env = dict(os.environ)
    conf = profile.slurm_conf_path()
    if conf is not None:
        env["SLURM_CONF"] = str(conf)
    return env


def _record_submitted(
    sub: Submission, jobs: Sequence[submitit.Job[Any]], first: int, t0: Any, indexed: bool
) -> None:
    """SUBMITTED rows for `jobs`, the tasks first, first + 1, ... of the stage."""
    rows = []
    for i, j in enumerate(jobs, start=first):
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
        add_slurm_ids(sub.ws, sub.run_id, [str(j.job_id).split("_")[0] for j in jobs])


def add_slurm_ids(ws: Path, run_id: str, ids: Sequence[str]) -> None:
    """Add job ids to the run's `slurm_job_id`, which keeps every stage's, in order."""
    df = query(ws, "SELECT slurm_job_id FROM runs_latest WHERE run_id = ?", [run_id])
    known = str(df.slurm_job_id[0]).split(",") if len(df) and df.slurm_job_id[0] else []
    merged = list(dict.fromkeys([*known, *ids]))
    records.update_run(ws, run_id, slurm_job_id=",".join(merged))


def array_size_limit(profile: ClusterProfile) -> int:
    """MaxArraySize for the profile: its `max_array_size` key, else the scheduler's
    (`scontrol show config`), else SLURM's default."""
    if profile.max_array_size:
        return profile.max_array_size
    if profile.executor == "slurm":
        found = arrays.scheduler_max_array_size(slurm_env(profile))
        if found is not None:
            return found
        log.warning("scontrol did not tell MaxArraySize: assuming SLURM's default %d "
                    "(set max_array_size in the profile)", arrays.SLURM_DEFAULT_MAX_ARRAY_SIZE)  # fmt: skip
    return arrays.SLURM_DEFAULT_MAX_ARRAY_SIZE


def _one_process_per_task(resources: Resources | None) -> Resources:
    """An array task is one process (its pool does the rest): one node and one task unless
    `resources` says otherwise, whatever the profile sets for training jobs; several ranks
    would each run the whole chunk."""
    r = resources or Resources()
    return dataclasses.replace(r, nodes=r.nodes or 1, tasks_per_node=r.tasks_per_node or 1)


def plan_stage(
    profile: ClusterProfile, n_items: int, resources: Resources | None, max_array_size: int
) -> arrays.ArrayPlan:
    per_task = (resources.items_per_task if resources else None) or 1
    return arrays.plan_arrays(n_items, max_array_size=max_array_size, items_per_task=per_task,
                              max_tasks=profile.max_tasks_per_stage)  # fmt: skip


def submit_array(
    ws: Path,
    profile: ClusterProfile,
    *,
    run_id: str,
    stage: str,
    fn: Callable[..., Any],
    items: arrays.Items,
    resources: Resources | None = None,
    max_array_size: int | None = None,
) -> Submission:
    """fn(*item) for every item, as arrays the scheduler accepts (`jobs.arrays`): items
    grouped into tasks, tasks into arrays of at most max_array_size - 1 (None: asked once
    here). On SLURM every array is submitted now, each with `resources.dependency`; the
    local executor's arrays are submitted one after another by `wait`, which returns one
    result per item, in item order."""
    if not len(items):
        raise ValueError(f"{stage}: nothing to submit (no items)")
    resources = _one_process_per_task(resources)
    plan = plan_stage(profile, len(items), resources, max_array_size or array_size_limit(profile))
    folder = wsp.submitit_folder(ws, run_id)
    task = records.Task(str(ws), run_id, stage, profile.name, arrays.RunChunk(stage, fn), True)
    sub = Submission(ws, run_id, stage, profile, [], flatten=True, plan=plan)
    slurm_ex = None
    if profile.executor == "slurm":
        slurm_ex = make_executor(profile, folder, workspace=ws, job_name=stage, resources=resources)
    for tasks in plan.arrays:
        ex = slurm_ex or _local_executor(ws, profile, folder, stage, resources, len(tasks))
        sub.queued.append(
            (len(tasks), functools.partial(_submit_tasks, sub, ex, task, items, tasks))
        )
    if slurm_ex is not None:
        while sub.queued:
            sub._submit_next()
    else:
        sub._submit_next()
    log.info("%s: %s on %s: arrays %s", stage, plan.describe(), profile.name, sub.array_ids[:5])
    return sub


def _local_executor(
    ws: Path, profile: ClusterProfile, folder: Path, stage: str, resources: Resources | None,
    n_tasks: int,
) -> submitit.Executor:  # fmt: skip
    if resources is None or resources.cpus_per_task is None:
        # the local executor starts an array's tasks at once: share the cores between them
        share = max(1, (os.cpu_count() or 1) // n_tasks)
        resources = dataclasses.replace(resources or Resources(), cpus_per_task=share)
    return make_executor(profile, folder, workspace=ws, job_name=stage, resources=resources)


def _submit_tasks(
    sub: Submission, ex: submitit.Executor, task: records.Task, items: arrays.Items, tasks: range
) -> None:
    """Submit one array: task t gets the chunk of items the plan gives it."""
    assert sub.plan is not None
    chunks = [(arrays.chunk_of(items, sub.plan.items_of(t)),) for t in tasks]
    t0 = now()
    jobs = ex.map_array(task, list(tasks), chunks)
    _record_submitted(sub, jobs, tasks.start, t0, indexed=True)
    sub.jobs += jobs


def array_scripts(
    ws: Path,
    profile: ClusterProfile,
    folder: Path,
    *,
    stage: str,
    n_items: int,
    resources: Resources | None = None,
    max_array_size: int,
) -> list[str]:
    """The sbatch script of each array `submit_array` would submit (nothing submitted)."""
    resources = _one_process_per_task(resources)
    plan = plan_stage(profile, n_items, resources, max_array_size)
    ex = make_executor(profile, folder, workspace=ws, job_name=stage, resources=resources)
    return [_array_script(ex, len(tasks)) for tasks in plan.arrays]


def _array_script(ex: submitit.Executor, n_tasks: int) -> str:
    """The script submitit writes for an array of n_tasks (a plain job for one task)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = dict(ex.parameters)
    if n_tasks > 1:
        params["map_count"] = n_tasks
    return _make_sbatch_string(command=ex._submitit_command_str, folder=ex.folder, **params)


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
    _record_submitted(sub, [job], 0, t0, indexed=False)
    log.info("%s: submitted job %s on %s", stage, job.job_id, profile.name)
    return sub


def finish_run(ws: Path, run_id: str, status: str) -> None:
    records.update_run(ws, run_id, status=status, finished_at=now())
