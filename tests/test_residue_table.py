"""esm's residue table (`[interpro] residue_table`): the vocabulary stage writes its labels
in esm's order and each site label's alias, and training's encoding of a record's sites
through that vocabulary file gives the ids of esm's own ResidueAnnotationsTokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pytest

from esm3.data.interpro import ingest_sites
from esm3.tasks.config import TaskConfig
from esm3.tokenize.annotations import FIRST_LABEL, RESIDUE_DEPTH, AnnotationVocab, read_vocabulary
from esm3.tokenize.residue_table import read_residue_table
from esm3.tokenize.specials import PAD, UNK
from jobs.config import ConfigError
from jobs.stages.config import InterproConfig, residue_table
from jobs.stages.structures import vocabulary_task
from jobs.train.vocabulary import with_vocabulary

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# esm's format: several descriptions share a clean label; summed counts reorder the clean
# labels (Zn: 40 + 35 = 75 beats Phosphorylation's 70; ATP and Cell attachment tie at 30
# and stay in text order)
TABLE = [("Zinc binding site", "Zn", 40), ("Zn2+ binding site", "Zn", 35),
         ("Phosphorylation site", "Phosphorylation", 70), ("Cell attachment site", "RGD", 30),
         ("ATP binding site", "ATP", 20), ("P-loop", "ATP", 10), ("Rare site", "Rare", 1)]  # fmt: skip
SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEK"
# (site label as records carry it, description as InterProScan reports it, start, end)
SITES = [("cd00009:ATP binding site", "ATP binding site", 3, 8),
         ("PS00017:P-loop", "P-loop", 6, 10),
         ("PS00004:Phosphorylation site", "Phosphorylation site", 8, 8),
         ("cd00100:Zinc binding site", "Zinc binding site", 8, 12),
         ("cd00101:Zn2+ binding site", "Zn2+ binding site", 20, 20),
         ("PS00016:Cell attachment site", "Cell attachment site", 20, 22),
         ("cd00200:Metal binding site", "Metal binding site", 21, 25)]  # fmt: skip


def _write_table(path, rows=TABLE, header="label,label_clean,count"):
    path.write_text(header + "\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return path


def _vocabulary(tmp_path, table: str = ""):
    """The vocabulary stage on SITES (one protein) with `table`: (summary, file)."""
    tsv = tmp_path / "sites.tsv"
    tsv.write_text("".join(f"P1\t{lab}\t{d}\t{s}\t{e}\n" for lab, d, s, e in SITES))
    ingest_sites(tsv, tmp_path / "sites.parquet")
    out = tmp_path / "vocabulary.json"
    summary = vocabulary_task(str(tmp_path), "t", [], str(tmp_path / "terms.parquet"),
                              [str(tmp_path / "sites.parquet")], str(out), 1, "test", {}, 1,
                              0, table)  # fmt: skip
    return summary, out


def _esm_ids(csv_path, sites):
    from esm.tokenization.residue_tokenizer import ResidueAnnotationsTokenizer

    tok = ResidueAnnotationsTokenizer(str(csv_path))
    sample = {"interpro_site_descriptions": [d for _, d, _, _ in sites],
              "interpro_site_starts": [s for _, _, s, _ in sites],
              "interpro_site_ends": [e for _, _, _, e in sites],
              "interpro_site_residues": [SEQUENCE[s - 1 : e] for _, _, s, e in sites]}  # fmt: skip
    return tok, tok.encode(tok.tokenize(sample, SEQUENCE), add_special_tokens=False).numpy()


def test_site_ids_through_the_vocabulary_file_equal_esm_tokenizer(tmp_path):
    csv = _write_table(tmp_path / "residue.csv")
    summary, path = _vocabulary(tmp_path, str(csv))
    tok, theirs = _esm_ids(csv, SITES)
    vocab = read_vocabulary(path)
    assert vocab.residue_labels == ("Zn", "Phosphorylation", "ATP", "RGD", "Rare")
    assert list(vocab.residue_labels) == tok.vocabulary[FIRST_LABEL:]  # esm's order
    assert dict(vocab.residue_aliases)["PS00017:P-loop"] == "ATP"
    assert summary["site_rows"] == 7 and summary["site_rows_unknown"] == 1  # Metal binding

    ours = AnnotationVocab(vocab.residue_labels, RESIDUE_DEPTH, vocab.residue_aliases).encode(
        [(lab, s, e) for lab, _, s, e in SITES], len(SEQUENCE)
    )
    assert ours.shape == theirs.shape == (len(SEQUENCE), RESIDUE_DEPTH)
    for r in range(len(SEQUENCE)):  # sets: the model's EmbeddingBag sums a residue's ids
        assert set(ours[r].tolist()) == set(theirs[r].tolist()), r
        n = len(set(theirs[r].tolist()) - {PAD})
        assert (ours[r, n:] == PAD).all() and (ours[r, :n] != PAD).all(), r
    assert ours[0, 0] == theirs[0, 0] == 3  # <none>
    assert UNK in ours[22] and UNK in theirs[22]  # the description outside the table
    assert set(ours[7].tolist()) == {4 + 0, 4 + 1, 4 + 2, PAD}  # Zn, Phosphorylation, ATP


def test_training_config_takes_the_aliases(tmp_path):
    _, path = _vocabulary(tmp_path, str(_write_table(tmp_path / "residue.csv")))

    @dataclass
    class Data:
        vocabulary: str

    @dataclass
    class Cfg:
        data: Data
        tasks: TaskConfig

    cfg = with_vocabulary(Cfg(Data(str(path)), TaskConfig()), tmp_path)
    assert cfg.tasks.residue_aliases == read_vocabulary(path).residue_aliases
    slots = cfg.tasks.residue_vocab.encode([("PS00016:Cell attachment site", 1, 1),
                                            ("nowhere:site", 2, 2)], 3)  # fmt: skip
    assert slots[:, 0].tolist() == [FIRST_LABEL + 3, UNK, 3]
    other = replace(cfg.tasks, residue_aliases=(("PS00016:Cell attachment site", "Zn"),))
    with pytest.raises(ConfigError, match=r"tasks.residue_aliases': 1 aliases given that differ"):
        with_vocabulary(Cfg(Data(str(path)), other), tmp_path)


def test_without_a_table_labels_are_counted_and_unknown_ones_dropped(tmp_path):
    summary, path = _vocabulary(tmp_path)
    doc = json.loads(path.read_text())
    assert "aliases" not in doc["residue"] and "site_rows_unknown" not in summary
    vocab = read_vocabulary(path)
    assert vocab.residue_labels == tuple(sorted(lab for lab, _, _, _ in SITES))
    assert vocab.residue_aliases == ()
    slots = AnnotationVocab(vocab.residue_labels, RESIDUE_DEPTH).encode([("nowhere", 1, 1)], 2)
    assert slots[:, 0].tolist() == [3, 3]  # dropped, not <unk>


def test_a_table_without_its_columns_is_one_clear_error(tmp_path):
    bad = _write_table(tmp_path / "bad.csv", header="label,clean,count")
    with pytest.raises(ValueError, match=r"residue table .*bad\.csv: no column label_clean"):
        read_residue_table(bad)
    with pytest.raises(ConfigError, match=r"interpro.residue_table: residue table .*bad\.csv"):
        residue_table(InterproConfig(residue_table=str(bad)), tmp_path)
    count = _write_table(tmp_path / "count.csv", rows=[("a", "b", "x")])
    with pytest.raises(ValueError, match=r"count\.csv: line 2: count 'x' is not an integer"):
        read_residue_table(count)
    clash = _write_table(tmp_path / "clash.csv", rows=[("a", "b", 1), ("a", "c", 1)])
    with pytest.raises(ValueError, match=r"clash\.csv: line 3: label 'a' is 'b' and 'c'"):
        read_residue_table(clash)
    good = _write_table(tmp_path / "good.csv")
    assert residue_table(InterproConfig(residue_table=str(good)), tmp_path) == str(good.resolve())


def test_a_table_that_matches_no_site_is_refused(tmp_path):
    other = _write_table(tmp_path / "other.csv", rows=[("Heme binding site", "Heme", 5)])
    with pytest.raises(ValueError, match=r"other\.csv: none of the 7 site rows .* has a desc"):
        _vocabulary(tmp_path, str(other))
