"""Cluster profiles (`jobs/configs/clusters/*.toml`) and the one factory that turns a
profile into a submitit executor, with the job's Python wrapped in a container if set."""

from __future__ import annotations

import logging
import math
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import submitit

from jobs import slurm_local
from jobs.config import ConfigError, load

PROFILES_DIR = Path(__file__).resolve().parent / "configs" / "clusters"
# what a job's tasks read: the profile's `scratch` and `mmseqs_runner`
SCRATCH_ENV = "ESM3_SCRATCH"
MMSEQS_RUNNER_ENV = "ESM3_MMSEQS_RUNNER"

# submitit polls `sacct`, which fails without slurmdbd; the suite tracks job states itself
logging.getLogger("submitit").setLevel(logging.ERROR)


@dataclass
class Container:
    """Run the job's Python inside an image: `apptainer exec --nv --bind ... IMAGE python`."""

    image: str = ""  # .sif path (apptainer) or image name (podman); empty: no container
    runtime: Literal["apptainer", "podman"] = "apptainer"
    binds: list[str] = field(default_factory=list)  # "src[:dst[:opts]]"; the workspace is added
    nv: bool = True  # apptainer --nv: the host's NVIDIA driver inside the container
    python: str = "python"
    extra_args: list[str] = field(default_factory=list)


@dataclass
class ClusterProfile:
    name: str = "local"
    description: str = ""
    executor: Literal["local", "slurm"] = "local"
    # SLURM_CONF for the scheduler's clients; "local" means the cluster of `esm3 slurm up`
    slurm_conf: str = ""
    partition: str = ""
    account: str = ""
    qos: str = ""
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # 0: the scheduler's default
    gpu_mem_gb: float = 0.0  # memory of one GPU; 0: unknown (the batch is not checked on GPUs)
    time_min: int = 60
    array_parallelism: int = 64
    # tasks per array are at most max_array_size - 1; 0: the scheduler's MaxArraySize
    # (`scontrol show config`; SLURM's default 1001 where it cannot be asked)
    max_array_size: int = 0
    max_tasks_per_stage: int = 10_000  # more items than this: several items per task
    signal_delay_s: int = 60  # USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 3
    setup: list[str] = field(default_factory=list)  # shell lines run before the job
    sbatch_extra: dict[str, str | int | bool] = field(default_factory=dict)  # other sbatch flags
    container: Container = field(default_factory=Container)
    # node-local scratch for mmseqs' database and temporary files; shell-expanded in the
    # job script, e.g. "$TMPDIR" or "/local/scratch/$USER"; empty: next to the outputs
    scratch: str = ""
    # MPI command mmseqs runs its parallel steps with (its RUNNER), e.g. "mpirun -np 4";
    # needs an MPI build of mmseqs
    mmseqs_runner: str = ""

    def validate(self) -> None:
        for k in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "array_parallelism"):
            if getattr(self, k) < 1:
                raise ConfigError(f"cluster key '{k}': {getattr(self, k)} must be >= 1")
        if self.max_array_size == 1 or self.max_array_size < 0:
            raise ConfigError(
                f"cluster key 'max_array_size': {self.max_array_size} must be 0 (ask the "
                "scheduler) or >= 2 (arrays hold max_array_size - 1 tasks)"
            )
        if self.max_tasks_per_stage < 1:
            raise ConfigError(
                f"cluster key 'max_tasks_per_stage': {self.max_tasks_per_stage} must be >= 1"
            )
        for k in ("gpus_per_node", "mem_gb", "gpu_mem_gb"):
            v = getattr(self, k)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"cluster key '{k}': must be >= 0, got {v}")
        if self.executor == "local" and self.nodes != 1:
            raise ConfigError(
                f"cluster key 'nodes': {self.nodes} is not allowed with executor 'local' "
                "(one node; use a slurm profile for several)"
            )

    def memory_per_rank(self, tasks_per_node: int) -> tuple[float, str] | None:
        """(bytes, what they are) one rank can use for training, or None where unknown.

        On GPUs the step lives in the GPU's memory; on CPUs it shares the node's memory
        with the node's other ranks. The node is this host for the local executor and the
        local SLURM cluster unless mem_gb says otherwise.
        """
        if self.gpus_per_node > 0:
            if self.gpu_mem_gb <= 0:
                return None
            return self.gpu_mem_gb * 2**30, "gpu_mem_gb: one GPU's memory"
        if self.mem_gb > 0:
            node, what = self.mem_gb * 2**30, "mem_gb"
        elif self.executor == "local" or self.slurm_conf == "local":
            node, what = float(host_memory()), "this host's memory"
        else:
            return None
        return node / max(1, tasks_per_node), f"{what} / {tasks_per_node} task(s) per node"

    def slurm_conf_path(self) -> Path | None:
        if self.slurm_conf == "local":
            return slurm_local.conf_path()
        return Path(self.slurm_conf) if self.slurm_conf else None


def task_env_lines(profile: ClusterProfile) -> list[str]:
    """Job-script lines that hand the profile's scratch and mmseqs runner to the tasks."""
    lines = []
    if profile.scratch:  # double quotes: "$TMPDIR" expands on the node, at run time
        lines.append(f'export {SCRATCH_ENV}="{profile.scratch}"')
    if profile.mmseqs_runner:
        lines.append(f"export {MMSEQS_RUNNER_ENV}={shlex.quote(profile.mmseqs_runner)}")
    return lines


