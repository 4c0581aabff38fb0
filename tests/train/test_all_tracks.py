"""Every track trained: real sequences labelled with the demo's stand-in InterPro and site
files (ingested, vocabulary written and read back, joined in DuckDB as preprocessing does),
real structures with SS8 and SASA; a short run whose six per-track losses are finite at
every step and fall. Track sizes come from the tokenizer: a model or checkpoint built for
another vocabulary is refused with one clear line."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from esm3.data.interpro import ingest_protein2ipr, ingest_sites
from esm3.data.sequence_annotations import annotate_sequence_shard
from esm3.data.structures.filters import PDBFilter
from esm3.data.structures.stages import (
    StructureStageConfig,
    fit_structure_codebook,
    process_structure_shard,
    tokenize_structure_shard,
)
from esm3.model.esm3 import ESM3
from esm3.tokenize.annotations import FIRST_LABEL, read_vocabulary, vocabulary_document
from esm3.tokenize.function_tokens import FUNCTION_VOCAB_SIZE, FunctionFiles, FunctionTokenizer
from esm3.tokenize.tracks import CATEGORICAL_TRACKS, VocabularyMismatch
from esm3.train import checkpoint as ckpt
from esm3.train.data import load_datasets
from esm3.train.trainer import Sinks, Trainer, TrainModel, train
from jobs.config import ConfigError
from jobs.stages.structures import vocabulary_task
from jobs.train.config import load_config
from jobs.train.vocabulary import with_vocabulary
from tests.realdata import mda_file
from tests.train.conftest import write_config
from tests.train.fixtures import STRUCTURE_FILES

DEMO_LABELS = Path(__file__).resolve().parents[2] / "jobs/configs/preprocess/demo-labels"
STEPS, WINDOW = 36, 8


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _structures_with_sasa(root: Path) -> Path:
    """PDB chains with SS8 and SASA (as AFDB/ESMAtlas records have), tokenized."""
    raw, out = root / "raw" / "pdb.parquet", root / "real" / "structures" / "pdb.parquet"
    files = [mda_file(f) for f in STRUCTURE_FILES]
    cfg = StructureStageConfig(dataset="pdb", sasa=True, sasa_points=100,
                               pdb=PDBFilter(deposited_before="2100-01-01", max_resolution=100.0))  # fmt: skip
    process_structure_shard(files, raw, cfg)
    fit_structure_codebook([raw], root / "raw" / "codebook.npz", codebook_size=32, iterations=5)
    tokenize_structure_shard(raw, out, root / "raw" / "codebook.npz")
    return out


@pytest.fixture(scope="module")
def labelled(train_data, tmp_path_factory) -> Path:
    """A data root: annotated sequences, structures with SASA, vocabulary.json."""
    if shutil.which("mkdssp") is None:
        pytest.skip("mkdssp not installed")
    root = tmp_path_factory.mktemp("labelled")
    ipr, sites = root / "interpro" / "p2i.parquet", root / "interpro" / "sites.parquet"
    ingest_protein2ipr(DEMO_LABELS / "protein2ipr-standin.tsv.gz", ipr)
    ingest_sites(DEMO_LABELS / "sites-standin.tsv.gz", sites)
    # an entry list of every stand-in family (names from protein2ipr's name column), so
    # every annotated sequence has function tokens
    families = pq.read_table(ipr, columns=["ipr", "name"]).to_pandas().drop_duplicates("ipr")
    entries = root / "interpro" / "entry.list"
    entries.write_text("ENTRY_AC\tENTRY_TYPE\tENTRY_NAME\n" + "".join(
        f"{r.ipr}\tFamily\t{r.name}\n" for r in families.itertuples()))  # fmt: skip
    vocabulary_task(str(root), "t", [str(ipr)], str(root / "interpro" / "terms.parquet"),
                    [str(sites)], str(root / "vocabulary.json"), 10, "stand-in",
                    {"entry_list": str(entries)})  # fmt: skip
    src = train_data / "real" / "sequences" / "uniprot-00000.parquet"
    annotated = root / "annotated.parquet"
    annotate_sequence_shard(src, annotated, [ipr], [sites])
    # the records with site features (about half): every sequence sample then carries both
    # label tracks, so each step of the short run has positions in all six
    t = pq.read_table(annotated)
    t = t.filter(pc.is_valid(t["residue_annotations"]))
    assert t.num_rows > 50 and t["annotations"].null_count == 0
    (root / "real" / "sequences").mkdir(parents=True)
    pq.write_table(t, root / "real" / "sequences" / "annotated.parquet")
    _structures_with_sasa(root)
    return root


def _config(tmp_path: Path, root: Path, *overrides: str):
    stages = f'[[stages]]\nname = "all"\nsteps = {STEPS}\ncontext_length = 128\n'
    path = write_config(tmp_path / "c.toml", root, "[tasks]\ncodebook_size = 32\n", stages=stages)
    # 10 samples, half sequences, half structures: with seed 0 every step draws both kinds
    over = [f"data.vocabulary={root / 'vocabulary.json'}", "data.batch_size=10", *overrides]
    return load_config(path, over)


def test_vocabulary_file_names_function_tables_and_residue_labels(labelled):
    doc = json.loads((labelled / "vocabulary.json").read_text())
    vocab = read_vocabulary(labelled / "vocabulary.json")
    assert vocab.residue_labels == ("PS00004", "PS00016", "PS00017") and doc["note"] == "stand-in"
    assert vocab.function_files == FunctionFiles.in_folder(labelled / "function-tokens")
    assert doc["function"] == {"depth": 8, "size": FUNCTION_VOCAB_SIZE}
    families = len((labelled / "interpro" / "entry.list").read_text().splitlines()) - 1
    assert len(FunctionTokenizer.from_files(vocab.function_files).entries) == families


def test_vocabulary_file_gives_tables_and_model_sizes(labelled, tmp_path):
    cfg = with_vocabulary(_config(tmp_path, labelled), "/")
    assert cfg.tasks.function_files == str(labelled / "function-tokens")
    assert cfg.tasks.residue_labels == ("PS00004", "PS00016", "PS00017")
    # the model's embeddings and heads come from the tokenizer's sizes, in one place
    tracks = cfg.model_config().tracks
    assert tracks == cfg.tasks.track_sizes()
    assert (tracks.function, tracks.residue) == (FUNCTION_VOCAB_SIZE, FIRST_LABEL + 3)
    model = ESM3(cfg.model_config())
    out = model(torch.full((1, 5), 4), function=torch.zeros(1, 5, 8, dtype=torch.long))
    assert out.logits["function"].shape == (1, 5, 8, tracks.function)
    assert out.logits["residue"].shape == (1, 5, tracks.residue)


def test_bad_vocabulary_settings_are_one_line(labelled, tmp_path):
    with pytest.raises(ConfigError, match=r"data.vocabulary.*nope.json.*unreadable"):
        with_vocabulary(_config(tmp_path, labelled, f"data.vocabulary={tmp_path}/nope.json"), "/")
    other = tmp_path / "v.json"
    other.write_text(json.dumps({**vocabulary_document(None, []), "scheme": "interpro-slots-v1"}))
    with pytest.raises(ConfigError, match=r"scheme 'interpro-slots-v1', expected 'function-lsh-residue-slots-v1'"):  # fmt: skip
        with_vocabulary(_config(tmp_path, labelled, f"data.vocabulary={other}"), "/")
    names = dict(zip(("keywords", "idf", "interpro2keywords", "hyperplanes"),
                     ("k.txt", "i.npy", "t.csv", "h.npz"), strict=True))  # fmt: skip
    other.write_text(json.dumps(vocabulary_document(names, [])))
    with pytest.raises(ConfigError, match=r"data.vocabulary.*v.json: function_files.keywords .*k.txt does not exist"):  # fmt: skip
        with_vocabulary(_config(tmp_path, labelled, f"data.vocabulary={other}"), "/")
    cfg = _config(tmp_path, labelled, f"tasks.function_files={tmp_path}")
    with pytest.raises(ConfigError, match=r"tasks.function_files.*differs from the tables of data.vocabulary"):  # fmt: skip
        with_vocabulary(cfg, "/")
    cfg = _config(tmp_path, labelled, 'tasks.residue_labels=["PS00017"]')
    with pytest.raises(ConfigError, match=r"tasks.residue_labels.*1 labels given that differ"):
        with_vocabulary(cfg, "/")


def test_model_or_checkpoint_for_another_vocabulary_is_refused(labelled, tmp_path):
    cfg = with_vocabulary(_config(tmp_path, labelled), "/")
    fewer = replace(cfg, tasks=replace(cfg.tasks, residue_labels=cfg.tasks.residue_labels[:-1]))
    wrong = ESM3(fewer.model_config())
    n = cfg.tasks.track_sizes().residue
    with pytest.raises(VocabularyMismatch, match=rf"residue: {n - 1} token ids in the model, {n} in the tokenizer"):  # fmt: skip
        Trainer(cfg, TrainModel(wrong, 0, {}, lambda t: 0.0, "fp32"), None, None,
                run_id="t", ckpt_dir=tmp_path / "ck", device=torch.device("cpu"))  # fmt: skip
    state = {"model": ckpt.fingerprint(fewer.model_config())}
    with pytest.raises(ckpt.CheckpointMismatch, match=rf"vocabulary of track 'residue': checkpoint {n - 1} token ids vs config {n}"):  # fmt: skip
        ckpt.check_compatible(state, ckpt.fingerprint(cfg.model_config()), "ck/step-10")


def test_all_six_tracks_have_finite_falling_losses(labelled, tmp_path):
    cfg = with_vocabulary(_config(tmp_path, labelled), "/")
    rows, events = [], []
    res = train(cfg, load_datasets(cfg, "/"), run_id="t", ckpt_dir=tmp_path / "ck",
                sinks=Sinks(rows.append, events.append))  # fmt: skip
    assert res.status == "completed" and len(rows) == STEPS
    sizes = cfg.tasks.track_sizes()
    for track in CATEGORICAL_TRACKS:
        loss = np.array([r[f"loss_{track}"] for r in rows], dtype=float)  # None -> nan
        assert np.isfinite(loss).all(), (track, loss)
        first, last = loss[:WINDOW].mean(), loss[-WINDOW:].mean()
        assert last < first, (track, first, last)
        assert last < math.log(getattr(sizes, track)), (track, last)
