"""`esm3 bench` / `make bench`: run the benchmark suites, print them, write `benchmarks`."""

from __future__ import annotations

import importlib
import json
import pkgutil
import socket
import sys
import time
import traceback
from typing import Any

import jobs.bench as bench_pkg


def suites() -> list[str]:
    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules(bench_pkg.__path__)
        if m.name.startswith("bench_")
    )


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def run_benchmarks(a: Any) -> int:
    from esm3.metrics.lake import write_rows
    from jobs import launch, workspace
    from jobs.clusters import load_profile
    from jobs.errors import UserError

    known = suites()
    chosen = a.suites or known
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise UserError(f"unknown benchmark suite(s) {unknown} (available: {', '.join(known)})")
    ws = workspace.prepare(a.workspace)
    run_id = launch.start_run(
        ws,
        kind="bench",
        name=",".join(chosen),
        profile=load_profile("local"),
        config={"suites": chosen, "quick": a.quick},
    )
    host = socket.gethostname()
    failed = []
    for name in chosen:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            mod = importlib.import_module(f"jobs.bench.bench_{name}")
            rows = mod.run(quick=a.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        for r in rows:
            r.setdefault("suite", name)
            if isinstance(r.get("params"), dict):
                r["params"] = json.dumps(r["params"], sort_keys=True, default=str)
            r.update(run_id=run_id, host=host)
            extra = (
                f"  (baseline {_fmt(r.get('baseline'))}, ratio {_fmt(r.get('ratio'))})"
                if r.get("ratio") is not None
                else ""
            )
            print(
                f"  {r['name']:<44} {r['metric']:<22} {_fmt(r['value']):>12} {r.get('unit') or ''}{extra}"
            )
        write_rows(ws, "benchmarks", rows)
        print(f"   ({time.monotonic() - t0:.1f}s)", flush=True)
    launch.finish_run(ws, run_id, "FAILED" if failed else "COMPLETED")
    shown = '"SELECT * FROM benchmarks WHERE run_id = ?"'.replace("?", repr(run_id))
    print("\nresults in the `benchmarks` table: esm3 sql " + shown)
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
