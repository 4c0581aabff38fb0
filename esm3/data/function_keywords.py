"""The function tokenizer's tables built from InterPro's own files (ESM3 appendix A.1.8):

- `entry.list`: TSV with header ENTRY_AC, ENTRY_TYPE, ENTRY_NAME (one InterPro entry a line);
- `interpro2go` (optional): lines `InterPro:IPR000003 Retinoid X receptor/HNF4 > GO:DNA
  binding ; GO:0003677`, comments starting with "!";
- `go-basic.obo` (optional): GO term names from `[Term]` stanzas (`id:`, `name:`); without
  it the GO names written in interpro2go are used.

An entry's keywords are the unigrams and bigrams of its name and of its GO terms' names
(`keywords_from_text`, repeats kept: they are the term frequency). The IDF treats each
entry as a document (its keyword set), smoothed as sklearn's TfidfVectorizer, which esm
mimics: idf = ln((1 + n) / (1 + df)) + 1. Hyperplanes are Gaussian, rows L2-normalised.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from esm3.tokenize.function_tokens import (
    FUNCTION_DEPTH,
    LSH_BITS,
    FunctionTokenizer,
    keywords_from_text,
)

ENTRY_COLUMNS = ("ENTRY_AC", "ENTRY_TYPE", "ENTRY_NAME")
_ACCESSION = re.compile(r"IPR\d+")
_INTERPRO2GO = re.compile(r"InterPro:(IPR\d+)\s.*>\s*GO:(.*?)\s*;\s*(GO:\d{7})\s*$")
_GO_ID = re.compile(r"GO:\d{7}")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end) of a text file, gzip or plain."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            yield number, line.rstrip("\r\n")


def _bad(path: Path, record: str, reason: str) -> ValueError:
    return ValueError(f"InterPro file {path}: {record}: {reason}")


def read_entry_list(path: str | Path) -> dict[str, str]:
    """InterPro accession -> entry name, in file order. Leading "#" lines are skipped."""
    path = Path(path)
    lines = _lines(path)
    _, head = next(lines, (0, ""))
    while head.startswith("#"):  # leading comments (our stand-in files say what they are)
        _, head = next(lines, (0, ""))
    columns = head.split("\t")
    missing = [c for c in ENTRY_COLUMNS if c not in columns]
    if missing:
        raise _bad(path, "line 1 (header)", f"columns {columns} lack {', '.join(missing)}")
    ac, name = columns.index("ENTRY_AC"), columns.index("ENTRY_NAME")
    entries: dict[str, str] = {}
    for number, line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise _bad(path, f"line {number}", f"{len(fields)} fields, header has {len(columns)}")
        acc = fields[ac]
        if not _ACCESSION.fullmatch(acc):
            raise _bad(path, f"line {number}", f"{acc!r} is not an InterPro accession")
        if acc in entries:
            raise _bad(path, f"line {number}", f"{acc} listed twice")
        entries[acc] = fields[name]
    return entries


def read_interpro2go(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """InterPro accession -> [(GO id, GO name as written in the file)], file order."""
    path = Path(path)
    out: dict[str, list[tuple[str, str]]] = {}
    for number, line in _lines(path):
        if not line.strip() or line.startswith("!"):
            continue
        m = _INTERPRO2GO.fullmatch(line)
        if m is None:
            raise _bad(path, f"line {number}", "not 'InterPro:IPR... name > GO:name ; GO:0000000'")
        out.setdefault(m.group(1), []).append((m.group(3), m.group(2)))
    return out


def read_go_names(path: str | Path) -> dict[str, str]:
    """GO id -> name from the [Term] stanzas of an OBO file (go-basic.obo)."""
    path = Path(path)
    names: dict[str, str] = {}
    stanza, term_id, start = "", None, 0

    alt_ids: list[str] = []

    def close() -> None:
        if stanza == "[Term]" and term_id is None:
            raise _bad(path, f"stanza at line {start}", "[Term] without an id")
        if term_id in names:
            for alt in alt_ids:
                names.setdefault(alt, names[term_id])
        alt_ids.clear()

    for number, line in _lines(path):
        if line.startswith("["):
            close()
            stanza, term_id, start = line.strip(), None, number
        elif stanza == "[Term]" and line.startswith("id:"):
            term_id = line[3:].strip()
            if not _GO_ID.fullmatch(term_id):
                raise _bad(path, f"line {number}", f"{term_id!r} is not a GO id")
        elif stanza == "[Term]" and line.startswith("alt_id:"):
            alt_ids.append(line[7:].strip())  # a merged term's old id, still in interpro2go
        elif stanza == "[Term]" and line.startswith("name:"):
            if term_id is None:
                raise _bad(path, f"line {number}", "name before the term's id")
            names[term_id] = line[5:].strip()
    close()
    if not names:
        raise _bad(path, "whole file", "no [Term] stanza with an id and a name")
    return names


def entry_keywords(
    entries: dict[str, str],
    interpro2go: dict[str, list[tuple[str, str]]] | None = None,
    go_names: dict[str, str] | None = None,
    source: str | Path = "go-basic.obo",
) -> dict[str, list[str]]:
    """Each entry's keywords: of its name, then of its GO terms' names (from `go_names` when
    given, else as written in interpro2go). ValueError naming the GO term missing from
    `go_names`."""
    out = {}
    for acc, name in entries.items():
        words = keywords_from_text(name)
        for go_id, go_name in (interpro2go or {}).get(acc, []):
            if go_names is not None:
                if go_id not in go_names:
                    raise _bad(Path(source), acc, f"{go_id} is not a term of the GO file")
                go_name = go_names[go_id]
            words += keywords_from_text(go_name)
        out[acc] = words
    return out


def smooth_idf(df: Counter[str], n_documents: int) -> dict[str, float]:
    """sklearn's smooth IDF from document frequencies: ln((1 + n) / (1 + df)) + 1."""
    return {w: float(np.log((1 + n_documents) / (1 + d)) + 1) for w, d in df.items()}


