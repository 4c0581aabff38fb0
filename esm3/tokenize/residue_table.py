"""esm's residue-annotation table: residue labels with the released model's token ids.

The table ships with EvolutionaryScale's model download
(`uniref90_and_mgnify90_residue_annotations_gt_1k_proteins.csv`, columns
`label,label_clean,count`). `label` is an InterPro site description as InterProScan reports
it; `label_clean` the label it counts as. esm's residue tokenizer orders the clean labels by
their summed count, descending, ties in text order (a stable sort after grouping), and gives
label k the id `FIRST_LABEL + k`; a site whose description is not a `label` gets `<unk>`.

Our records carry a site's `label` (`signature:site type`), not its description, so the
vocabulary stage maps each site label to a clean label through the description the site
rows hold (`site_aliases`): the match is on the description, exactly as esm's.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TABLE_COLUMNS = ("label", "label_clean", "count")


@dataclass(frozen=True)
class ResidueTable:
    """Clean labels in esm's token order and each description's clean label."""

    labels: tuple[str, ...]
    clean: dict[str, str]  # description (the table's `label`) -> label_clean


def read_residue_table(path: str | Path) -> ResidueTable:
    """esm's residue table; ValueError naming the file, and the row where one is bad."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in TABLE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"residue table {path}: no column {', '.join(missing)} "
                                 f"(expected {','.join(TABLE_COLUMNS)})")  # fmt: skip
            rows = [_row(r, path, i) for i, r in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"residue table {path}: unreadable ({e})") from e
    clean: dict[str, str] = {}
    totals: dict[str, int] = defaultdict(int)
    for line, (label, label_clean, count) in rows:
        if clean.setdefault(label, label_clean) != label_clean:
            raise ValueError(f"residue table {path}: line {line}: label {label!r} is "
                             f"{clean[label]!r} and {label_clean!r}")  # fmt: skip
        totals[label_clean] += count
    order = sorted(totals, key=lambda lab: (-totals[lab], lab))
    return ResidueTable(tuple(order), clean)


def _row(r: dict, path: str | Path, line: int) -> tuple[int, tuple[str, str, int]]:
    label, label_clean, count = (r[c] for c in TABLE_COLUMNS)
    if not label or not label_clean:
        raise ValueError(f"residue table {path}: line {line}: empty label or label_clean")
    try:
        return line, (label, label_clean, int(count))
    except (TypeError, ValueError):
        raise ValueError(f"residue table {path}: line {line}: count {count!r} "
                         "is not an integer") from None  # fmt: skip


@dataclass(frozen=True)
class SiteAliases:
    """Site label -> clean label, and the site rows whose description is not in the table
    (esm gives those `<unk>`)."""

    aliases: dict[str, str]
    unknown_rows: int
    rows: int


def site_aliases(counts: Iterable[tuple[str, str, int]], table: ResidueTable) -> SiteAliases:
    """Aliases of site labels from (label, description, rows) counts: a label takes the
    clean label of its most frequent description (then the first in text order), so one
    label is one token; no alias when that description is not in the table."""
    best: dict[str, tuple[int, str]] = {}
    unknown = total = 0
    for label, description, n in counts:
        total += n
        unknown += n if description not in table.clean else 0
        prev = best.get(label)
        if prev is None or (-n, description) < (-prev[0], prev[1]):
            best[label] = (n, description)
    aliases = {lab: table.clean[d] for lab, (_, d) in best.items() if d in table.clean}
    return SiteAliases(dict(sorted(aliases.items())), unknown, total)
