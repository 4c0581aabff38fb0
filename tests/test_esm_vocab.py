"""The suite's tokenizers give `esm`'s own token ids (esm 3.2.1.post1's tokenizers, on a
real chain's sequence, its SS8 from mkdssp and SASA from biotite)."""

from __future__ import annotations

import numpy as np
import pytest

from esm3.tokenize import sasa as sasa_vocab
from esm3.tokenize import sequence as seq_vocab
from esm3.tokenize import ss8 as ss8_vocab
from esm3.tokenize.annotations import AnnotationVocab
from esm3.tokenize.structure_tokens import encode_structure_tokens
from esm3.tokenize.tracks import TrackSizes
from tests.test_esm_parity import _real

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_sequence_ss8_sasa_tokens_equal_esm_tokenizers():
    from esm.tokenization.sasa_tokenizer import SASADiscretizingTokenizer
    from esm.tokenization.sequence_tokenizer import EsmSequenceTokenizer
    from esm.tokenization.ss_tokenizer import SecondaryStructureTokenizer

    p, ss8, sasa = _real("1BD2.cif.gz", 0)
    seq = EsmSequenceTokenizer()
    theirs = seq.encode(p.sequence + "|" + p.sequence[:20])
    ours = seq_vocab.encode_sequence(p.sequence + "|" + p.sequence[:20])
    assert theirs[1:-1] == ours.tolist()
    assert (theirs[0], theirs[-1]) == (seq.bos_token_id, seq.eos_token_id)
    assert list(seq_vocab.VOCAB) == [
        seq.convert_ids_to_tokens(i) for i in range(len(seq_vocab.VOCAB))
    ]
    sizes = TrackSizes()
    sp = sizes.specials("sequence")
    assert (sp.pad, sp.mask, sp.chainbreak) == (
        seq.pad_token_id,
        seq.mask_token_id,
        seq.chain_break_token_id,
    )

    ss = SecondaryStructureTokenizer("ss8")
    assert ss8_vocab.encode_ss8(ss8).tolist() == ss.encode(ss8, add_special_tokens=False).tolist()
    assert ss8_vocab.VOCAB == tuple(ss.vocab)

    tok = SASADiscretizingTokenizer()
    values = [float(v) for v in sasa if np.isfinite(v)]
    values += list(sasa_vocab.SASA_EDGES) + [0.0, 1e4]  # the edges themselves, both ends
    ref = tok.encode(values, add_special_tokens=False).tolist()
    assert sasa_vocab.encode_sasa(np.array(values)).tolist() == ref
    assert len(sasa_vocab.VOCAB) == len(tok.vocab)
    assert sasa_vocab.encode_sasa(np.array([np.nan])).tolist() == [tok.pad_token_id]


def test_structure_specials_equal_esm_constants():
    from esm.utils.constants import esm3 as C

    sp = TrackSizes().specials("structure")
    assert (sp.mask, sp.eos, sp.bos, sp.pad, sp.chainbreak) == (
        C.STRUCTURE_MASK_TOKEN, C.STRUCTURE_EOS_TOKEN, C.STRUCTURE_BOS_TOKEN,
        C.STRUCTURE_PAD_TOKEN, C.STRUCTURE_CHAINBREAK_TOKEN,
    )  # fmt: skip
    assert encode_structure_tokens(np.array([-1, 0, 4095])).tolist() == [
        C.STRUCTURE_MASK_TOKEN,
        0,
        4095,
    ]


def test_residue_annotation_slots_equal_esm_residue_tokenizer(tmp_path):
    """With esm's residue table format (label, label_clean, count), the labels in esm's
    order (by count) give the same ids per residue as esm's tokenizer (as sets: the
    EmbeddingBag sums them), <none> where a residue has none and <pad> after."""
    from esm.tokenization.residue_tokenizer import ResidueAnnotationsTokenizer

    rows = [("ATP binding site", "ATP binding", 50), ("P-loop", "ATP binding", 30),
            ("Phosphorylation site", "Phosphorylation", 60), ("Cell attachment site", "RGD", 5)]  # fmt: skip
    csv = tmp_path / "residue.csv"
    csv.write_text("label,label_clean,count\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    theirs = ResidueAnnotationsTokenizer(str(csv))
    p, _, _ = _real("5PTI.cif.gz", 0)
    L = len(p)
    sites = [("ATP binding site", 3, 5), ("Phosphorylation site", 5, 6), ("P-loop", 10, 10),
             ("Cell attachment site", 20, 22)]  # fmt: skip
    sample = {
        "interpro_site_descriptions": [d for d, _, _ in sites],
        "interpro_site_starts": [s for _, s, _ in sites],
        "interpro_site_ends": [e for _, _, e in sites],
        "interpro_site_residues": [p.sequence[s - 1 : e] for _, s, e in sites],
    }
    ref = theirs.encode(theirs.tokenize(sample, p.sequence), add_special_tokens=False).numpy()
    clean = dict((a, b) for a, b, _ in rows)
    vocab = AnnotationVocab(theirs._labels, 16)
    ours = vocab.encode([(clean[d], s, e) for d, s, e in sites], L)
    assert ours.shape == ref.shape == (L, 16)
    for r in range(L):
        assert set(ours[r].tolist()) == set(ref[r].tolist()), r
        assert ours[r, 0] == ref[r, 0] or set(ours[r]) - {0} == set(ref[r]) - {0}
