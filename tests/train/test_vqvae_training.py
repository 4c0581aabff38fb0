"""The structure tokenizer (VQ-VAE) trained by the suite's trainer on real structure shards
(gloo, world size 1, FP32 on CPU): exact resume after a preemption, per-step losses and
codebook usage, validation on held-out structures (backbone RMSD, lDDT), stage 2 on a frozen
stage-1 encoder, and the configs that are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from esm3.train import checkpoint as ckpt
from esm3.train.data import held_out_rows, load_datasets
from esm3.train.trainer import Sinks, train
from esm3.train.validation import load_all
from jobs.config import ConfigError
from jobs.train.config import check_inputs, load_config
from tests.train.conftest import stop_after_calls

pytestmark = [
    pytest.mark.usefixtures("process_group"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

LOSSES = ("distance", "direction", "distogram", "direction_bins", "inverse_folding", "commitment")


def vqvae_config(path, data_root, extra: str = "", steps: int = 6):
    path.write_text(f"""
name = "vqvae-test"
seed = 0
[model]
preset = "vqvae_tiny"
[data]
task = "vqvae"
batch_size = 4
workers = 0
[[data.datasets]]
name = "pdb"
type = "structure"
shards = ["{data_root}/real/structures/*.parquet"]
[[stages]]
name = "stage1"
steps = {steps}
context_length = 96
tracks = ["sequence", "coords"]
[optim]
lr = 2e-3
warmup_steps = 2
[checkpoint]
every = 2
[stability]
min_history = 3
window = 20
[validation]
every = 3
rows = 3
batch_size = 2
holdout = ["pdb"]
{extra}
""")
    return path


def _run(cfg, data_root, ckdir, stop_after=None):
    rows, events = [], []
    datasets = load_datasets(cfg, data_root)
    res = train(
        cfg,
        datasets,
        run_id="vq",
        ckpt_dir=ckdir,
        sinks=Sinks(rows.append, events.append),
        should_stop=stop_after_calls(stop_after),
        validation=load_all(cfg, data_root, datasets),
    )
    return res, rows, events


def test_vqvae_trains_reports_validates_and_resumes_exactly(tmp_path, train_data):
    cfg = load_config(vqvae_config(tmp_path / "c.toml", train_data))
    ref, ref_rows, ref_events = _run(cfg, train_data, tmp_path / "ref")
    assert ref.status == "completed" and sorted(ref.losses) == list(range(1, 7))
    assert ref.param_count == sum(
        p.numel()
        for p in __import__("esm3.model.vqvae.model", fromlist=["VQVAE"])
        .VQVAE(cfg.model_config())
        .parameters()
    )
    for r in ref_rows:  # ESM3's track columns stay empty; the tokenizer's values are in metrics
        assert r.get("loss_sequence") is None and r.get("loss_structure") is None
        m = json.loads(r["metrics"])
        assert {f"loss_{k}" for k in LOSSES} | {
            "codes_used",
            "perplexity",
            "codes_restarted",
        } == set(m)
        assert 1 <= m["codes_used"] <= 64 and 1 <= m["perplexity"] <= m["codes_used"] + 1e-6
        total = sum(m[f"loss_{k}"] for k in LOSSES)  # weights 1: the step's loss is their sum
        assert r["loss"] == pytest.approx(total, rel=1e-5)
    # validation after steps 3 and 6 on the 3 held-out chains: reconstruction measured
    vals = [e for e in ref_events if e["kind"] == "validation"]
    assert [e["step"] for e in vals] == [3, 6]
    detail = json.loads(vals[-1]["detail"])
    assert detail["proteins"] == {"pdb": 3} and detail["refused"] == {"pdb": 0}
    assert detail["rmsd"] > 0 and 0 <= detail["lddt"] <= 1
    assert "rmsd" in vals[-1]["message"] and "lddt" in vals[-1]["message"]

    # held-out rows are never drawn for training
    ds = load_datasets(cfg, train_data)["pdb"]
    held = held_out_rows(cfg, "pdb", len(ds.store))
    assert len(held) == 3 and not np.isin(held, ds.member_rows).any()
    assert np.array_equal(ds.held_out, held)
    assert len(ds.member_rows) == len(ds.store) - 3

    # preempted after step 4, resumed: the same losses and codebook values, step for step
    ck = tmp_path / "run"
    part, _, _ = _run(cfg, train_data, ck, stop_after=4)
    assert part.status == "preempted" and part.step == 4
    rest, rows, _ = _run(cfg, train_data, ck)
    assert rest.resumed_from == 4 and [r["step"] for r in rows] == [5, 6]
    for s in (5, 6):
        assert rest.losses[s] == ref.losses[s], (s, rest.losses[s], ref.losses[s])
    assert [r["metrics"] for r in rows] == [r["metrics"] for r in ref_rows[4:]]


def _stage1_checkpoint(tmp_path, train_data):
    cfg = load_config(vqvae_config(tmp_path / "s1.toml", train_data, steps=2))
    res, _, _ = _run(cfg, train_data, tmp_path / "s1")
    assert res.status == "completed"
    return tmp_path / "s1"


def _all_atom_batch(name: str):
    """One real chain as the loader would batch it, plus its atom37 coordinates."""
    from esm3.tasks.batching import collate
    from esm3.tasks.config import TaskConfig
    from esm3.tasks.corrupt import structure_sample
    from esm3.train.validation import _EvalBatch
    from tests.test_tasks_augment import real_protein
    from tests.vqvae_data import real_atom37

    task = TaskConfig(max_length=96)
    protein = real_protein(name)
    sample = structure_sample(protein, np.random.default_rng(0), task)
    inputs, targets, masks = collate([sample], sizes=task.track_sizes()).to_torch()
    atoms, atom_mask, seq = real_atom37(name)
    assert seq == protein.sequence
    index = inputs["residue_index"][0].numpy()
    at = np.full((len(index), 37, 3), np.nan, np.float32)
    am = np.zeros((len(index), 37), bool)
    at[index >= 0], am[index >= 0] = atoms[index[index >= 0]], atom_mask[index[index >= 0]]
    inputs["atoms"], inputs["atom_mask"] = torch.from_numpy(at)[None], torch.from_numpy(am)[None]
    return _EvalBatch(inputs, targets, masks)


def test_stage2_freezes_the_stage1_encoder_and_steps_on_all_atoms(tmp_path, train_data):
    from esm3.train.vqvae import VQVAELoss, load_vqvae, vqvae_train_model

    s1 = _stage1_checkpoint(tmp_path, train_data)
    over = [
        "model.preset=vqvae_stage2",
        f"model.stage1_checkpoint={s1}",
        "model.encoder={d_model=64, geom_heads=8, d_code=16, n_codes=64}",
        "model.decoder={d_model=64, n_layers=2, n_heads=4}",
    ]
    cfg = load_config(vqvae_config(tmp_path / "s2.toml", train_data), over)
    facts = check_inputs(cfg, tmp_path / "ws", 1)
    assert facts["param_count"] > 0
    model = vqvae_train_model(cfg, torch.device("cpu"), distributed=False).module
    trained = load_vqvae(s1)
    for k, v in trained.encoder.state_dict().items():  # the stage-1 encoder and codebook
        assert torch.equal(model.encoder.state_dict()[k], v), k
    before = {k: v.clone() for k, v in model.state_dict().items()}

    batch = _all_atom_batch("5PTI.cif.gz")
    loss_fn = VQVAELoss(cfg.model_config())
    model.train()
    out = model(**batch.inputs)
    loss = loss_fn(out, batch)
    assert set(loss.per_track) >= {"all_atom_distance", "all_atom_direction", "plddt", "pae"}
    assert torch.isfinite(loss.loss)
    loss.loss.backward()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
    assert loss.metrics == {}  # the frozen codebook reports no usage of its own

    # without all-atom coordinates (today's stores keep N/CA/C) the step says why
    batch.inputs.pop("atoms")
    with pytest.raises(ValueError, match="all-atom coordinates"):
        loss_fn(model(**batch.inputs), batch)


def test_refused_configs(tmp_path, train_data):
    path = vqvae_config(tmp_path / "c.toml", train_data)
    with pytest.raises(ConfigError, match="data.task"):
        check_inputs(load_config(path, ["data.task=pretrain"]), tmp_path / "ws", 1)
    with pytest.raises(ConfigError, match="model.stage1_checkpoint"):
        check_inputs(load_config(path, ["model.preset=vqvae_stage2"]), tmp_path / "ws", 1)
    with pytest.raises(ConfigError, match="model.loss_weights"):
        check_inputs(load_config(path, ["model.loss_weights={fape=1.0}"]), tmp_path / "ws", 1)
    with pytest.raises(ConfigError, match="validation.holdout"):
        check_inputs(load_config(path, ["validation.holdout=['afdb']"]), tmp_path / "ws", 1)
    # stage 2 from a stage-1 checkpoint of another encoder shape
    s1 = _stage1_checkpoint(tmp_path, train_data)
    over = ["model.preset=vqvae_stage2", f"model.stage1_checkpoint={s1}"]
    with pytest.raises(ConfigError, match="encoder"):
        check_inputs(load_config(path, over), tmp_path / "ws", 1)
    # a VQ-VAE checkpoint does not load into ESM3 and back
    with pytest.raises(ckpt.CheckpointMismatch, match="another model"):
        state = ckpt.read_state(ckpt.resolve(s1))
        ckpt.check_compatible(state, ckpt.fingerprint(load_config("tiny").model_config()), "s1")


def test_tokens_stage_uses_a_trained_encoder_and_stores_say_which(tmp_path, train_data):
    """The tokens stage with `[codebook] vqvae`: the encoder exported from the checkpoint
    writes the shard's tokens (equal to the model's own); the store records the tokenizer,
    and training refuses stores of two tokenizers or of another codebook size."""
    from esm3.data.store import StoreSources, open_store, write_store
    from esm3.data.structures.records import read_shard
    from esm3.data.structures.stages import tokenize_structure_shard
    from esm3.model.vqvae.tokenizer import VQVAEStructureTokenizer, identity
    from esm3.train.data import Dataset, check_structure_tokenizers
    from esm3.train.stores import DataError
    from esm3.train.vqvae import load_vqvae
    from jobs.errors import UserError
    from jobs.stages.structures import export_encoder_task

    s1 = _stage1_checkpoint(tmp_path, train_data)
    enc_file = tmp_path / "ws" / "structure-encoder.pt"
    made = export_encoder_task(str(tmp_path), "r", str(s1), str(enc_file))
    assert made["kind"] == "vqvae" and made["codebook_size"] == 64
    again = export_encoder_task(str(tmp_path), "r", str(s1), str(enc_file))
    assert again["skipped"] and again["digest"] == made["digest"]
    other = tmp_path / "other"  # another checkpoint: its encoder is not taken silently
    shutil.copytree(ckpt.resolve(s1), other / ckpt.resolve(s1).name)
    with pytest.raises(UserError, match="remove it"):
        export_encoder_task(str(tmp_path), "r", str(other), str(enc_file))

    raw = train_data / "real" / "structures_raw" / "pdb-00000.parquet"
    out = tmp_path / "tokens" / "pdb-00000.parquet"
    tokenize_structure_shard(raw, out, enc_file)
    model = load_vqvae(s1)
    tok = VQVAEStructureTokenizer.load(enc_file)
    for rec in read_shard(out):
        coords = torch.as_tensor(np.asarray(rec["coords"], np.float32).reshape(-1, 3, 3))
        want = model.tokenize(coords).numpy()
        want = np.where(want >= 64, -1, want)  # MASK -> the shards' "no token"
        assert np.array_equal(np.asarray(rec["structure_tokens"]), want), rec["id"]
        assert np.array_equal(tok.encode(coords.numpy()), want)

    vq = write_store(tmp_path / "vq", "pdb", "structure", StoreSources([out], [], [], enc_file))
    book = train_data / "real" / "structures_raw" / "codebook.npz"
    km = write_store(tmp_path / "km", "afdb", "structure", StoreSources([raw], [], [], book))
    assert vq["structure_tokenizer"] == identity(enc_file)
    assert km["structure_tokenizer"]["kind"] == "kmeans"
    assert km["structure_tokenizer"]["codebook_size"] == 32

    def ds(name, path):
        store = open_store(path)
        return Dataset(name, "structure", store, None, store.member_rows)

    check_structure_tokenizers({"pdb": ds("pdb", tmp_path / "vq")}, 64)
    with pytest.raises(DataError, match="different structure tokenizers"):
        check_structure_tokenizers({"pdb": ds("pdb", tmp_path / "vq"),
                                    "afdb": ds("afdb", tmp_path / "km")}, 64)  # fmt: skip
    with pytest.raises(DataError, match="tasks.codebook_size is 4096"):
        check_structure_tokenizers({"pdb": ds("pdb", tmp_path / "vq")}, 4096)
