"""Weight compatibility with EvolutionaryScale's `esm` ESM3 (3.2.1.post1, a test dependency):
the same token ids as esm's tokenizers, and the same logits from the same weights both ways,
on real proteins (MDAnalysisTests chains with their SS8 from mkdssp and SASA from biotite).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

from esm3.interop.esm import (
    IncompatibleWeights,
    forward_like_esm,
    from_esm_state_dict,
    to_esm_state_dict,
)
from esm3.model.config import preset
from esm3.model.esm3 import ESM3 as SuiteESM3
from esm3.tasks.config import TaskConfig
from esm3.tokenize import sasa as sasa_vocab
from esm3.tokenize import sequence as seq_vocab
from esm3.tokenize import ss8 as ss8_vocab
from esm3.tokenize.annotations import AnnotationVocab
from esm3.tokenize.specials import SEQUENCE_BOS, SEQUENCE_EOS, SEQUENCE_PAD
from esm3.tokenize.tracks import TrackSizes
from jobs.bench.bench_esm import Shape, esm_model
from tests.function_tables import function_tables
from tests.realdata import mda_file
from tests.test_tasks_augment import _read, real_protein

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# (d_model, n_heads, v_heads, n_layers): two small shapes
SHAPES = [(64, 2, 4, 3), (96, 3, 6, 2)]
SITES = ("ATP binding site", "Cell attachment site", "Phosphorylation site")


def test_esm_installed_without_replacing_the_cpu_torch():
    from importlib.metadata import version

    assert version("esm") == "3.2.1.post1"
    if not torch.cuda.is_available():
        assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"


def _esm_model(d: int, heads: int, v_heads: int, layers: int, seed: int) -> torch.nn.Module:
    """esm's ESM3 at a small shape with every weight random (esm's init leaves the
    geometric scales at 0 and norms at 1, which would hide differences)."""
    torch.manual_seed(seed)
    m = esm_model(Shape(d_model=d, n_layers=layers, n_heads=heads, geom_heads=v_heads))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return m.eval()


@cache
def _real(name: str, chain: int):
    """A real chain: its Protein, SS8 (mkdssp) and SASA (biotite) computed from its atoms."""
    import biotite.structure as bs

    from esm3.data.structures.sasa import residue_sasa
    from esm3.data.structures.ss8 import chain_ss8

    p = real_protein(name, chain)
    atoms = _read(mda_file(name))
    atoms.res_name[np.isin(atoms.res_name, ["HSD", "HSE", "HSP"])] = "HIS"
    atoms = atoms[bs.filter_amino_acids(atoms) & ~atoms.hetero & (atoms.element != "H")]
    atoms = atoms[atoms.chain_id == np.unique(atoms.chain_id)[chain]]
    ss8, sasa = chain_ss8(atoms), residue_sasa(atoms)
    assert len(ss8) == len(sasa) == len(p)
    return p, ss8, sasa


def _tokens(name: str, chain: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """esm's forward keywords for one real chain with BOS/EOS: sequence, SS8 and SASA from
    the chain; function tokens of stand-in InterPro annotations through the suite's
    tables; structure tokens, residue sites and pLDDT as stand-ins (no structure tokenizer
    or InterPro data here), in esm's id ranges."""
    p, ss8, sasa = _real(name, chain)
    rng = np.random.default_rng(seed)
    L = len(p)

    def ends(a: np.ndarray, fill: int) -> np.ndarray:
        pad = np.full((1,) + a.shape[1:], fill, dtype=np.int64)
        return np.concatenate([pad, a, pad])

    seq = ends(seq_vocab.encode_sequence(p.sequence, unknown="X"), SEQUENCE_BOS)
    seq[-1] = SEQUENCE_EOS
    has = np.isfinite(p.coords).all(axis=(1, 2))
    structure = ends(np.where(has, rng.integers(0, 4096, L), 4096), 4098)
    structure[-1] = 4097
    sites = AnnotationVocab(SITES, 16)
    residue = ends(
        sites.encode([(SITES[k % 3], 5 * k + 1, 5 * k + 3) for k in range(L // 5)], L), 0
    )
    tables = TaskConfig(function_files=function_tables()).function_tokenizer
    stand_in = [("IPR000719", 1, L // 2), ("IPR017441", L // 4, L // 3), ("IPR000003", L // 2, L)]
    function = ends(tables.encode(stand_in, L), 0)
    coords = np.concatenate([np.full((1, 3, 3), np.nan), p.coords, np.full((1, 3, 3), np.nan)])
    t = lambda a, dt=torch.long: torch.tensor(a, dtype=dt)[None]  # noqa: E731
    plddt = np.concatenate([[0], rng.uniform(0.5, 1.0, L), [0]])
    return {
        "sequence_tokens": t(seq),
        "structure_tokens": t(structure),
        "ss8_tokens": t(ends(ss8_vocab.encode_ss8(ss8), 0)),
        "sasa_tokens": t(ends(sasa_vocab.encode_sasa(sasa), 0)),
        "function_tokens": t(function),
        "residue_annotation_tokens": t(residue),
        "structure_coords": t(coords, torch.float32),
        "per_res_plddt": t(plddt, torch.float32),
        "average_plddt": torch.full((1, L + 2), float(plddt[1:-1].mean())),
    }


def _max_diff(esm_out, ours: dict[str, torch.Tensor]) -> float:
    assert len(ours) == 6
    return max((getattr(esm_out, k) - v).abs().max().item() for k, v in ours.items())


def _both(esm_model, suite_model, **kw) -> float:
    with torch.no_grad():
        return _max_diff(esm_model(**kw), forward_like_esm(suite_model, **kw))


ABSENT = {
    "all given": (),
    "no structure": ("structure_tokens", "structure_coords", "average_plddt", "per_res_plddt"),
    "sequence only": ("structure_tokens", "structure_coords", "ss8_tokens", "sasa_tokens",
                      "function_tokens", "residue_annotation_tokens", "average_plddt",
                      "per_res_plddt"),
    "no sequence": ("sequence_tokens", "function_tokens"),
    "no plddt": ("average_plddt", "per_res_plddt"),
}  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}x{s[3]}")
def test_esm_weights_give_esm_logits_in_the_suite(shape):
    esm_model = _esm_model(*shape, seed=shape[0])
    suite = from_esm_state_dict(esm_model.state_dict(), n_heads=shape[1]).eval()
    assert suite.cfg.n_geom_heads == shape[2] and suite.cfg.n_layers == shape[3]
    kw = _tokens("5PTI.cif.gz", 0)
    for case, absent in ABSENT.items():
        given = {k: v for k, v in kw.items() if k not in absent}
        assert _both(esm_model, suite, **given) <= 1e-4, case
    # control: the comparison sees a real difference (one weight changed)
    with torch.no_grad():
        suite.layers[0].geom.dist_weight.add_(1.0)
    assert _both(esm_model, suite, **kw) > 1e-3


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}x{s[3]}")
def test_suite_weights_load_strictly_into_esm_with_the_same_logits(shape):
    d, heads, v_heads, layers = shape
    cfg = preset("tiny", d_model=d, d_head=d // heads, n_layers=layers, geom_heads=v_heads,
                 ffn_multiple=256, tracks=TrackSizes())  # fmt: skip
    torch.manual_seed(1)
    suite = SuiteESM3(cfg).eval()
    with torch.no_grad():
        for p in suite.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    esm_model = _esm_model(*shape, seed=99)
    esm_model.load_state_dict(to_esm_state_dict(suite), strict=True)
    kw = _tokens("1BD2.cif.gz", 1, seed=3)
    assert _both(esm_model, suite, **kw) <= 1e-4
    back = from_esm_state_dict(to_esm_state_dict(suite), n_heads=heads)
    for k, v in suite.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def _row(kw: dict[str, torch.Tensor], T: int) -> dict[str, torch.Tensor]:
    """One sample's keywords right-padded to T positions, as esm pads a batch."""
    pads = {"sequence_tokens": SEQUENCE_PAD, "structure_tokens": 4099, "structure_coords": float("nan"),
            "average_plddt": 1.0}  # fmt: skip
    out = {}
    for k, v in kw.items():
        extra = torch.full((1, T - v.shape[1]) + v.shape[2:], pads.get(k, 0), dtype=v.dtype)
        out[k] = torch.cat([v, extra], 1)
    return out


def test_parity_with_packed_rows_padding_and_chains():
    shape = SHAPES[0]
    esm_model = _esm_model(*shape, seed=5)
    suite = from_esm_state_dict(esm_model.state_dict(), n_heads=shape[1]).eval()
    a, b = _tokens("5PTI.cif.gz", 0), _tokens("1BD2.cif.gz", 0, seed=1)
    na, nb = a["sequence_tokens"].shape[1], b["sequence_tokens"].shape[1]
    # packed: two proteins in one row (sequence_id), then padding (id -1)
    T = na + nb + 4
    packed = _row({k: torch.cat([a[k], b[k]], 1) for k in a}, T)
    sid = torch.tensor([[0] * na + [1] * nb + [-1] * 4])
    assert _both(esm_model, suite, **packed, sequence_id=sid) <= 1e-4
    # two chains of one complex: chain_id confines geometric attention
    chains = torch.tensor([[0] * na + [1] * nb + [1] * 4])
    assert _both(esm_model, suite, **packed, sequence_id=sid, chain_id=chains) <= 1e-4
    # a batch of two rows of different lengths, padded (esm's batch layout)
    W = max(na, nb)
    ra, rb = _row(a, W), _row(b, W)
    batch = {k: torch.cat([ra[k], rb[k]], 0) for k in a}
    rows = torch.tensor([[0] * na + [-1] * (W - na), [0] * nb + [-1] * (W - nb)])
    assert _both(esm_model, suite, **batch, sequence_id=rows) <= 1e-4


def test_bad_state_dicts_give_one_clear_error():
    shape = SHAPES[0]
    sd = _esm_model(*shape, seed=0).state_dict()
    missing = {k: v for k, v in sd.items() if "blocks.1.ffn" not in k}
    with pytest.raises(IncompatibleWeights, match=r"missing 4 tensors.*transformer.blocks.1.ffn"):
        from_esm_state_dict(missing, n_heads=2)
    other = dict(sd)
    other["transformer.blocks.1.attn.out_proj.weight"] = torch.zeros(64, 32)
    with pytest.raises(IncompatibleWeights, match=r"1 of another shape.*layers.1.attn.out.weight"):
        from_esm_state_dict(other, n_heads=2)
    with pytest.raises(IncompatibleWeights, match="no 'encoder.sequence_embed.weight'"):
        from_esm_state_dict({"w": torch.zeros(1)})
    with pytest.raises(IncompatibleWeights, match="d_model 64 is not a multiple of n_heads 3"):
        from_esm_state_dict(sd, n_heads=3)
    inv = SuiteESM3(preset("inverse_folding_200m", d_model=64, d_head=32, n_layers=2))
    with pytest.raises(IncompatibleWeights, match="layer pattern 'alternating'"):
        to_esm_state_dict(inv)
