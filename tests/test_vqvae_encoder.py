"""The VQ-VAE structure encoder and EMA codebook on real chains (MDAnalysisTests): invariance,
locality, missing atoms, short chains, input checks, and the codebook's EMA update,
restarts, statistics and data-dependent init in closed form. Float64 throughout where
tokens are compared, so nearest-code ties cannot flip."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch

from esm3.model.vqvae.codebook import LAPLACE_EPS, EMACodebook, perplexity
from esm3.model.vqvae.config import EncoderConfig
from esm3.model.vqvae.encoder import StructureEncoder, knn_edges
from tests.test_tasks_augment import real_protein

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CFG = EncoderConfig(d_model=32, n_layers=2, geom_heads=4, d_code=8, n_codes=32)


def _coords(name: str = "adk_open.pdb") -> torch.Tensor:
    return torch.tensor(real_protein(name).coords, dtype=torch.float64)


@cache
def _encoder() -> StructureEncoder:
    """A float64 encoder with every weight random, its codebook drawn from its own
    encodings of a real chain (so tokens vary)."""
    torch.manual_seed(0)
    enc = StructureEncoder(CFG).double()
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
        z, present = enc.embed(_coords()[None])
        rows = z[present][torch.randperm(int(present.sum()))[: CFG.n_codes]]
        enc.codebook.embeddings.copy_(rows)
        enc.codebook.z_avg.copy_(rows)
        enc.codebook.N.fill_(1.0)
    return enc.eval()


def _random_rotation(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


# ---- encoder ----------------------------------------------------------------------------


def test_tokens_vary_and_are_codes():
    tok = _encoder().tokenize(_coords())
    assert tok.shape == (214,) and tok.dtype == torch.int64
    assert ((tok >= 0) & (tok < CFG.n_codes)).all()
    assert len(tok.unique()) > 16


@pytest.mark.parametrize("name", ["adk_open.pdb", "5PTI.cif.gz"])
def test_tokens_invariant_under_rotation_and_translation(name):
    enc, x = _encoder(), _coords(name)
    moved = x @ _random_rotation(1).T + torch.tensor([40.0, -25.0, 13.0], dtype=torch.float64)
    z0, p0 = enc.embed(x[None])
    z1, _ = enc.embed(moved[None])
    torch.testing.assert_close(z1[p0], z0[p0], rtol=0, atol=1e-9)
    assert torch.equal(enc.tokenize(moved), enc.tokenize(x))


def _neighbours(x: torch.Tensor) -> list[list[int]]:
    L = x.shape[0]
    everyone = torch.ones(1, L, dtype=torch.bool)
    edges, _ = knn_edges(x[None, :, 1], everyone, everyone, torch.zeros(1, L, dtype=torch.long),
                         torch.arange(L), CFG.knn)  # fmt: skip
    return edges[0].tolist()


def test_a_token_depends_on_its_neighbourhood_only():
    enc, x = _encoder(), _coords()
    edges = _neighbours(x)
    i = 100
    j = next(r for r in range(x.shape[0]) if r not in edges[i] and abs(r - i) > 40)
    holder = next(m for m in range(x.shape[0]) if m != j and j in edges[m])
    moved = x.clone()
    moved[j] += torch.tensor([0.7, -0.4, 0.5], dtype=torch.float64)  # a small shift: j stays near
    assert j not in _neighbours(moved)[i] and j in _neighbours(moved)[holder]
    z0, _ = enc.embed(x[None])
    z1, _ = enc.embed(moved[None])
    assert torch.equal(z1[0, i], z0[0, i])
    assert enc.tokenize(moved)[i] == enc.tokenize(x)[i]
    assert not torch.allclose(z1[0, holder], z0[0, holder])
    far = x.clone()
    far[j] += 500.0  # far away: out of everyone's neighbourhood but its own
    z2, _ = enc.embed(far[None])
    assert torch.equal(z2[0, i], z0[0, i])


def test_missing_backbone_atoms_give_mask():
    enc, x = _encoder(), _coords()
    x[5, 1] = float("nan")  # no CA
    x[6, 2] = float("nan")  # no C
    x[7] = float("nan")  # nothing
    tok = enc.tokenize(x)
    mask = enc.mask_token
    assert mask == CFG.n_codes
    assert tok[5:8].tolist() == [mask] * 3
    assert (tok[:5] < CFG.n_codes).all() and (tok[8:] < CFG.n_codes).all()
    assert (enc.tokenize(torch.full((12, 3, 3), float("nan"), dtype=torch.float64)) == mask).all()


def test_single_residue_and_short_chains():
    enc, x = _encoder(), _coords()
    one = enc.tokenize(x[50:51])
    assert one.shape == (1,) and 0 <= int(one) < CFG.n_codes
    ten = enc.tokenize(x[40:50])
    assert ten.shape == (10,) and (ten < CFG.n_codes).all()


def test_chunked_tokenize_matches_one_batch():
    enc, x = _encoder(), _coords()
    assert torch.equal(enc.tokenize(x, chunk_size=7), enc.tokenize(x, chunk_size=4096))


def test_packed_and_padded_chains_encode_as_alone():
    enc, x = _encoder(), _coords()
    a, b = x[10:22], x[60:70]  # shorter than 16: esm would let them see each other
    row = torch.cat([a, b, torch.zeros(3, 3, 3, dtype=torch.float64)])[None]
    seq = torch.tensor([[0] * 12 + [1] * 10 + [2] * 3])
    mask = torch.tensor([[True] * 22 + [False] * 3])
    res = torch.cat([torch.arange(12), torch.arange(10), torch.zeros(3, dtype=torch.long)])[None]
    z, present = enc.embed(row, mask=mask, sequence_id=seq, residue_index=res)
    za, _ = enc.embed(a[None])
    zb, _ = enc.embed(b[None])
    torch.testing.assert_close(z[0, :22], torch.cat([za[0], zb[0]]), rtol=0, atol=1e-12)
    assert not present[0, 22:].any()


@pytest.mark.parametrize(
    ("coords", "message"),
    [
        (torch.zeros(5, 3), "shape"),
        (torch.zeros(5, 4, 3), "shape"),
        (torch.zeros(1, 5, 3, 3), "shape"),
        (torch.zeros(5, 3, 3, dtype=torch.long), "floating"),
        (torch.zeros(0, 3, 3), "no residues"),
        ([[0.0] * 3] * 3, "torch tensor"),
    ],
    ids=["2d", "4 atoms", "batched", "integer", "empty", "list"],
)
def test_bad_input_raises_a_clear_value_error(coords, message):
    with pytest.raises(ValueError, match=message):
        _encoder().tokenize(coords)


# ---- codebook ---------------------------------------------------------------------------


def _codebook(decay: float = 0.9, threshold: float = 0.0) -> EMACodebook:
    cb = EMACodebook(4, 2, decay=decay, restart_threshold=threshold).double()
    corners = torch.tensor([[10.0, 10], [-10, 10], [-10, -10], [10, -10]], dtype=torch.float64)
    cb.embeddings.copy_(corners)
    cb.z_avg.copy_(corners * 2)
    cb.N.fill_(2.0)
    return cb


def _points(seed: int = 0, n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, n, 2, generator=g, dtype=torch.float64) * 3
            + torch.tensor([8.0, 9.0], dtype=torch.float64))  # fmt: skip


def test_ema_update_closed_form():
    d = 0.9
    cb = _codebook(decay=d).train()
    z = torch.cat([_points(0, 6), -_points(1, 4)], dim=1)  # near codes 0 and 2
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 9] = False  # a masked position counts for nothing
    _, codes, _ = cb(z, mask)
    n = torch.bincount(codes[mask], minlength=4).double()
    s = torch.zeros(4, 2, dtype=torch.float64).index_add_(0, codes[mask], z[mask])
    N = d * 2.0 + (1 - d) * n
    z_avg = d * _codebook().z_avg + (1 - d) * s
    smoothed = (N + LAPLACE_EPS) / (N.sum() + 4 * LAPLACE_EPS) * N.sum()
    torch.testing.assert_close(cb.N, N)
    torch.testing.assert_close(cb.z_avg, z_avg)
    torch.testing.assert_close(cb.embeddings, z_avg / smoothed[:, None])
    before = _codebook().embeddings
    for k in (0, 2):  # used codes move toward their assigned means
        mean = s[k] / n[k]
        assert (cb.embeddings[k] - mean).norm() < (before[k] - mean).norm()


def test_a_dead_code_is_restarted_from_the_batch():
    torch.manual_seed(0)
    cb = _codebook(decay=0.99, threshold=1.0).train()
    cb.N.fill_(100.0)
    cb.N[1] = 0.0  # forced dead
    z = _points(2, 12)
    cb(z, None)
    assert int(cb.last_stats.restarted) == 1
    assert any(torch.equal(cb.embeddings[1], row) for row in z[0])
    assert cb.N[1] == 1.0 and torch.equal(cb.z_avg[1], cb.embeddings[1])
    cb.eval()
    cb(z, None)
    assert int(cb.last_stats.restarted) == 0


def test_perplexity_of_uniform_assignments_is_the_number_of_codes_used():
    cb = _codebook().eval()
    z = cb.embeddings[[0, 1, 2, 0, 1, 2]][None]  # three codes, twice each
    _, codes, _ = cb(z, None)
    assert codes.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert int(cb.last_stats.codes_used) == 3
    assert float(cb.last_stats.perplexity) == pytest.approx(3.0)
    counts = torch.tensor([2.0, 1.0, 1.0, 0.0])
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert float(perplexity(counts)) == pytest.approx(math.exp(entropy))


def test_commitment_loss_over_masked_positions_and_straight_through():
    cb = _codebook(decay=1.0).eval()
    z = _points(3, 5).requires_grad_(True)
    mask = torch.tensor([[True, True, True, False, False]])
    with torch.no_grad():
        z.data[0, 4] = 1e6  # masked: must not reach the loss
    z_q, codes, loss = cb(z, mask)
    want = 0.25 * ((z[0, :3] - cb.embeddings[codes[0, :3]]) ** 2).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(z_q[0, :4], cb.embeddings[codes[0, :4]])
    z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_data_dependent_init_only_when_counts_are_zero():
    torch.manual_seed(0)
    cb = EMACodebook(4, 2, decay=1.0, restart_threshold=0.0).double()
    z = _points(4, 12)
    cb.eval()(z, None)
    assert cb.N.sum() == 0  # eval never initialises
    cb.train()(z, None)
    assert (cb.N == 1.0).all()
    for code in cb.embeddings:  # every code is one of the batch's vectors
        assert (z[0] - code).norm(dim=-1).min() < 1e-6
    first = cb.embeddings.clone()
    cb(_points(5, 12) * -1, None)  # a second batch: no re-init
    torch.testing.assert_close(cb.embeddings, first)
    loaded = EMACodebook(4, 2, decay=1.0, restart_threshold=0.0).double()
    loaded.load_state_dict(cb.state_dict())
    loaded.train()(_points(6, 12) * 3, None)
    torch.testing.assert_close(loaded.embeddings, first)


def _ranked_training_steps(rank: int, world: int, store: str, out: str) -> None:
    """One rank of the distributed test: init, an EMA step and a forced restart on data of
    its own; saves its buffers."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # every rank draws differently: rank 0's draw must win
        cb = EMACodebook(8, 2, decay=0.9, restart_threshold=0.0).double().train()
        z = _points(rank, 10 + 5 * rank)
        cb(z, None)
        n_after_first = cb.N.clone()
        cb.restart_threshold = 1.0
        cb.N.fill_(50.0)
        cb.N[3] = 0.0
        cb(-z, None)
        torch.save({"state": cb.state_dict(), "restarted": int(cb.last_stats.restarted),
                    "rows": z[0], "n_after_first": n_after_first}, out)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, tmp: str) -> None:
    _ranked_training_steps(rank, world, f"{tmp}/store", f"{tmp}/rank{rank}.pt")