def random_hyperplanes(n_keywords: int, seed: int) -> np.ndarray:
    """(FUNCTION_DEPTH, LSH_BITS, n_keywords) Gaussian hyperplanes with unit rows."""
    h = np.random.default_rng(seed).standard_normal((FUNCTION_DEPTH, LSH_BITS, n_keywords))
    return h / np.linalg.norm(h, axis=-1, keepdims=True)


def build_function_tokenizer(
    entry_list: str | Path,
    interpro2go: str | Path | None = None,
    go_obo: str | Path | None = None,
    *,
    min_entries: int = 1,
    seed: int = 0,
) -> FunctionTokenizer:
    """The function tokenizer of InterPro's files: keywords present in at least
    `min_entries` entries (sorted), their IDF, each entry's keywords within that vocabulary
    (entries left without keywords are not in the table, so their labels are ignored) and
    hyperplanes drawn from `seed`."""
    if min_entries < 1:
        raise ValueError(f"min_entries must be >= 1, got {min_entries}")
    entries = read_entry_list(entry_list)
    go = read_interpro2go(interpro2go) if interpro2go else None
    names = read_go_names(go_obo) if go_obo else None
    words = entry_keywords(entries, go, names, go_obo or "")
    df = Counter(w for ws in words.values() for w in set(ws))  # documents: the entries
    idf = smooth_idf(df, len(words))
    vocabulary = sorted(w for w, d in df.items() if d >= min_entries)
    if not vocabulary:
        raise _bad(Path(entry_list), "whole file", f"no keyword in {min_entries}+ entries")
    kept = set(vocabulary)
    table = {acc: [w for w in ws if w in kept] for acc, ws in words.items()}
    table = {acc: ws for acc, ws in table.items() if ws}
    return FunctionTokenizer(
        vocabulary,
        np.array([idf[w] for w in vocabulary]),
        table,
        random_hyperplanes(len(vocabulary), seed),
    )
