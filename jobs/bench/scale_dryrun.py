"""The scale rehearsal's plan: `esm3 preprocess all --dry-run` of `site-example.toml` over a
synthetic inventory of 2 x 10^8 structure files (AFDB's size), as a site would run it.

The site config's paths are moved under a scratch folder that holds one small file per
pattern (the submit-time check looks for a first match only); the AFDB dataset reads plain
`.cif.gz` files there. Each structure dataset's `list` output is written directly by
DuckDB (an inventory in 1M-row groups and a current `listing.json`): AFDB `n` files, PDB
2 x 10^5 files, the ESM Atlas 10^3 bundles. The dry-run then
runs in a child process under the site profile (arrays capped at MaxArraySize - 1, at
most `max_tasks_per_stage` tasks per stage): its wall time, its peak RSS (the submitting
process), and the arrays and tasks it plans per stage.

`python -m jobs.bench.scale_dryrun [N]` runs it alone.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from esm3.data.duck import connect
from jobs.stages.config import CONFIG_DIR

SITE = CONFIG_DIR / "site-example.toml"
FULL_FILES = 200_000_000
QUICK_FILES = 200_000
AFDB_PATTERN = "afdb/v4/*/*.cif.gz"


def _touch_inputs(root: Path, text: str) -> None:
    """One small file of the right kind for every path pattern of the config."""
    for pat in re.findall(rf'"({re.escape(str(root))}/[^"]+)"', text):
        path = Path(pat.replace("*", "x").replace("[", "").replace("]", ""))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(".tar") or path.name.endswith(".tar.gz"):
            with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w"):
                pass
        elif path.name.endswith(".parquet"):
            con = connect()
            con.sql("COPY (SELECT 'x' AS id, 0.9 AS plddt, 0.9 AS ptm) TO $p (FORMAT parquet)",
                    params={"p": str(path)})  # fmt: skip
            con.close()
        else:
            path.write_bytes(gzip.compress(b">x\nM\n") if path.suffix == ".gz" else b">x\nM\n")


def site_config(root: Path) -> Path:
    """site-example.toml with its data under `root` and AFDB as plain files."""
    text = SITE.read_text().replace("/shared/data", str(root))
    text = text.replace(f'"{root}/afdb/v4/*.tar"', f'"{root}/{AFDB_PATTERN}"')
    _touch_inputs(root, text)
    out = root / "site.toml"
    out.write_text(text)
    return out


# the other structure datasets at the paper's sizes: PDB ~2 x 10^5 entries as files, the
# ESM Atlas as ~10^3 tar.gz bundles (split between tasks by the config's `split`)
OTHER_LISTINGS = {"pdb": (200_000, 0), "esmatlas": (0, 1_000)}


def _synthetic_listing(con, folder: Path, files: int, archives: int, stem: str) -> None:  # type: ignore[no-untyped-def]
    """files.parquet / archives.parquet of `files` plain files and `archives` bundles."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, ext in (("files", files, ".cif.gz"), ("archives", archives, ".tar.gz")):
        con.sql(
            """COPY (SELECT $dir || lpad((i // 20000)::VARCHAR, 5, '0') || '/' || $stem || i
                            || $ext AS path, 150000::BIGINT AS size, $stem || i AS id
                     FROM range($n) t(i))
               TO $out (FORMAT parquet, ROW_GROUP_SIZE 1000000, COMPRESSION zstd)""",
            params={"dir": f"{folder}/", "stem": stem, "ext": ext, "n": n,
                    "out": str(folder / f"{name}.parquet")},
        )  # fmt: skip


def write_listings(ws: Path, config: Path, n: int) -> float:
    """Every dataset's listing as the `list` stage leaves it: the structure datasets'
    synthetic (AFDB: `n` files), the sequence datasets' walked; seconds taken by the
    synthetic ones."""
    from jobs.stages.config import check_inputs, load_config
    from jobs.stages.inventory import list_task, plan_list
    from jobs.stages.runner import Layout

    cfg = load_config(config)
    lay = Layout.of(ws, cfg)
    inputs = check_inputs(cfg, ws, {"sequences", "structures"})
    lister, keys = plan_list(ws, "bench", cfg, inputs.patterns, inputs.metadata, lay)
    sizes = {"afdb": (n, 0), **OTHER_LISTINGS}
    for item in lister.items:  # the sequence datasets' few files: listed for real
        if item[2] not in sizes:
            list_task(*item)
    t0 = time.monotonic()
    con = connect()
    try:
        for name, (files, archives) in sizes.items():
            folder = lay.inventory(name)
            _synthetic_listing(con, folder, files, archives, f"{name.upper()}-")
            doc = {"key": keys[name], "dataset": name, "files": "files.parquet",
                   "listed_files": files, "archives": archives, "bytes": 150000 * files}  # fmt: skip
            (folder / "listing.json").write_text(json.dumps(doc))
    finally:
        con.close()
    return time.monotonic() - t0


# the child reports its own peak: VmHWM, as ru_maxrss keeps the forking parent's peak
_CHILD = ("import re, sys; from jobs.cli import main; rc = main(sys.argv[1:]); "
          "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
          "print('PEAK_RSS_KB', hwm, file=sys.stderr); sys.exit(rc)")  # fmt: skip


def dry_run(ws: Path, config: Path) -> dict:
    """The site's dry-run in a child process: seconds, peak RSS (MB), and its plan."""
    cmd = [sys.executable, "-c", _CHILD, "preprocess", "all", "--config", str(config),
           "--cluster", "site-example", "-w", str(ws), "--dry-run"]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - t0
    if proc.returncode:
        raise RuntimeError(f"dry-run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak = re.search(r"PEAK_RSS_KB (\d+)", proc.stderr)
    return {"seconds": seconds, "peak_rss_mb": int(peak.group(1)) / 1024 if peak else None,
            "plan": proc.stdout}  # fmt: skip


def plan_rows(plan: str) -> list[dict]:
    """(stage, items, tasks, arrays) of each line of the printed plan."""
    rows = []
    for m in re.finditer(r"^\s+([a-z-]+): (\d+) item\(s\) in (\d+) task\(s\) of <= (\d+), "
                         r"(\d+) array\(s\)", plan, re.MULTILINE):  # fmt: skip
        stage, items, tasks, per_task, arrays = m.groups()
        rows.append({"stage": stage, "items": int(items), "tasks": int(tasks),
                     "items_per_task": int(per_task), "arrays": int(arrays)})  # fmt: skip
    return rows


def rehearse(n: int, scratch: str | None = None) -> dict:
    """The whole case at `n` files: inventory written, dry-run measured."""
    with tempfile.TemporaryDirectory(dir=scratch, prefix="esm3-dryrun-") as tmp:
        root = Path(tmp)
        from jobs.workspace import prepare

        ws = prepare(root / "ws")
        config = site_config(root / "data")
        inventory_s = write_listings(ws, config, n)
        got = dry_run(ws, config)
        return {
            "files": n,
            "inventory_write_s": inventory_s,
            **got,
            "stages": plan_rows(got["plan"]),
        }


if __name__ == "__main__":
    res = rehearse(int(sys.argv[1]) if len(sys.argv) > 1 else QUICK_FILES)
    print(res.pop("plan"))
    print(json.dumps(res, indent=1))