def test_ranks_keep_identical_codebooks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name, t in r0["state"].items():
        assert torch.equal(t, r1["state"][name]), name
    assert r0["restarted"] == r1["restarted"] == 1
    # counts summed over ranks: 8 codes init at 1, decayed by 0.9, plus 0.1 * (10 + 15)
    assert float(r1["n_after_first"].sum()) == pytest.approx(0.9 * 8 + 0.1 * 25)
    # the restarted code is one of rank 0's vectors of the second step
    assert any(torch.allclose(-row, r0["state"]["embeddings"][3]) for row in r0["rows"])


def test_per_residue_inputs_of_the_wrong_shape_raise():
    x = _coords()[None, :20]
    with pytest.raises(ValueError, match="sequence_id must have shape"):
        _encoder().embed(x, sequence_id=torch.zeros(1, 19, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must have shape"):
        _encoder().embed(x, mask=torch.ones(20, dtype=torch.bool))


def test_a_training_step_reaches_the_encoder_and_updates_the_codebook():
    from esm3.model.vqvae.config import vqvae_config

    torch.manual_seed(0)
    enc = StructureEncoder(vqvae_config("vqvae_tiny").encoder).double().train()
    x = _coords("5PTI.cif.gz")
    x[4] = float("nan")  # frameless: no part in the loss or the codebook
    out = enc(x[None])
    assert not out.present[0, 4] and out.present.sum() == len(x) - 1
    assert (enc.codebook.N > 0).all()  # initialised from this batch
    assert int(enc.codebook.last_stats.codes_used) > 1
    (out.commitment_loss + out.z_q.square().mean()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
