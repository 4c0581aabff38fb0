"""Function tokens as in ESM3 (appendix A.1.8), with the token ids of EvolutionaryScale's
`esm` package, so a model trained here reads the same tokens as the released one.

Each InterPro annotation becomes keywords (unigrams and bigrams of its entry name and of
the names of its GO terms), the keywords a TF-IDF vector (sublinear tf, (1 + ln tf) * idf,
L2-normalised), and the vectors of the annotations covering a residue are combined by an
element-wise max. 8 LSH tables of 8 hyperplanes each hash that vector: bit i of table t is
`hyperplane[t, i] . v >= 0` and its token is FIRST_LSH + sum(bit_i << i).

Per residue 8 tokens of 260 ids: PAD (0) everywhere for a protein without annotations, NONE
(3) in all slots for a residue no annotation covers, UNK (2) where the covering labels give
an all-zero vector (no keyword of the vocabulary, or all of them dropped).

The tables live in four files in esm's formats (`FunctionFiles`); `esm3.data.function_keywords`
builds them from InterPro's own files, or the user's copy of esm's files is read as it is.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas and scipy load on use: the model's constants need neither
    import scipy.sparse as sp
from esm3.tokenize.specials import NONE, PAD, UNK

FUNCTION_DEPTH = 8  # tokens per residue = LSH tables
LSH_BITS = 8  # hyperplanes per table
FIRST_LSH = NONE + 1
FUNCTION_VOCAB_SIZE = FIRST_LSH + (1 << LSH_BITS)  # 260

Annotation = tuple[str, int, int]  # (InterPro accession, start, end), 1-based inclusive

# Pervasive, unspecific terms esm leaves out of the keywords (its list, so ours agree).
EXCLUDED_KEYWORDS = frozenset({
    "binding domain", "biological_process", "biological process", "biologicalprocess", "c",
    "cellular_component", "cellular component", "cellularcomponent", "cellular_process",
    "cellularprocess", "cellular process", "like domain", "molecular function",
    "molecular_function", "molecularfunction", "n",
})  # fmt: skip
_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def keywords_from_text(text: str) -> list[str]:
    """Unigrams and bigrams of an InterPro or GO name, normalised as esm does: the text is
    cut at ", " (no bigram spans the cut), hyphens become spaces, punctuation is removed and
    letters lowered; one-character terms and EXCLUDED_KEYWORDS are left out."""
    terms: list[str] = []
    for part in text.split(", "):
        words = part.replace("-", " ").translate(_DROP_PUNCTUATION).lower().split()
        terms += words
        terms += [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    return [t for t in terms if len(t) > 1 and t not in EXCLUDED_KEYWORDS]


# --- files ----------------------------------------------------------------------------------

OUR_NAMES = ("keywords.txt", "idf.npy", "interpro2keywords.csv", "hyperplanes.npz")
# esm's names (data/ of the package; the hyperplanes come with the model download)
ESM_PATTERNS = ("keyword_vocabulary*.txt", "keyword_idf*.npy", "interpro_*_to_keywords*.csv",
                "hyperplanes_8bit*.npz")  # fmt: skip


@dataclass(frozen=True)
class FunctionFiles:
    """The four tables of the function tokenizer, in esm's formats: keyword vocabulary (one
    keyword a line), IDF (float64 1-D .npy, one per keyword), InterPro-to-keywords (.csv with
    columns interpro_id,keywords; keywords comma-joined, repeats counting as term frequency)
    and hyperplanes (.npz, arrays "0".."7" each (8, n_keywords))."""

    keywords: Path
    idf: Path
    interpro2keywords: Path
    hyperplanes: Path

    @classmethod
    def in_folder(cls, folder: str | Path) -> FunctionFiles:
        """The files of a folder under our names or esm's; ValueError naming the folder and
        the missing (or ambiguous) file otherwise."""
        folder = Path(folder)
        found = []
        for ours, pattern in zip(OUR_NAMES, ESM_PATTERNS, strict=True):
            hits = [folder / ours] if (folder / ours).is_file() else sorted(folder.glob(pattern))
            if len(hits) != 1:
                names = ", ".join(h.name for h in hits)
                why = f"{len(hits)} files ({names})" if hits else "none"
                raise ValueError(f"function token folder {folder}: needs one {ours} or "
                                 f"{pattern}, found {why}")  # fmt: skip
            found.append(hits[0])
        return cls(*found)

    def relative_to(self, folder: str | Path) -> dict[str, str]:
        """File names relative to `folder` (for a document that travels with them)."""
        return {f.name: str(Path(getattr(self, f.name)).relative_to(folder)) for f in fields(self)}


def _bad(path: Path, record: str, reason: str) -> ValueError:
    return ValueError(f"function token file {path}: {record}: {reason}")


def read_keywords(path: Path) -> list[str]:
    words = Path(path).read_text(encoding="utf-8").strip().split("\n")
    if words == [""]:
        raise _bad(path, "whole file", "no keywords")
    index: dict[str, int] = {}
    for i, w in enumerate(words):
        if w in index:
            raise _bad(path, f"line {i + 1}", f"keyword {w!r} repeats line {index[w] + 1}")
        index[w] = i
    return words


def read_idf(path: Path, n_keywords: int, keywords_path: Path | str = "") -> np.ndarray:
    try:
        idf = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise _bad(path, "whole file", f"not a .npy array ({e})") from e
    if idf.ndim != 1 or len(idf) != n_keywords:
        raise _bad(path, "array", f"shape {idf.shape}, expected ({n_keywords},): one IDF per "
                   f"keyword of {keywords_path or 'the vocabulary'}")  # fmt: skip
    bad = np.flatnonzero(~(np.isfinite(idf) & (idf > 0)))
    if bad.size:
        raise _bad(path, f"keyword {bad[0]}", f"IDF {idf[bad[0]]} is not a positive number")
    return idf.astype(np.float64)


def read_interpro2keywords(path: Path) -> tuple[list[str], list[str]]:
    """(InterPro ids, their comma-joined keywords) in file order. esm's own file has rows
    without keywords (esm fails on them); here such an entry hashes to UNK."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise _bad(path, "whole file", f"unreadable as CSV ({e})") from e
    if not {"interpro_id", "keywords"} <= set(df.columns):
        raise _bad(path, "header", f"columns {list(df.columns)}, needs interpro_id,keywords")
    ids, text = df["interpro_id"].tolist(), df["keywords"].tolist()
    dup = df["interpro_id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise _bad(path, f"row {i + 1} ({ids[i]})", "InterPro id repeats an earlier row")
    return ids, text


def read_hyperplanes(path: Path, n_keywords: int) -> np.ndarray:
    """(FUNCTION_DEPTH, LSH_BITS, n_keywords) float64."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise _bad(path, "whole file", f"not a .npz archive ({e})") from e
    want = (LSH_BITS, n_keywords)
    for t in range(FUNCTION_DEPTH):
        a = arrays.get(str(t))
        if a is None:
            raise _bad(path, f"table {t}", f"no array {str(t)!r} (has {sorted(arrays)})")
        if a.shape != want:
            raise _bad(path, f"table {t}", f"shape {a.shape}, expected {want} "
                       "(hyperplanes x keywords of the vocabulary)")  # fmt: skip
        if not np.isfinite(a).all() or not (np.abs(a).sum(axis=1) > 0).all():
            raise _bad(path, f"table {t}", "non-finite values or an all-zero hyperplane")
    return np.stack([arrays[str(t)] for t in range(FUNCTION_DEPTH)]).astype(np.float64)


# --- the tokenizer --------------------------------------------------------------------------


def _tfidf_rows(rows: np.ndarray, cols: np.ndarray, idf: np.ndarray, shape) -> sp.csr_matrix:
    """Sublinear TF-IDF rows, L2-normalised, from (row, keyword) occurrences."""
    import scipy.sparse as sp

    m = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=shape).tocsr()
    m.sum_duplicates()  # data = term frequencies
    m.data = (1.0 + np.log(m.data)) * idf[m.indices]
    row_of = np.repeat(np.arange(shape[0]), np.diff(m.indptr))
    m.data /= np.sqrt(np.bincount(row_of, weights=m.data**2, minlength=shape[0]))[row_of]
    return m


class FunctionTokenizer:
    """Annotations -> function tokens (length, 8) with esm's ids; see the module doc."""

    def __init__(
        self,
        keywords: Sequence[str],
        idf: np.ndarray,
        interpro_keywords: Mapping[str, Sequence[str]] | tuple[list[str], list[str]],
        hyperplanes: np.ndarray,
    ) -> None:
        """`interpro_keywords`: InterPro id -> keywords (repeats count as term frequency),
        or (ids, comma-joined keywords) as read from the .csv. Keywords outside the
        vocabulary are skipped (as esm does); an entry left without any hashes to UNK."""
        self.keywords = list(keywords)
        self.idf = np.asarray(idf, dtype=np.float64)
        if self.idf.shape != (len(self.keywords),):
            raise ValueError(f"IDF shape {self.idf.shape} differs from the "
                             f"{len(self.keywords)} keywords")  # fmt: skip
        if any("," in w for w in self.keywords):  # the .csv joins keywords with commas
            raise ValueError(f"keyword {next(w for w in self.keywords if ',' in w)!r} has a comma")
        want = (FUNCTION_DEPTH, LSH_BITS, len(self.keywords))
        if np.shape(hyperplanes) != want:
            raise ValueError(f"hyperplanes shape {np.shape(hyperplanes)}, expected {want}")
        self.hyperplanes = np.asarray(hyperplanes, dtype=np.float64)
        if isinstance(interpro_keywords, tuple):
            self.entries, self._keyword_text = list(interpro_keywords[0]), interpro_keywords[1]
        else:
            self.entries = list(interpro_keywords)
            self._keyword_text = [",".join(interpro_keywords[e]) for e in self.entries]
        self._row = {e: i for i, e in enumerate(self.entries)}
        self.vectors = self._entry_vectors()
        self._planes = self.hyperplanes.reshape(FUNCTION_DEPTH * LSH_BITS, -1)
        self._bit_values = 1 << np.arange(LSH_BITS)

    def _entry_vectors(self) -> sp.csr_matrix:
        """One TF-IDF row per entry; one pass over all keywords (esm's table: ~29,000 entries,
        ~0.5 M keyword occurrences, loaded in about half a second)."""
        texts = self._keyword_text
        n_words = np.array([t.count(",") + 1 if t else 0 for t in texts], dtype=np.int64)
        index = {w: i for i, w in enumerate(self.keywords)}
        words = ",".join(t for t in texts if t).split(",") if n_words.any() else []
        cols = np.fromiter((index.get(w, -1) for w in words), dtype=np.int64, count=len(words))
        rows = np.repeat(np.arange(len(texts)), n_words)
        keep = cols >= 0
        shape = (len(self.entries), len(self.keywords))
        return _tfidf_rows(rows[keep], cols[keep], self.idf, shape)

    @classmethod
    def from_files(cls, files: FunctionFiles) -> FunctionTokenizer:
        keywords = read_keywords(files.keywords)
        idf = read_idf(files.idf, len(keywords), files.keywords)
        table = read_interpro2keywords(files.interpro2keywords)
        return cls(keywords, idf, table, read_hyperplanes(files.hyperplanes, len(keywords)))

    def write(self, folder: str | Path) -> FunctionFiles:
        """The four files in esm's formats, under our names, in `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = FunctionFiles(*(folder / n for n in OUR_NAMES))
        files.keywords.write_text("\n".join(self.keywords) + "\n", encoding="utf-8")
        np.save(files.idf, self.idf)
        import pandas as pd

        table = pd.DataFrame({"interpro_id": self.entries, "keywords": self._keyword_text})
        table.to_csv(files.interpro2keywords, index=False)
        np.savez(files.hyperplanes, **{str(t): h for t, h in enumerate(self.hyperplanes)})
        return files

    def encode(
        self,
        annotations: Iterable[Annotation],
        length: int,
        *,
        rng: np.random.Generator | np.random.RandomState | None = None,
        keyword_dropout: float = 0.0,
        annotation_dropout: float = 0.0,
        record: str = "",
    ) -> np.ndarray:
        """Function tokens (length, FUNCTION_DEPTH) int64 of one protein.

        Spans are 1-based inclusive within [1, length] (ValueError naming the record
        otherwise); labels not in the table are ignored, so a protein whose labels are all
        unknown is PAD like one without annotations. Dropout (training): each annotation is
        dropped with probability `annotation_dropout` (a protein left with none is PAD),
        then each keyword of the vocabulary with `keyword_dropout` for the whole protein,
        drawn as esm's `p_keyword_dropout` (`rng.random(n_keywords) < p`).
        """
        rows, starts, ends = self._known(annotations, length, record)
        if annotation_dropout > 0 and rows.size:
            keep = _need(rng).random(rows.size) >= annotation_dropout
            rows, starts, ends = rows[keep], starts[keep], ends[keep]
        if not rows.size:
            return np.full((length, FUNCTION_DEPTH), PAD, dtype=np.int64)
        dropped = None
        if keyword_dropout > 0:
            dropped = _need(rng).random(len(self.keywords)) < keyword_dropout
        uniq, row_of = np.unique(rows, return_inverse=True)
        cover = _coverage(row_of, starts, ends, uniq.size, length)  # (K, L)
        groups, group_of = np.unique(np.packbits(cover, axis=0).T, axis=0, return_inverse=True)
        out = np.full((length, FUNCTION_DEPTH), NONE, dtype=np.int64)
        for g in range(len(groups)):
            at = np.flatnonzero(group_of.ravel() == g)
            labels = uniq[cover[:, at[0]]]
            if labels.size:
                out[at] = self._hash(labels, dropped)
        return out

    def _known(self, annotations: Iterable[Annotation], length: int, record: str):
        """(table rows, 0-based starts, exclusive ends) of the annotations with known labels."""
        rows, starts, ends = [], [], []
        for label, start, end in annotations:
            if not (1 <= start <= end <= length):
                where = f"record {record!r}: " if record else ""
                raise ValueError(f"{where}function annotation {label} span [{start}, {end}] "
                                 f"outside [1, {length}]")  # fmt: skip
            r = self._row.get(label)
            if r is not None:
                rows.append(r)
                starts.append(start - 1)
                ends.append(end)
        as_int = (np.asarray(x, dtype=np.int64) for x in (rows, starts, ends))
        return tuple(as_int)

    def _hash(self, labels: np.ndarray, dropped: np.ndarray | None) -> np.ndarray:
        """The 8 tokens of one set of labels (table rows)."""
        v = self.vectors[labels].max(axis=0).tocsr()  # element-wise max over annotations
        cols, vals = v.indices, v.data
        if dropped is not None:
            vals = vals * ~dropped[cols]
        if not (vals > 0).any():
            return np.full(FUNCTION_DEPTH, UNK, dtype=np.int64)
        bits = (self._planes[:, cols] @ vals >= 0).reshape(FUNCTION_DEPTH, LSH_BITS)
        return FIRST_LSH + bits @ self._bit_values


def _need(rng):
    if rng is None:
        raise ValueError("function token dropout needs an rng (numpy Generator)")
    return rng


def _coverage(row_of: np.ndarray, starts, ends, n_labels: int, length: int) -> np.ndarray:
    """(n_labels, length) bool: which labels cover each residue."""
    delta = np.zeros((n_labels, length + 1), dtype=np.int32)
    np.add.at(delta, (row_of, starts), 1)
    np.add.at(delta, (row_of, ends), -1)
    return np.cumsum(delta[:, :length], axis=1) > 0
