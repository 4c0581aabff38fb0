"""Function tokens (ESM3 A.1.8): the same ids as EvolutionaryScale's `esm` tokenizer on the
same files, TF-IDF and LSH against their closed forms, dropout rates, and bad files.

The InterPro files here are small but shaped as InterPro's own (entry.list, interpro2go,
go-basic.obo), with real entry accessions, names and GO terms."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from esm3.data.function_keywords import (
    build_function_tokenizer,
    entry_keywords,
    read_entry_list,
    read_go_names,
    read_interpro2go,
)
from esm3.tokenize.function_tokens import (
    FIRST_LSH,
    FUNCTION_DEPTH,
    FUNCTION_VOCAB_SIZE,
    NONE,
    PAD,
    UNK,
    FunctionFiles,
    FunctionTokenizer,
    keywords_from_text,
)

ENTRY_LIST = """ENTRY_AC\tENTRY_TYPE\tENTRY_NAME
IPR000001\tDomain\tKringle
IPR000003\tFamily\tRetinoid X receptor/HNF4
IPR000008\tDomain\tC2 domain
IPR000719\tDomain\tProtein kinase domain
IPR008271\tActive_site\tSerine/threonine-protein kinase, active site
IPR011009\tHomologous_superfamily\tProtein kinase-like domain superfamily
IPR017441\tBinding_site\tProtein kinase, ATP binding site
"""
INTERPRO2GO = """!date: 2024/01/10 09:13:17
!Mapping of InterPro entries to GO
!
InterPro:IPR000003 Retinoid X receptor/HNF4 > GO:DNA binding ; GO:0003677
InterPro:IPR000003 Retinoid X receptor/HNF4 > GO:nuclear receptor activity ; GO:0004879
InterPro:IPR000003 Retinoid X receptor/HNF4 > GO:zinc ion binding ; GO:0008270
InterPro:IPR000003 Retinoid X receptor/HNF4 > GO:regulation of DNA-templated transcription ; GO:0006355
InterPro:IPR000003 Retinoid X receptor/HNF4 > GO:nucleus ; GO:0005634
InterPro:IPR000719 Protein kinase domain > GO:protein kinase activity ; GO:0004672
InterPro:IPR000719 Protein kinase domain > GO:ATP binding ; GO:0005524
InterPro:IPR000719 Protein kinase domain > GO:protein phosphorylation ; GO:0006468
InterPro:IPR008271 Serine/threonine-protein kinase, active site > GO:protein serine/threonine kinase activity ; GO:0004674
InterPro:IPR008271 Serine/threonine-protein kinase, active site > GO:protein phosphorylation ; GO:0006468
InterPro:IPR017441 Protein kinase, ATP binding site > GO:ATP binding ; GO:0005524
"""
GO_TERMS = {
    "GO:0003677": "DNA binding",
    "GO:0004879": "nuclear receptor activity",
    "GO:0008270": "zinc ion binding",
    "GO:0006355": "regulation of DNA-templated transcription",
    "GO:0005634": "nucleus",
    "GO:0004672": "protein kinase activity",
    "GO:0005524": "ATP binding",
    "GO:0006468": "protein phosphorylation",
    "GO:0004674": "protein serine/threonine kinase activity",
}
GO_HEADER = "format-version: 1.2\ndata-version: releases/2024-01-17\nontology: go\n\n"


def _obo(terms: dict[str, str]) -> str:
    stanzas = [f"[Term]\nid: {t}\nname: {n}\nnamespace: molecular_function\n"
               for t, n in terms.items()]  # fmt: skip
    typedef = "[Typedef]\nid: part_of\nname: part of\n"
    return GO_HEADER + "\n".join(stanzas) + "\n" + typedef


@pytest.fixture
def interpro(tmp_path) -> tuple[Path, Path, Path]:
    (tmp_path / "entry.list").write_text(ENTRY_LIST)
    (tmp_path / "interpro2go").write_text(INTERPRO2GO)
    (tmp_path / "go-basic.obo").write_text(_obo(GO_TERMS))
    return tmp_path / "entry.list", tmp_path / "interpro2go", tmp_path / "go-basic.obo"


@pytest.fixture
def built(interpro, tmp_path) -> tuple[FunctionTokenizer, FunctionFiles]:
    tok = build_function_tokenizer(*interpro, seed=3)
    return tok, tok.write(tmp_path / "function-tokens")


def _esm_tokenizer(files: FunctionFiles, entry_list: Path):
    from esm.tokenization.function_tokenizer import InterProQuantizedTokenizer

    return InterProQuantizedTokenizer(
        lsh_path=files.hyperplanes,
        keyword_vocabulary_path=files.keywords,
        keyword_idf_path=files.idf,
        interpro_entry_path=entry_list,
        interpro2keywords_path=files.interpro2keywords,
    )


def _esm_encode(esm_tok, annotations, length: int, p_keyword_dropout: float = 0.0):
    from esm.utils.types import FunctionAnnotation

    given = [FunctionAnnotation(label, s, e) for label, s, e in annotations]
    tokens = esm_tok.tokenize(given, length, p_keyword_dropout=p_keyword_dropout)
    return esm_tok.encode(tokens, add_special_tokens=False).numpy()


PROTEINS = {  # length, annotations (1-based inclusive)
    "overlapping": (60, [("IPR000719", 5, 50), ("IPR017441", 11, 34), ("IPR011009", 1, 55),
                         ("IPR008271", 30, 31), ("IPR000001", 50, 60)]),
    "gaps": (40, [("IPR000003", 3, 12), ("IPR000008", 20, 25), ("IPR000003", 30, 40)]),
    "same label twice": (20, [("IPR000719", 1, 10), ("IPR000719", 5, 15)]),
    "one residue": (1, [("IPR000001", 1, 1)]),
    "no annotations": (30, []),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PROTEINS))
def test_same_token_ids_as_esm(built, interpro, name):
    tok, files = built
    length, annotations = PROTEINS[name]
    esm_tok = _esm_tokenizer(files, interpro[0])
    ours = tok.encode(annotations, length, record=name)
    assert ours.shape == (length, FUNCTION_DEPTH) and ours.dtype == np.int64
    np.testing.assert_array_equal(ours, _esm_encode(esm_tok, annotations, length))
    np.testing.assert_array_equal(FunctionTokenizer.from_files(files).encode(annotations, length),
                                  ours)  # fmt: skip


def test_keyword_dropout_draws_as_esm(built, interpro):
    """esm draws its keyword mask from numpy's global generator; the same seed in a
    RandomState gives ours the same mask, so the tokens agree draw for draw."""
    tok, files = built
    esm_tok = _esm_tokenizer(files, interpro[0])
    length, annotations = PROTEINS["overlapping"]
    for seed in range(5):
        np.random.seed(seed)
        theirs = _esm_encode(esm_tok, annotations, length, p_keyword_dropout=0.5)
        ours = tok.encode(annotations, length, rng=np.random.RandomState(seed), keyword_dropout=0.5)
        np.testing.assert_array_equal(ours, theirs)


ESM_SHIPPED = ("keyword_vocabulary_safety_filtered_58641.txt",
               "keyword_idf_safety_filtered_58641.npy", "interpro_29026_to_keywords_58641.csv")  # fmt: skip


def test_esm_shipped_tables_give_esm_token_ids(tmp_path):
    """esm's own keyword vocabulary, IDF and InterPro table (58,641 keywords, 29,026
    entries; one row without keywords) read as they are, under esm's file names; the
    hyperplanes (shipped with the model, not the package) drawn here."""
    import esm

    data = Path(esm.__file__).parent / "data"
    for f in ESM_SHIPPED:
        shutil.copy(data / f, tmp_path / f)
    planes = np.random.default_rng(0).standard_normal((8, 8, 58641))
    np.savez(tmp_path / "hyperplanes_8bit_58641.npz", **{str(t): p for t, p in enumerate(planes)})
    files = FunctionFiles.in_folder(tmp_path)
    tok = FunctionTokenizer.from_files(files)
    esm_tok = _esm_tokenizer(files, data / "entry_list_safety_29026.list")
    assert len(tok.keywords) == 58641 and len(tok.entries) == 29026
    rng = np.random.default_rng(1)
    has_keywords = np.diff(tok.vectors.indptr) > 0
    usable = [e for e, ok in zip(tok.entries, has_keywords, strict=True) if ok]
    for _ in range(6):
        length = int(rng.integers(1, 200))
        spans = np.sort(rng.integers(1, length + 1, size=(4, 2)), axis=1)
        annotations = [(usable[int(rng.integers(len(usable)))], int(s), int(e)) for s, e in spans]
        np.testing.assert_array_equal(tok.encode(annotations, length),
                                      _esm_encode(esm_tok, annotations, length))  # fmt: skip


def test_tfidf_and_lsh_closed_forms(built):
    tok, _ = built
    # one keyword ("kringle"): the vector is that unit axis, each bit the sign of one weight
    k = tok.keywords.index("kringle")
    want = FIRST_LSH + ((tok.hyperplanes[:, :, k] >= 0) * (1 << np.arange(8))).sum(axis=1)
    np.testing.assert_array_equal(tok.encode([("IPR000001", 1, 3)], 3), np.tile(want, (3, 1)))
    # sublinear tf-idf of IPR000719: its name and GO names, idf over the 7 entries
    words = keywords_from_text("Protein kinase domain") + [
        w for n in ("protein kinase activity", "ATP binding", "protein phosphorylation")
        for w in keywords_from_text(n)]  # fmt: skip
    tf = Counter(words)
    sets = [set(ws) for ws in entry_keywords(read_entry_list_text(ENTRY_LIST), GO_MAP).values()]
    idf = {w: np.log(8 / (1 + sum(w in s for s in sets))) + 1 for w in tf}
    v = np.array([(1 + np.log(tf[w])) * idf[w] for w in tf])
    v /= np.linalg.norm(v)
    row = tok.vectors[tok.entries.index("IPR000719")].toarray().ravel()
    np.testing.assert_allclose(row[[tok.keywords.index(w) for w in tf]], v, rtol=1e-12)
    assert np.count_nonzero(row) == len(tf) and tf["protein"] == 3 and tf["kinase"] == 2


def read_entry_list_text(text: str) -> dict[str, str]:
    rows = [line.split("\t") for line in text.strip().split("\n")[1:]]
    return {acc: name for acc, _, name in rows}


GO_MAP = {
    "IPR000003": [(g, GO_TERMS[g]) for g in
                  ("GO:0003677", "GO:0004879", "GO:0008270", "GO:0006355", "GO:0005634")],
    "IPR000719": [(g, GO_TERMS[g]) for g in ("GO:0004672", "GO:0005524", "GO:0006468")],
    "IPR008271": [(g, GO_TERMS[g]) for g in ("GO:0004674", "GO:0006468")],
    "IPR017441": [("GO:0005524", GO_TERMS["GO:0005524"])],
}  # fmt: skip


def test_special_tokens(built):
    tok, _ = built
    assert FUNCTION_VOCAB_SIZE == 260 and (PAD, UNK, NONE, FIRST_LSH) == (0, 2, 3, 4)
    out = tok.encode([("IPR000001", 2, 3), ("IPR999999", 5, 6)], 6)  # unknown label: ignored
    assert (out[[0, 3, 4, 5]] == NONE).all() and (out[1:3] >= FIRST_LSH).all()
    assert (out < FUNCTION_VOCAB_SIZE).all()
    assert (tok.encode([("IPR999999", 1, 2)], 4) == PAD).all()  # nothing known: as none given
    rng = np.random.default_rng(0)
    every = tok.encode([("IPR000001", 2, 3)], 4, rng=rng, keyword_dropout=1.0)
    np.testing.assert_array_equal(every[:, 0], [NONE, UNK, UNK, NONE])


def _within_binomial(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 5 * np.sqrt(n * p * (1 - p))


def test_annotation_dropout_rate(built):
    """40 one-residue annotations per protein: a dropped one leaves its residue NONE."""
    tok, _ = built
    rng = np.random.default_rng(0)
    annotations = [("IPR000001", i, i) for i in range(1, 41)]
    dropped = sum(int((tok.encode(annotations, 40, rng=rng, annotation_dropout=0.15)[:, 0]
                       == NONE).sum()) for _ in range(100))  # fmt: skip
    assert _within_binomial(dropped, 4000, 0.15), dropped / 4000
    assert (tok.encode(annotations, 40, rng=rng, annotation_dropout=1.0) == PAD).all()


def test_keyword_dropout_rate(built):
    """IPR000001 has one keyword: dropped (p) -> UNK. IPR011009's k distinct keywords are
    all dropped with probability p**k."""
    tok, _ = built
    rng = np.random.default_rng(1)
    p, n = 0.15, 2000
    unk = sum(int(tok.encode([("IPR000001", 1, 1)], 1, rng=rng, keyword_dropout=p)[0, 0] == UNK)
              for _ in range(n))  # fmt: skip
    assert _within_binomial(unk, n, p), unk / n
    k = tok.vectors[tok.entries.index("IPR000008")].nnz  # "C2 domain": c2, domain, c2 domain
    p2 = 0.7
    unk2 = sum(int(tok.encode([("IPR000008", 1, 1)], 1, rng=rng, keyword_dropout=p2)[0, 0] == UNK)
               for _ in range(n))  # fmt: skip
    assert k == 3 and _within_binomial(unk2, n, p2**k), unk2 / n


def test_dropout_needs_an_rng_and_spans_are_checked(built):
    tok, _ = built
    with pytest.raises(ValueError, match="dropout needs an rng"):
        tok.encode([("IPR000001", 1, 1)], 1, keyword_dropout=0.1)
    with pytest.raises(ValueError, match=r"record 'P1': function annotation IPR000001 span \[3, 9\] outside \[1, 8\]"):  # fmt: skip
        tok.encode([("IPR000001", 3, 9)], 8, record="P1")


def test_keywords_from_text():
    assert keywords_from_text("Retinoid X receptor/HNF4") == [
        "retinoid", "receptorhnf4", "retinoid x", "x receptorhnf4"]  # fmt: skip
    assert keywords_from_text("Protein kinase, ATP binding site") == [
        "protein", "kinase", "protein kinase", "atp", "binding", "site", "atp binding",
        "binding site"]  # fmt: skip
    # hyphen -> space; "like domain" is one of the excluded terms
    assert keywords_from_text("Protein kinase-like domain superfamily") == [
        "protein", "kinase", "like", "domain", "superfamily", "protein kinase", "kinase like",
        "domain superfamily"]  # fmt: skip
    assert keywords_from_text("C-terminal, N") == ["terminal", "c terminal"]  # no "c", "n"


def test_keywords_agree_with_esm():
    from esm.tokenization.function_tokenizer import _keywords_from_text

    texts = [*read_entry_list_text(ENTRY_LIST).values(), *GO_TERMS.values(),
             "Molecular function, biological_process", "Zn(2)-C6 fungal-type DNA-binding domain"]  # fmt: skip
    for text in texts:
        assert keywords_from_text(text) == _keywords_from_text(text), text


def test_readers(interpro, tmp_path):
    entry_list, i2g, obo = interpro
    assert read_entry_list(entry_list)["IPR017441"] == "Protein kinase, ATP binding site"
    assert read_interpro2go(i2g) == GO_MAP
    assert read_go_names(obo) == GO_TERMS
    # without the GO file the names written in interpro2go serve
    tok = build_function_tokenizer(entry_list, i2g)
    assert "phosphorylation" in tok.keywords and "superfamily" in tok.keywords
    # min_entries: "kinase" is in 5 entries, "kringle" in one
    few = build_function_tokenizer(*interpro, min_entries=2)
    assert "kinase" in few.keywords and "kringle" not in few.keywords
    assert "IPR000001" not in few.entries  # nothing left to hash: its label is ignored


def test_esm_file_names_accepted(built, tmp_path):
    tok, files = built
    esm_dir = tmp_path / "esm"
    esm_dir.mkdir()
    for src, name in zip((files.keywords, files.idf, files.interpro2keywords, files.hyperplanes),
                         ("keyword_vocabulary_safety_filtered_58641.txt",
                          "keyword_idf_safety_filtered_58641.npy",
                          "interpro_29026_to_keywords_58641.csv",
                          "hyperplanes_8bit_58641.npz"), strict=True):  # fmt: skip
        shutil.copy(src, esm_dir / name)
    found = FunctionFiles.in_folder(esm_dir)
    assert found.hyperplanes.name == "hyperplanes_8bit_58641.npz"
    length, annotations = PROTEINS["overlapping"]
    np.testing.assert_array_equal(FunctionTokenizer.from_files(found).encode(annotations, length),
                                  tok.encode(annotations, length))  # fmt: skip
    (esm_dir / "keyword_idf_safety_filtered_58641.npy").unlink()
    with pytest.raises(ValueError, match=r"function token folder .*needs one idf.npy or keyword_idf\*.npy, found none"):  # fmt: skip
        FunctionFiles.in_folder(esm_dir)


def _rewrite(files: FunctionFiles, **changes) -> FunctionFiles:
    return FunctionFiles(**{**files.__dict__, **changes})


def test_bad_function_files_give_one_clear_error(built, tmp_path):
    tok, files = built
    short = tmp_path / "short.npy"
    np.save(short, np.ones(len(tok.keywords) - 1))
    with pytest.raises(ValueError, match=rf"short.npy: array: shape \({len(tok.keywords) - 1},\), expected \({len(tok.keywords)},\): one IDF per keyword of .*keywords.txt"):  # fmt: skip
        FunctionTokenizer.from_files(_rewrite(files, idf=short))
    planes = tmp_path / "planes.npz"
    np.savez(planes, **{str(t): np.ones((8, 5)) for t in range(8)})
    with pytest.raises(ValueError, match=rf"planes.npz: table 0: shape \(8, 5\), expected \(8, {len(tok.keywords)}\)"):  # fmt: skip
        FunctionTokenizer.from_files(_rewrite(files, hyperplanes=planes))
    np.savez(planes, **{str(t): np.ones((8, len(tok.keywords))) for t in range(7)})
    with pytest.raises(ValueError, match=r"planes.npz: table 7: no array '7'"):
        FunctionTokenizer.from_files(_rewrite(files, hyperplanes=planes))
    dup = tmp_path / "dup.txt"
    dup.write_text("kinase\nkringle\nkinase\n")
    with pytest.raises(ValueError, match=r"dup.txt: line 3: keyword 'kinase' repeats line 1"):
        FunctionTokenizer.from_files(_rewrite(files, keywords=dup))
    table = tmp_path / "table.csv"
    table.write_text("interpro,words\nIPR000001,kringle\n")
    with pytest.raises(ValueError, match=r"table.csv: header: columns \['interpro', 'words'\], needs interpro_id,keywords"):  # fmt: skip
        FunctionTokenizer.from_files(_rewrite(files, interpro2keywords=table))
    table.write_text("interpro_id,keywords\nIPR000001,kringle\nIPR000001,kinase\n")
    with pytest.raises(ValueError, match=r"table.csv: row 2 \(IPR000001\): InterPro id repeats"):
        FunctionTokenizer.from_files(_rewrite(files, interpro2keywords=table))


def test_bad_interpro_files_give_one_clear_error(tmp_path):
    bad = tmp_path / "entry.list"
    bad.write_text("ACCESSION\tTYPE\tNAME\nIPR000001\tDomain\tKringle\n")
    with pytest.raises(ValueError, match=r"entry.list: line 1 \(header\): .* lack ENTRY_AC, ENTRY_TYPE, ENTRY_NAME"):  # fmt: skip
        read_entry_list(bad)
    bad.write_text(ENTRY_LIST + "IPR000002\tDomain\n")
    with pytest.raises(ValueError, match=r"entry.list: line 9: 2 fields, header has 3"):
        read_entry_list(bad)
    bad.write_text(ENTRY_LIST + "PF00069\tDomain\tPkinase\n")
    with pytest.raises(ValueError, match=r"line 9: 'PF00069' is not an InterPro accession"):
        read_entry_list(bad)
    i2g = tmp_path / "interpro2go"
    i2g.write_text(INTERPRO2GO + "InterPro:IPR000001 Kringle > GO:0005515\n")
    with pytest.raises(ValueError, match=r"interpro2go: line 15: not 'InterPro:IPR"):
        read_interpro2go(i2g)
    obo = tmp_path / "go-basic.obo"
    obo.write_text(GO_HEADER + "[Term]\nname: DNA binding\n")
    with pytest.raises(ValueError, match=r"go-basic.obo: line 6: name before the term's id"):
        read_go_names(obo)
    obo.write_text(_obo({"GO:0003677": "DNA binding"}))
    i2g.write_text(INTERPRO2GO)
    bad.write_text(ENTRY_LIST)
    with pytest.raises(ValueError, match=r"go-basic.obo: IPR000003: GO:0004879 is not a term"):
        build_function_tokenizer(bad, i2g, obo)