def host_memory() -> int:
    """Physical memory of this host in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name_or_path: str, overrides: list[str] | None = None) -> ClusterProfile:
    """A profile by name (`local`, `slurm-local`, ...) or TOML path, validated."""
    p = Path(name_or_path)
    if not (p.suffix == ".toml" and p.exists()):
        p = PROFILES_DIR / f"{name_or_path}.toml"
        if not p.exists():
            raise ConfigError(
                f"unknown cluster profile '{name_or_path}' "
                f"(available: {', '.join(available_profiles())}, or a path to a .toml file)"
            )
    prof = load(ClusterProfile, p, overrides)
    if not prof.name or prof.name == "local" and p.stem != "local":
        prof.name = p.stem
    return prof


def container_python(c: Container, workspace: Path, folder: Path) -> str | None:
    """The command that replaces `python` in the job script, or None without a container."""
    if not c.image:
        return None
    binds = list(dict.fromkeys([*c.binds, str(workspace), str(folder)]))
    if c.runtime == "apptainer":
        cmd = ["apptainer", "exec"]
        if c.nv:
            cmd.append("--nv")
        cmd += ["--bind", ",".join(binds), *c.extra_args, c.image, c.python]
    else:
        # podman stands in where apptainer is absent: same binds, host network and env
        # run as the submitting user so the job can write the (shared) workspace
        cmd = ["podman", "run", "--rm", "--network", "host", "--env-host", "--no-healthcheck"]
        cmd += ["--user", f"{os.getuid()}:{os.getgid()}"]
        for b in binds:
            cmd += ["-v", b if ":" in b else f"{b}:{b}"]
        cmd += [*c.extra_args, c.image, c.python]
    return shlex.join(cmd)


def check_ready(profile: ClusterProfile) -> Path | None:
    """Raise a one-line error unless the profile's scheduler can take jobs now.

    Returns the SLURM_CONF the profile needs (None: the site default or no scheduler).
    Called before anything is recorded or submitted.
    """
    if profile.executor == "local":
        return None
    if not shutil.which("sbatch"):
        raise ConfigError(
            f"profile '{profile.name}' needs SLURM's sbatch, which is not on PATH "
            "(install slurm-client, or use --cluster local)"
        )
    conf = profile.slurm_conf_path()
    if conf is not None:
        if profile.slurm_conf == "local":
            slurm_local.require_running(conf)
        elif not conf.exists():
            raise ConfigError(f"cluster key 'slurm_conf': {conf} does not exist")
    return conf


@dataclass
class Resources:
    """Per-submission overrides of the profile's resources (None: the profile's value)."""

    nodes: int | None = None
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    gpus_per_node: int | None = None
    mem_gb: float | None = None
    time_min: int | None = None
    dependency: str | None = None  # sbatch --dependency, e.g. "afterok:12:13"
    items_per_task: int | None = None  # array stages: items one task works through


def make_executor(
    profile: ClusterProfile,
    folder: Path,
    *,
    workspace: Path,
    job_name: str = "esm3",
    resources: Resources | None = None,
) -> submitit.Executor:
    """A submitit executor for `profile`; checks the scheduler answers before returning."""
    r = resources or Resources()
    nodes = r.nodes or profile.nodes
    tasks = r.tasks_per_node or profile.tasks_per_node
    cpus = r.cpus_per_task or profile.cpus_per_task
    gpus = profile.gpus_per_node if r.gpus_per_node is None else r.gpus_per_node
    mem = profile.mem_gb if r.mem_gb is None else r.mem_gb
    time_min = r.time_min or profile.time_min
    python = container_python(profile.container, workspace, folder)
    setup = [f"export ESM3_WORKSPACE={shlex.quote(str(workspace))}", *profile.setup]
    setup += task_env_lines(profile)

    if profile.executor == "local":
        # local array tasks run side by side: tell each how many cores are its share
        setup.append(f"export ESM3_JOB_CPUS={cpus}")
        if nodes != 1:
            raise ConfigError(f"profile '{profile.name}': {nodes} nodes requested, local runs one")
        ex = submitit.LocalExecutor(folder, max_num_timeout=profile.max_requeues, python=python)
        ex.update_parameters(
            timeout_min=time_min,
            tasks_per_node=tasks,
            gpus_per_node=gpus,
            signal_delay_s=profile.signal_delay_s,
            setup=setup,
        )
        return ex

    conf = check_ready(profile)
    if conf is not None:
        os.environ["SLURM_CONF"] = str(conf)
        setup.insert(0, f"export SLURM_CONF={shlex.quote(str(conf))}")
    ex = submitit.SlurmExecutor(folder, max_num_timeout=profile.max_requeues, python=python)
    extra = dict(profile.sbatch_extra)
    if r.dependency:
        extra["dependency"] = r.dependency
    params: dict[str, object] = dict(
        job_name=job_name,
        time=time_min,
        nodes=nodes,
        ntasks_per_node=tasks,
        cpus_per_task=cpus,
        signal_delay_s=profile.signal_delay_s,
        array_parallelism=profile.array_parallelism,
        setup=setup,
        stderr_to_stdout=False,
    )
    for key, val in (
        ("partition", profile.partition),
        ("account", profile.account),
        ("qos", profile.qos),
    ):
        if val:
            params[key] = val
    if gpus:
        params["gpus_per_node"] = gpus
    if mem:
        params["mem"] = f"{int(mem * 1024)}M"
    if extra:
        params["additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex
