"""The `esm3` command: one entry point, a subcommand per job, `--help` on each.

Every error a user can fix is one line on stderr and a non-zero exit, before anything
is submitted.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
from pathlib import Path

from jobs.errors import UserError

EPILOG = "Workspace: --workspace, else $ESM3_WORKSPACE, else ./workspace."


def _ws_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workspace", "-w", help="workspace folder (default: $ESM3_WORKSPACE or ./workspace)"
    )


def _cluster_arg(p: argparse.ArgumentParser, default: str = "local") -> None:
    from jobs.clusters import available_profiles

    p.add_argument(
        "--cluster",
        "-c",
        default=os.environ.get("ESM3_CLUSTER", default),
        help=f"cluster profile name or .toml path ({', '.join(available_profiles())}; default: {default})",
    )


def _sql_limit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits for user SQL (defaults from ESM3_SQL_* or built in)")
    g.add_argument("--timeout", type=float, help="stop the query after N s (default 60)")
    g.add_argument("--memory", help="DuckDB memory limit, e.g. 1GB (default 1GB)")
    g.add_argument("--threads", type=int, help="DuckDB threads (default 2)")
    g.add_argument("--max-rows", type=int, help="rows fetched at most (default 10000)")
    g.add_argument("--temp", help="spill space in a scratch folder, e.g. 2GB (default 2GB)")


# --- subcommands --------------------------------------------------------------------------


def cmd_slurm(a: argparse.Namespace) -> int:
    from jobs import slurm_local

    if a.nodes < 1:  # before any action: nothing is started or stopped on a bad count
        raise UserError(f"--nodes must be >= 1, got {a.nodes}")
    if a.action == "up":
        c = slurm_local.up(nodes=a.nodes)
        if c.resumed:
            print(f"resumed {', '.join(c.resumed)}: left drained by the last `esm3 slurm down`")
        print(f"local SLURM cluster up: {', '.join(c.node_names)} idle; SLURM_CONF={c.conf}")
    elif a.action == "down":
        report = slurm_local.down()
        print("\n".join(report.lines()))
        return 1 if report.left else 0
    else:
        st = slurm_local.status()
        print(json.dumps(st, indent=2))
        return 0 if st["nodes"] else 1
    return 0


def _warn_corrupt(bad: dict[Path, str]) -> None:
    for path, reason in bad.items():
        print(f"esm3: warning: skipped corrupt lake file {path}: {reason}", file=sys.stderr)


def _sql_limits(a: argparse.Namespace):  # type: ignore[no-untyped-def]
    from esm3.metrics.reader import Limits

    return Limits.from_env(
        memory=a.memory, threads=a.threads, max_rows=a.max_rows, temp=a.temp, timeout_s=a.timeout
    )


def cmd_sql(a: argparse.Namespace) -> int:
    import duckdb

    from esm3.metrics.reader import LakeReader
    from jobs import workspace

    ws = workspace.for_reading(a.workspace)
    sql = a.query if a.query != "-" else sys.stdin.read()
    limits = _sql_limits(a)
    with LakeReader(ws) as r:
        try:
            df, truncated = r.user_sql(sql, limits)
        except duckdb.Error as e:  # bad column, syntax: DuckDB's first line says which
            raise UserError(f"SQL error: {str(e).splitlines()[0]}") from e
        finally:
            _warn_corrupt(r.bad_paths)
    _print_frame(df, a.format)
    if truncated:
        print(f"esm3 sql: note: first {limits.max_rows:,} rows shown (--max-rows)", file=sys.stderr)
    return 0


def _print_frame(df, fmt: str) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    if fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        print(df.to_json(orient="records", date_format="iso"))
    else:
        with pd.option_context(
            "display.max_rows",
            200,
            "display.max_columns",
            50,
            "display.width",
            200,
            "display.max_colwidth",
            60,
        ):
            print(df.to_string(index=False) if len(df) else "(no rows)")


def cmd_status(a: argparse.Namespace) -> int:
    from esm3.metrics.catalog import query
    from jobs import records, workspace

    if a.limit < 1:
        raise UserError(f"--limit must be a positive number of runs, not {a.limit}")
    ws = workspace.for_reading(a.workspace)
    try:
        records.reconcile(ws, a.run_id)
    except OSError as e:  # a full or read-only workspace: show what is recorded
        print(f"esm3 status: warning: states not reconciled ({e.strerror or e})", file=sys.stderr)
    if a.run_id:
        runs = query(
            ws,
            "SELECT run_id, kind, name, status, cluster, slurm_job_id, nodes, world_size, "
            "submitted_at, finished_at FROM runs WHERE run_id = ?",
            [a.run_id],
        )
        if runs.empty:
            raise UserError(f"no run {a.run_id!r} in {ws}")
        _print_frame(runs, a.format)
        print()
        jobs = query(
            ws,
            """SELECT stage, job_id, array_index, attempt, rank, node, state, exit_code,
                       regexp_replace(coalesce(error, ''), '\\s+', ' ', 'g')[-120:] AS error
                FROM jobs WHERE run_id = ?
                ORDER BY stage, array_index NULLS FIRST, job_id, rank, attempt""",
            [a.run_id],
        )
        _print_frame(jobs, a.format)
    else:
        runs = query(
            ws,
            """SELECT run_id, kind, name, status, cluster, nodes, submitted_at, finished_at
                FROM runs ORDER BY submitted_at DESC LIMIT ?""",
            [a.limit],
        )
        _print_frame(runs, a.format)
    return 0


def cmd_compact(a: argparse.Namespace) -> int:
    from esm3.metrics.lake import compact
    from esm3.metrics.schema import PARTITIONED
    from esm3.metrics.summaries import write_summaries
    from jobs import workspace

    ws = workspace.for_reading(a.workspace)
    for table in sorted(PARTITIONED):
        n = compact(ws, table, run_id=a.run_id, min_files=2)
        print(f"{table}: {n} files merged")
    # single files merged before summaries existed get theirs too
    print(f"train_steps: {write_summaries(ws)} merged files summarised")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(a)


def cmd_bench(a: argparse.Namespace) -> int:
    from jobs.bench.runner import run_benchmarks

    return run_benchmarks(a)


def cmd_dashboard(a: argparse.Namespace) -> int:
    from jobs import workspace

    ws = workspace.prepare(a.workspace)
    # the SQL page's limits reach the Streamlit server through its environment
    os.environ.update({k: str(v) for k, v in _sql_limits(a).env().items()})
    try:
        from dashboard.serve import serve
    except ImportError as e:
        raise UserError(f"the dashboard is not installed in this build ({e})") from e
    return serve(ws, host=a.host, port=a.port)


# --- parser -------------------------------------------------------------------------------

# the modules that add a command of their own (`add_parser(subparsers, COMMON)`)
STAGE_MODULES = ("jobs.preprocess", "jobs.train.cli", "jobs.convert")


class _Common:
    """What stage modules use to build their subparsers the same way as the rest."""

    epilog = EPILOG
    workspace = staticmethod(_ws_arg)
    cluster = staticmethod(_cluster_arg)

    @staticmethod
    def print_frame(df, fmt: str = "table") -> None:  # type: ignore[no-untyped-def]
        _print_frame(df, fmt)


COMMON = _Common()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="esm3",
        description="ESM3 training suite: preprocessing arrays, FSDP training, metrics in DuckDB.",
        epilog=EPILOG,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log more (INFO)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # stage commands live with their orchestration: each of STAGE_MODULES adds its own
    # subparser with `add_parser(subparsers, COMMON)`, setting `fn` to its entry point
    for module in STAGE_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_parser(sub, COMMON)

    s = sub.add_parser(
        "slurm",
        help="a local SLURM cluster for development and tests",
        description="Start/stop a real SLURM cluster on this host (munged, slurmctld, one slurmd per node).",
    )
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--nodes", type=int, default=2, help="emulated nodes (default 2)")
    s.set_defaults(fn=cmd_slurm)

    s = sub.add_parser(
        "sql",
        help="read-only SQL over the catalog",
        epilog=EPILOG,
        description="Run read-only SQL over the catalog (tables: runs, jobs, train_steps, events, dataset_stats, token_stats, rejects, benchmarks). Writes are refused.",
    )
    s.add_argument("query", help="SQL text, or - to read it from stdin")
    s.add_argument("--format", "-f", choices=["table", "csv", "json"], default="table")
    _sql_limit_args(s)
    _ws_arg(s)
    s.set_defaults(fn=cmd_sql)

    s = sub.add_parser(
        "status",
        help="runs, jobs and their states",
        epilog=EPILOG,
        description="Show runs (or one run's jobs), reconciling job states with the scheduler first.",
    )
    s.add_argument("run_id", nargs="?", help="a run id (default: the latest runs)")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--format", "-f", choices=["table", "csv", "json"], default="table")
    _ws_arg(s)
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser(
        "compact",
        help="merge the metrics lake's step and event files (fast dashboard pages)",
        epilog=EPILOG,
        description="Merge each run's train_steps and events files into one per folder and "
        "write the step summaries the dashboard reads. Training does this as it goes; run it "
        "once on a lake written before that, or by an interrupted writer. Safe while the "
        "dashboard or a run reads the lake.",
    )
    s.add_argument("run_id", nargs="?", help="only this run (default: every run)")
    _ws_arg(s)
    s.set_defaults(fn=cmd_compact)

    s = sub.add_parser(
        "demo",
        help="the main job on the embedded default, on real data",
        epilog=EPILOG,
        description="Run the suite's main job on real data (Debian's mmseqs2-examples) and show what `esm3 sql` sees.",
    )
    _ws_arg(s)
    _cluster_arg(s)
    s.add_argument(
        "--config", help="TOML config (default: the embedded demo: 4 shards of mmseqs2-examples)"
    )
    s.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. shards=8"
    )
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser(
        "bench",
        help="benchmarks; results into the `benchmarks` table",
        epilog=EPILOG,
        description="Run the benchmarks (ratios against baselines run side by side) and write them to the `benchmarks` table.",
    )
    s.add_argument("suites", nargs="*", help="suites to run (default: all)")
    s.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    _ws_arg(s)
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser(
        "dashboard",
        help="the Streamlit dashboard on the workspace",
        epilog=EPILOG,
        description="Serve the Streamlit dashboard (localhost by default).",
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8501)
    _sql_limit_args(s)
    _ws_arg(s)
    s.set_defaults(fn=cmd_dashboard)
    return p


def main(argv: list[str] | None = None) -> int:
    """The `esm3` command; returns the exit code."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a reader that left shows here rather than at interpreter exit
    except BrokenPipeError:
        return _stdout_gone()


