"""The image recipes: lint, Apptainer definition, smoke script, and (marked `images`) a real
podman build on a debootstrap CPU base with the smoke test run inside the image."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.realdata import uniprot_fasta

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
PODMAN_CONF = CONTAINERS / "podman.conf"


def _tool(name: str) -> str:
    """A console script of the project's venv (next to this python) or on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (make setup installs the dev extras)")
    return found


def _dockerfile_default(arg: str) -> str:
    m = re.search(rf"^ARG {arg}=(\S+)$", (CONTAINERS / "Dockerfile").read_text(), re.M)
    assert m, f"containers/Dockerfile has no default for ARG {arg}"
    return m.group(1)


def _make_default(var: str) -> str:
    m = re.search(rf"^{var} \?= (\S+)$", (CONTAINERS / "images.mk").read_text(), re.M)
    assert m, f"containers/images.mk does not set {var}"
    return m.group(1)


# ---- hadolint -------------------------------------------------------------------------


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            _tool("hadolint"),
            "--no-color",
            "--config",
            str(ROOT / ".hadolint.yaml"),
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_dockerfile_passes_hadolint() -> None:
    r = _hadolint(CONTAINERS / "Dockerfile")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == ""


def test_hadolint_config_still_catches_mistakes(tmp_path: Path) -> None:
    """The committed config must not silence the rules the recipe is meant to follow."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM debian\nRUN apt-get update && apt-get install -y mmseqs2\nRUN pip install torch\n"
    )
    r = _hadolint(bad)
    assert r.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013", "DL3042"):  # untagged base, unpinned apt/pip
        assert rule in r.stdout, f"{rule} not reported:\n{r.stdout}"


# ---- Apptainer definition -----------------------------------------------------------


def test_apptainer_definition_parses_and_names_the_image() -> None:
    parsers = pytest.importorskip("spython.main.parse.parsers", reason="spython not installed")
    text = (CONTAINERS / "esm3.def").read_text()
    recipe = parsers.SingularityParser(str(CONTAINERS / "esm3.def")).recipe["spython-base"]
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)", text, re.M))
    # Built from the archive `make sif` saves of the image `make image` builds ...
    assert header["Bootstrap"] == "docker-archive"
    assert recipe.fromHeader == header["From"] == _make_default("IMAGE_ARCHIVE")
    # ... whose base is the Dockerfile's default base image.
    labels = dict(label.split(None, 1) for label in recipe.labels)
    assert labels["BaseImage"] == _dockerfile_default("BASE_IMAGE")
    assert labels["BaseImage"].startswith("nvcr.io/nvidia/pytorch:")
    assert any("/usr/local/bin/esm3-smoke" in line for line in recipe.install), "%test"
    assert "apptainer exec --nv --bind" in text


def test_smoke_script_is_installed_where_the_definition_runs_it() -> None:
    dockerfile = (CONTAINERS / "Dockerfile").read_text()
    assert "COPY containers/smoke.sh /usr/local/bin/esm3-smoke" in dockerfile
    assert 'CMD ["/usr/local/bin/esm3-smoke", "--versions"]' in dockerfile  # HEALTHCHECK


# ---- build helpers ------------------------------------------------------------------


def _load_pyproject_deps():
    spec = importlib.util.spec_from_file_location(
        "pyproject_deps", CONTAINERS / "pyproject_deps.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dependency_layer_keeps_an_installed_torch(tmp_path: Path) -> None:
    deps = _load_pyproject_deps()
    pytest.importorskip("torch")
    reqs = deps.runtime_requirements(ROOT / "pyproject.toml", [], {"torch"})
    assert not any(deps.requirement_name(r) == "torch" for r in reqs)
    assert "submitit" in {deps.requirement_name(r) for r in reqs}
    # A name to keep that is not installed stays a requirement; extras are appended.
    toml = tmp_path / "pyproject.toml"
    toml.write_text(
        '[project]\nname = "x"\ndependencies = ["Not_Installed.pkg>=1", "numpy"]\n'
        '[project.optional-dependencies]\ngpu = ["xformers"]\n'
    )
    assert deps.runtime_requirements(toml, ["gpu"], {"not-installed-pkg", "numpy"}) == [
        "Not_Installed.pkg>=1",
        "xformers",
    ]
    with pytest.raises(SystemExit, match=r"pyproject.toml: no optional-dependencies group 'cuda'"):
        deps.runtime_requirements(toml, ["cuda"], set())


# ---- smoke script (its version step on the host's tools) -----------------------------


def _smoke_versions(tmp_path: Path, mmseqs: str, dssp: str) -> subprocess.CompletedProcess[str]:
    for tool in ("mmseqs", "mkdssp"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (make setup installs it)")
    env_file = tmp_path / "tools.env"
    env_file.write_text(f"MMSEQS2_VERSION={mmseqs}\nDSSP_VERSION={dssp}\n")
    env = {**os.environ, "ESM3_TOOLS_ENV": str(env_file), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(CONTAINERS / "smoke.sh"), "--versions"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_smoke_versions_accepts_the_pinned_tools(tmp_path: Path) -> None:
    pins = {k: _dockerfile_default(k) for k in ("MMSEQS2_VERSION", "DSSP_VERSION")}
    r = _smoke_versions(tmp_path, pins["MMSEQS2_VERSION"], pins["DSSP_VERSION"])
    if r.returncode != 0 and "is " in r.stderr and "pinned" in r.stderr:
        pytest.skip(f"this host's tools are not the pinned builds: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"smoke: mmseqs2 {pins['MMSEQS2_VERSION']}" in r.stdout
    assert "smoke: versions ok" in r.stdout


def test_smoke_versions_rejects_another_dssp(tmp_path: Path) -> None:
    r = _smoke_versions(tmp_path, _dockerfile_default("MMSEQS2_VERSION"), "9.9.9")
    assert r.returncode == 1
    assert re.search(r"smoke: FAILED: mkdssp is \S+, pinned 9\.9\.9", r.stderr), r.stderr


# ---- the real build (make test-images) ------------------------------------------------

images = pytest.mark.skipif(
    os.environ.get("ESM3_TEST_IMAGES") != "1",
    reason="builds container images (minutes): run `make test-images` (sets ESM3_TEST_IMAGES=1)",
)
IMAGE = "esm3-suite:cpu"


def _podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(PODMAN_CONF)}


def _podman(*args: str, timeout: float = 600, check: bool = True) -> str:
    if not shutil.which("podman"):
        pytest.skip("podman not installed (make base-cpu / make test-images installs it)")
    r = subprocess.run(
        ["podman", *args], capture_output=True, text=True, env=_podman_env(), timeout=timeout
    )
    if check:
        assert r.returncode == 0, f"podman {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def cpu_image() -> str:
    """The recipe built on the debootstrap CPU base, through the same make target users run."""
    uniprot_fasta()  # the tools stage takes its smoke sequences from this package
    if not shutil.which("podman") or not shutil.which("make"):
        pytest.skip("podman or make not installed (make test-images installs podman)")
    r = subprocess.run(
        ["make", "-f", "containers/images.mk", "image-cpu", f"BIN={Path(sys.executable).parent}",
         f"IMAGE_CPU={IMAGE}"],
        capture_output=True, text=True, cwd=ROOT, timeout=3600,
    )  # fmt: skip
    assert r.returncode == 0, f"make image-cpu failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return IMAGE


@pytest.mark.images
@images
def test_smoke_passes_inside_the_cpu_image(cpu_image: str) -> None:
    out = _podman("run", "--rm", "--network", "host", "--no-healthcheck", cpu_image, "esm3-smoke")
    assert "smoke: all checks passed" in out, out
    assert f"smoke: mmseqs2 {_dockerfile_default('MMSEQS2_VERSION')}" in out
    assert f"mkdssp {_dockerfile_default('DSSP_VERSION')}" in out
    assert re.search(r"smoke: linclust: 18 sequences -> \d+ clusters", out), out
    assert "smoke: mkdssp: 1CBS 137 residues" in out


@pytest.mark.images
@images
def test_image_runs_as_non_root_with_a_healthcheck(cpu_image: str) -> None:
    assert _podman("run", "--rm", "--no-healthcheck", cpu_image, "id", "-u").strip() != "0"
    inspect = json.loads(_podman("image", "inspect", IMAGE))[0]
    assert inspect["Config"]["User"] == "10001:10001"
    assert inspect["Healthcheck"]["Test"] == ["CMD", "/usr/local/bin/esm3-smoke", "--versions"]
    # the healthcheck command itself passes in the image
    out = _podman("run", "--rm", "--no-healthcheck", cpu_image, *inspect["Healthcheck"]["Test"][1:])
    assert "smoke: versions ok" in out


@pytest.mark.images
@images
def test_bound_workspace_stand_in(cpu_image: str, tmp_path: Path) -> None:
    """The cluster profile's podman stand-in: the job's python with the workspace bound at the
    same path, running as the calling user so that its files belong to them."""
    ws = tmp_path / "ws"
    ws.mkdir()
    code = "import esm3, pathlib, sys; pathlib.Path(sys.argv[1], 'out.txt').write_text('ok')"
    _podman(
        "run", "--rm", "--network", "host", "--no-healthcheck", "--user", f"{os.getuid()}:{os.getgid()}",
        "-v", f"{ws}:{ws}", cpu_image, "python", "-c", code, str(ws),
    )  # fmt: skip
    assert (ws / "out.txt").read_text() == "ok"
    assert (ws / "out.txt").stat().st_uid == os.getuid()


@pytest.mark.images
@images
def test_build_context_leaves_out_venv_git_and_workspace(tmp_path: Path) -> None:
    """What .dockerignore lets into the build: source and build/wheels, never .venv or .git."""
    base = _make_default("BASE_CPU")
    _podman("version")  # skips without podman
    if subprocess.run(["podman", "image", "exists", base], env=_podman_env()).returncode != 0:
        pytest.skip(f"{base} not built (make base-cpu)")
    probe = tmp_path / "Dockerfile.context"
    probe.write_text(f"FROM {base}\nCOPY . /ctx\nRUN find /ctx -maxdepth 2 | sort\n")
    (ROOT / "build" / "wheels").mkdir(parents=True, exist_ok=True)
    out = _podman("build", "--no-cache", "-f", str(probe), "-t", "esm3-context-probe", str(ROOT))
    _podman("rmi", "-f", "esm3-context-probe", check=False)
    listed = set(re.findall(r"^/ctx/(\S+)$", out, re.M))
    assert {"esm3", "jobs", "containers", "pyproject.toml", "build/wheels"} <= listed, listed
    assert not listed & {".venv", ".git", "workspace", ".slurm", "build/base-cpu"}, listed


@pytest.mark.slurm
@pytest.mark.images
@images
def test_slurm_job_with_a_container_profile_runs_inside_the_image(
    cpu_image: str, slurm_cluster, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job on the local SLURM cluster whose profile names the image: podman stands in for
    apptainer, the job's python is the image's, and the job records its run as usual."""
    from esm3.metrics.catalog import query
    from jobs import launch
    from jobs.clusters import Container, load_profile

    monkeypatch.setenv("CONTAINERS_CONF", str(PODMAN_CONF))  # sbatch exports it to the job
    profile = load_profile("slurm-local")
    # --user: files the job writes into the bound workspace belong to the submitting user
    profile.container = Container(
        image=cpu_image,
        runtime="podman",
        extra_args=["--user", f"{os.getuid()}:{os.getgid()}", "--no-healthcheck"],
    )
    run_id = launch.start_run(workspace, kind="test", name="in-image", profile=profile)
    tools_env = Path("/usr/local/share/esm3/tools.env")  # exists only inside the image
    sub = launch.submit_job(
        workspace, profile, run_id=run_id, stage="in-image", fn=Path.read_text, args=(tools_env,)
    )
    (text,) = sub.wait(timeout_s=300)
    launch.finish_run(workspace, run_id, "COMPLETED")
    assert f"MMSEQS2_VERSION={_dockerfile_default('MMSEQS2_VERSION')}" in text
    jobs = query(workspace, "SELECT * FROM jobs WHERE run_id = ? ORDER BY updated_at", [run_id])
    assert jobs.state.iloc[-1] == "COMPLETED", jobs[["state", "error"]]
    assert set(jobs.node.dropna()) <= {"node1", "node2"}
    runs = query(workspace, "SELECT image, status FROM runs WHERE run_id = ?", [run_id])
    assert runs.image[0] == cpu_image and runs.status[0] == "COMPLETED"
