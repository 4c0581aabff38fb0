"""Track vocabularies: values, specials, and errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest

from esm3.tokenize import sasa, sequence, specials, ss8
from esm3.tokenize.annotations import FIRST_LABEL, NONE, AnnotationVocab, multi_hot
from esm3.tokenize.coordinates import validate_coordinates
from esm3.tokenize.structure_tokens import encode_structure_tokens, structure_vocab_size
from esm3.tokenize.tracks import TrackSizes


def test_specials_of_each_track():
    for vocab in (ss8.VOCAB, sasa.VOCAB, AnnotationVocab(["IPR1"], 8).tokens):
        assert vocab[: specials.N_SHARED_SPECIAL] == ("<pad>", "<motif>", "<unk>")
    sp = TrackSizes().specials("sequence")
    assert (sp.bos, sp.pad, sp.eos, sp.chainbreak, sp.mask) == (0, 1, 2, 31, 32)
    sp = TrackSizes().specials("structure")
    assert (sp.mask, sp.eos, sp.bos, sp.pad, sp.chainbreak) == (4096, 4097, 4098, 4099, 4100)
    for track in ("ss8", "sasa", "function", "residue"):
        sp = TrackSizes().specials(track)
        assert {sp.pad, sp.mask, sp.bos, sp.eos, sp.chainbreak} == {0}, track


def test_sequence_vocabulary_and_round_trip():
    assert sequence.VOCAB_SIZE == 64 and len(sequence.VOCAB) == 33
    assert set("ACDEFGHIKLMNPQRSTVWYXBUZO") == set(sequence.LETTERS)
    s = "MKTAYIAKQR|XBUZO"
    tok = sequence.encode_sequence(s)
    assert tok[10] == specials.SEQUENCE_CHAINBREAK
    assert tok.min() >= 4 and sequence.decode_sequence(tok) == s


def test_sequence_unknown_letter_error_names_record_and_position():
    with pytest.raises(
        ValueError, match=r"record 'P1': unknown amino-acid letter 'J' at position 3"
    ):
        sequence.encode_sequence("MKJA", record="P1")
    with pytest.raises(ValueError, match="unknown amino-acid letter 'k'"):
        sequence.encode_sequence("Mk")  # lower case is not accepted silently
    tok = sequence.encode_sequence("MKJ*", unknown="X")
    assert sequence.decode_sequence(tok) == "MKXX"


def test_ss8_dssp4_letters_map_to_coil():
    tok = ss8.encode_ss8("GHITEBSC P-")
    c = specials.N_SHARED_SPECIAL + ss8.SS8_CLASSES.index("C")
    assert tok[:8].tolist() == list(range(3, 11))
    assert tok[8] == c and tok[9] == c  # ' ' and 'P' (PPII) are coil
    assert tok[10] == specials.PAD  # '-' unknown
    with pytest.raises(ValueError, match="unknown SS8 letter 'X' at position 2"):
        ss8.encode_ss8("HX")


def test_sasa_bins_at_documented_edges():
    assert sasa.N_BINS == 16
    v = np.array([0.0, 0.79, 0.8, 4.0, 151.39, 151.4, 1e4, np.nan])
    tok = sasa.encode_sasa(v)
    bins = (tok - sasa.FIRST_BIN).tolist()
    assert bins[:7] == [0, 0, 0, 1, 14, 14, 15]  # an edge belongs to the bin below it
    assert tok[7] == sasa.SASA_NAN
    with pytest.raises(ValueError, match=">= 0"):
        sasa.encode_sasa(np.array([-1.0]))
    with pytest.raises(ValueError, match="inf"):
        sasa.encode_sasa(np.array([np.inf]))


def test_structure_tokens_offset_and_missing():
    assert structure_vocab_size(4096) == 4101
    tok = encode_structure_tokens(np.array([-1, 0, 4095]))
    assert tok.tolist() == [4096, 0, 4095]
    assert encode_structure_tokens(np.array([-1, 7]), codebook_size=8).tolist() == [8, 7]
    with pytest.raises(ValueError, match=r"record 'x': structure token out of range \[-1, 4096\)"):
        encode_structure_tokens(np.array([4096]), record="x")
    assert TrackSizes.build(codebook_size=64).structure == 69


def test_annotation_slots_sorted_by_vocabulary_and_truncated():
    vocab = AnnotationVocab(["IPR3", "IPR1", "IPR2"], depth=2)
    ann = [("IPR2", 1, 4), ("IPR3", 3, 5), ("IPR1", 2, 3), ("IPR9", 1, 5)]
    slots = vocab.encode(ann, 6)
    assert slots.shape == (6, 2)
    # residue 3 is covered by IPR2, IPR3, IPR1 -> the first two in vocabulary order
    assert vocab.decode(slots)[2] == {"IPR3", "IPR1"}
    assert slots[2].tolist() == [FIRST_LABEL + 0, FIRST_LABEL + 1]
    assert vocab.decode(slots)[0] == {"IPR2"} and slots[0, 1] == specials.PAD
    assert slots[5].tolist() == [NONE, specials.PAD]  # unknown IPR9 skipped: no label
    hot = multi_hot(slots, vocab.size)
    assert hot.shape == (6, 3) and hot[2].tolist() == [True, True, False]
    with pytest.raises(
        ValueError, match=r"record 'r': annotation IPR1 span \[0, 2\] outside \[1, 6\]"
    ):
        vocab.encode([("IPR1", 0, 2)], 6, record="r")
    with pytest.raises(ValueError, match="duplicate"):
        AnnotationVocab(["a", "a"], 8)


def test_coordinates_nan_residue_missing_and_errors():
    x = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    x[1, 2, 0] = np.nan  # one atom missing
    c, present = validate_coordinates(x, 3)
    assert present.tolist() == [True, False, True]
    assert np.isnan(c[1]).all() and np.isfinite(c[0]).all()
    with pytest.raises(
        ValueError, match=r"record 'q': coordinates have shape \(3, 3, 3\), expected \(4, 3, 3\)"
    ):
        validate_coordinates(x, 4, record="q")
    x[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="inf"):
        validate_coordinates(x, 3)
