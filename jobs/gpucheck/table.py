"""The check's one table: a row per check, printed as it completes (fixed width), and
written whole as Markdown or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# results start with one of these words
OK, FAIL, UNAVAILABLE, SKIPPED = "ok", "FAIL", "unavailable", "skipped"
_WIDTHS = (44, 10, 6, 9)  # check, tokens/s, MFU, peak GiB; the result column is last
COLUMNS = ("check", "tokens/s", "MFU", "peak GiB", "result")


@dataclass
class Row:
    check: str
    result: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None

    @property
    def failed(self) -> bool:
        return self.result.startswith(FAIL)

    def cells(self) -> tuple[str, str, str, str, str]:
        tps = "" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}"
        mfu = "" if self.mfu is None else f"{100 * self.mfu:.1f}%"
        mem = "" if self.peak_gib is None else f"{self.peak_gib:.1f}"
        return self.check, tps, mfu, mem, self.result


def _line(cells: tuple[str, ...]) -> str:
    name, *nums, result = cells
    parts = [name.ljust(_WIDTHS[0])]
    parts += [c.rjust(w) for c, w in zip(nums, _WIDTHS[1:], strict=True)]
    return "  ".join([*parts, result]).rstrip()


def header() -> str:
    """The header line and a rule, printed before the first row."""
    head = _line(COLUMNS)
    return head + "\n" + "-" * max(len(head), 100)


def text_row(row: Row) -> str:
    return _line(row.cells())


def markdown(rows: list[Row], meta: dict[str, str]) -> str:
    lines = [f"- {k}: {v}" for k, v in meta.items()] + ["", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r.cells()) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(path: Path, rows: list[Row], meta: dict[str, str]) -> None:
    """The table as JSON (a .json path) or Markdown (anything else); written then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        text = json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1)
    else:
        text = markdown(rows, meta)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