def _stdout_gone() -> int:
    """The reader of our output went away (`esm3 sql ... | head -1`): stop quietly with the
    status of a process ended by SIGPIPE, as other command-line tools do."""
    # what is still buffered goes nowhere instead of failing again at interpreter exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    from esm3.metrics.catalog import SqlRefused
    from jobs.config import ConfigError
    from jobs.launch import JobFailed
    from jobs.slurm_local import SlurmLocalError
    from jobs.workspace import WorkspaceError

    parser = build_parser()
    # `key=value` overrides may come after options too (`esm3 demo -c local shards=8`)
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        return int(args.fn(args) or 0)
    except (UserError, ConfigError, WorkspaceError, SlurmLocalError, SqlRefused) as e:
        print(f"esm3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"esm3 {args.command}: job failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"esm3 {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        full = _no_space(e)
        if full is None:
            raise
        from jobs.workspace import resolve

        where = full.filename or f"the workspace {resolve(getattr(args, 'workspace', None))}"
        print(f"esm3 {args.command}: error: no space left on device: {where}", file=sys.stderr)
        return 1


def _no_space(e: BaseException) -> OSError | None:
    """The ENOSPC behind `e` (itself, or what it was raised from), if any: a full disk is
    one line for the user, not a traceback."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return cur
        if "No space left on device" in str(cur):  # DuckDB's IO errors carry no errno
            return OSError(errno.ENOSPC, "No space left on device")
        cur = cur.__cause__ or cur.__context__
    return None


if __name__ == "__main__":
    raise SystemExit(main())
