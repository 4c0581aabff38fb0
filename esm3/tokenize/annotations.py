"""Residue annotations (and the label vocabulary of the function track's source terms):
multi-label per residue, stored as token slots with `esm`'s ids.

Ids (as `esm`'s residue-annotation tokenizer): `<pad>` 0, `<motif>` 1, `<unk>` 2,
`<none>` 3, then label `vocab[k]` is token `FIRST_LABEL + k`. Each residue has `depth`
slots: its labels (in vocabulary order, at most `depth`), then `<pad>`; a residue without
a label has `<none>` in its first slot. Ids absent from the vocabulary are dropped (a
vocabulary keeps only frequent labels), unless the vocabulary has aliases (esm's residue
table, `esm3.tokenize.residue_table`): then a label is looked up through them and one
without an alias is `<unk>`, as in esm's tokenizer. The model embeds the slots with a summed
EmbeddingBag whose padding id is 0, and predicts them with a multi-label head (binary
cross-entropy over the labels).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from esm3.tokenize import function_tokens
from esm3.tokenize.function_tokens import FunctionFiles
from esm3.tokenize.specials import NONE, PAD, SHARED_SPECIAL_NAMES, UNK

FIRST_LABEL = NONE + 1
RESIDUE_DEPTH = 16

Annotation = tuple[str, int, int]  # (label id, start, end), 1-based inclusive


class AnnotationVocab:
    """A label vocabulary for the function or residue-annotation track."""

    def __init__(
        self, labels: Sequence[str], depth: int, aliases: Iterable[tuple[str, str]] = ()
    ) -> None:
        """`aliases`: (label a record carries, vocabulary label) pairs; with any, labels
        are read only through them and the others become `<unk>`."""
        if len(set(labels)) != len(labels):
            raise ValueError("annotation vocabulary has duplicate labels")
        if depth < 1:
            raise ValueError(f"annotation depth must be >= 1, got {depth}")
        self.labels = tuple(labels)
        self.depth = depth
        self.aliases = dict(aliases)
        index = {lab: i for i, lab in enumerate(self.labels)}
        stray = sorted(set(self.aliases.values()) - set(index))
        if stray:
            raise ValueError(f"annotation aliases name labels outside the vocabulary: {stray[:5]}")
        self._index = {a: index[lab] for a, lab in self.aliases.items()} if self.aliases else index

    @property
    def size(self) -> int:
        """Number of token ids: specials + NONE + labels."""
        return FIRST_LABEL + len(self.labels)

    @property
    def tokens(self) -> tuple[str, ...]:
        return SHARED_SPECIAL_NAMES + ("<none>",) + self.labels

    def encode(
        self, annotations: Iterable[Annotation], length: int, *, record: str = ""
    ) -> np.ndarray:
        """Slots of a sample's annotations, shape (length, depth), int64.

        Spans are 1-based inclusive and must lie in [1, length] with start <= end
        (ValueError naming the record otherwise). Unknown labels are skipped, or `<unk>`
        with aliases.
        """
        out = np.full((length, self.depth), PAD, dtype=np.int64)
        out[:, 0] = NONE
        ks, starts, ends = [], [], []
        for label, start, end in annotations:
            if not (1 <= start <= end <= length):
                where = f"record {record!r}: " if record else ""
                raise ValueError(
                    f"{where}annotation {label} span [{start}, {end}] outside [1, {length}]"
                )
            k = self._index.get(label, UNK - FIRST_LABEL if self.aliases else None)
            if k is not None:
                ks.append(k)
                starts.append(start - 1)
                ends.append(end)
        if not ks:
            return out
        uniq, row = np.unique(np.asarray(ks), return_inverse=True)
        delta = np.zeros((uniq.size, length + 1), dtype=np.int32)
        np.add.at(delta, (row, np.asarray(starts)), 1)
        np.add.at(delta, (row, np.asarray(ends)), -1)
        cover = np.cumsum(delta[:, :length], axis=1) > 0  # (K, L), rows in vocabulary order
        rank = np.cumsum(cover, axis=0) - 1  # slot each covering label takes
        keep = cover & (rank < self.depth)
        k_idx, pos = np.nonzero(keep)
        out[pos, rank[k_idx, pos]] = FIRST_LABEL + uniq[k_idx]
        return out

    def decode(self, slots: np.ndarray) -> list[set[str]]:
        """Per-residue label sets from slots (length, depth)."""
        return [
            {self.labels[t - FIRST_LABEL] for t in row if t >= FIRST_LABEL}
            for row in np.asarray(slots).tolist()
        ]


def multi_hot(slots: np.ndarray, vocab_size: int) -> np.ndarray:
    """Multi-label targets from slots (..., depth) -> (..., vocab_size - FIRST_LABEL) bool."""
    slots = np.asarray(slots)
    out = np.zeros(slots.shape[:-1] + (vocab_size - FIRST_LABEL,), dtype=bool)
    idx = np.nonzero(slots >= FIRST_LABEL)
    out[idx[:-1] + (slots[idx] - FIRST_LABEL,)] = True
    return out


VOCABULARY_SCHEME = "function-lsh-residue-slots-v1"  # the vocabulary file's layout


@dataclass(frozen=True)
class Vocabulary:
    """What a vocabulary file gives training: the function token tables (None: none were
    made), the residue-annotation labels in token order and, from esm's residue table, the
    (site label, residue label) aliases (sorted; empty without a table)."""

    function_files: FunctionFiles | None
    residue_labels: tuple[str, ...]
    residue_aliases: tuple[tuple[str, str], ...] = ()


def vocabulary_document(
    function_files: Mapping[str, str] | None,
    residue_labels: Sequence[str],
    residue_aliases: Mapping[str, str] | None = None,
    **about: object,
) -> dict:
    """The vocabulary file preprocessing writes and training reads (JSON): the function
    token tables (`function_files`: FunctionFiles field -> file name relative to the
    vocabulary file, or None), the residue labels in token order (with `residue_aliases`,
    site label -> residue label, when they come from esm's residue table), depths and
    token-id counts, and the scheme."""
    if function_files is not None and set(function_files) != set(_FUNCTION_FILE_KEYS):
        raise ValueError(f"function_files keys {sorted(function_files)}, "
                         f"expected {_FUNCTION_FILE_KEYS}")  # fmt: skip
    residue = {"depth": RESIDUE_DEPTH, "size": FIRST_LABEL + len(residue_labels),
               "labels": list(residue_labels)}  # fmt: skip
    if residue_aliases:
        AnnotationVocab(residue_labels, RESIDUE_DEPTH, residue_aliases.items())  # checks them
        residue["aliases"] = dict(sorted(residue_aliases.items()))
    return {
        "scheme": VOCABULARY_SCHEME,
        "function": {"depth": function_tokens.FUNCTION_DEPTH,
                     "size": function_tokens.FUNCTION_VOCAB_SIZE},
        "function_files": dict(function_files) if function_files is not None else None,
        "residue": residue,
        **about,
    }  # fmt: skip


def read_vocabulary(path: str | Path) -> Vocabulary:
    """The function token files (resolved next to the vocabulary file, each checked to
    exist), residue labels and residue aliases of a vocabulary file; ValueError naming the
    file and the reason when it is unreadable, of another scheme or names a missing file."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"vocabulary file {path}: unreadable ({e})") from e
    if not isinstance(doc, dict) or doc.get("scheme") != VOCABULARY_SCHEME:
        got = doc.get("scheme") if isinstance(doc, dict) else None
        raise ValueError(f"vocabulary file {path}: scheme {got!r}, expected {VOCABULARY_SCHEME!r}")
    sec = doc.get("residue")
    if not isinstance(sec, dict) or not isinstance(sec.get("labels"), list):
        raise ValueError(f"vocabulary file {path}: no 'residue.labels' list")
    if sec.get("depth") != RESIDUE_DEPTH:
        raise ValueError(f"vocabulary file {path}: residue depth {sec.get('depth')}, "
                         f"this tokenizer uses {RESIDUE_DEPTH}")  # fmt: skip
    residue = tuple(str(x) for x in sec["labels"])
    aliases = _aliases(sec.get("aliases", {}), residue, Path(path))
    return Vocabulary(_function_files(doc.get("function_files"), Path(path)), residue, aliases)


def _aliases(aliases: object, labels: tuple[str, ...], path: Path) -> tuple[tuple[str, str], ...]:
    """The residue aliases as sorted pairs, each naming one of `labels`."""
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ValueError(f"vocabulary file {path}: 'residue.aliases' must map labels to labels")
    try:
        AnnotationVocab(labels, RESIDUE_DEPTH, aliases.items())  # the aliases name its labels
    except ValueError as e:
        raise ValueError(f"vocabulary file {path}: residue.aliases: {e}") from e
    return tuple(sorted(aliases.items()))


_FUNCTION_FILE_KEYS = tuple(f.name for f in fields(FunctionFiles))


def _function_files(names: object, path: Path) -> FunctionFiles | None:
    if names is None:
        return None
    if not isinstance(names, dict) or set(names) != set(_FUNCTION_FILE_KEYS):
        raise ValueError(f"vocabulary file {path}: 'function_files' must map "
                         f"{', '.join(_FUNCTION_FILE_KEYS)} to file names")  # fmt: skip
    files = FunctionFiles(**{k: path.parent / str(names[k]) for k in _FUNCTION_FILE_KEYS})
    for k in _FUNCTION_FILE_KEYS:
        if not getattr(files, k).is_file():
            raise ValueError(f"vocabulary file {path}: function_files.{k} {getattr(files, k)} "
                             "does not exist")  # fmt: skip
    return files
