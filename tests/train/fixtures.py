"""Real training data for the training tests: sequence shards from the mmseqs2-examples
UniProt sequences (the sequence pipeline's ingest) and structure shards from
MDAnalysisTests' PDB files (the structure pipeline's shard stage), small enough for CPU."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from tests.realdata import mda_file, uniprot_fasta

STRUCTURE_FILES = ("1BD2.cif.gz", "5PTI.cif.gz", "3KPR.cif.gz", "3PWP.cif.gz", "1YJP.cif.gz")


def sequence_shard(data_dir: Path, n: int = 400, max_len: int = 200) -> Path:
    """The first records of the real UniProt FASTA, ingested with the pipeline's ingest, then
    cut to `n` sequences no longer than `max_len` (short ones keep CPU steps fast)."""
    from esm3.data.fasta import ingest_fasta

    full = data_dir / "ingest" / "uniprot_full.parquet"
    out = data_dir / "sequences" / "uniprot-00000.parquet"
    if out.exists():
        return out
    ingest_fasta(uniprot_fasta(), full, dataset="uniprot")
    t = pq.read_table(full)
    t = t.filter(pq.read_table(full, columns=["length"]).column("length").to_numpy() <= max_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t.slice(0, n), out)
    return out


def structure_shard(data_dir: Path) -> Path:
    """PDB chains of MDAnalysisTests files through the structures stage (SS8 by mkdssp);
    the date/method filters are relaxed so every protein chain of these files is kept."""
    from esm3.data.structures.filters import PDBFilter
    from esm3.data.structures.stages import (
        StructureStageConfig,
        fit_structure_codebook,
        process_structure_shard,
        tokenize_structure_shard,
    )

    out = data_dir / "structures" / "pdb-00000.parquet"
    raw = data_dir / "structures_raw" / "pdb-00000.parquet"
    if out.exists():
        return out
    files = []
    for pat in STRUCTURE_FILES:
        try:
            files.append(mda_file(pat))
        except BaseException:  # noqa: BLE001 - pytest.skip for one missing file: use the rest
            continue
    cfg = StructureStageConfig(
        dataset="pdb",
        pdb=PDBFilter(deposited_before="2100-01-01", max_resolution=100.0),
    )
    process_structure_shard(files, raw, cfg)
    # structure tokens: a small k-means codebook learnt on these chains (the tokens stage)
    book = data_dir / "structures_raw" / "codebook.npz"
    fit_structure_codebook([raw], book, codebook_size=32, iterations=5)
    tokenize_structure_shard(raw, out, book)
    return out


def validation_set(data_dir: Path, per_dataset: int = 12) -> list[Path]:
    """Validation sets as the purge writes them (id, dataset, sequence, ...): real UniProt
    records not in `sequence_shard`'s, dealt round-robin to uniref, mgnify and jgi, over two
    files (each dataset in both)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from esm3.data.fasta import ingest_fasta

    full = data_dir / "ingest" / "uniprot_full.parquet"
    outs = [data_dir / "validation" / f"validation-{i}.parquet" for i in (0, 1)]
    if all(o.exists() for o in outs):
        return outs
    if not full.exists():
        ingest_fasta(uniprot_fasta(), full, dataset="uniprot")
    t = pq.read_table(full)
    t = t.filter(pc.less_equal(t.column("length"), 120)).slice(1000, 3 * per_dataset)
    names = ["uniref", "mgnify", "jgi"]
    t = t.set_column(
        t.column_names.index("dataset"),
        "dataset",
        pa.array([names[i % 3] for i in range(t.num_rows)]),
    )
    outs[0].parent.mkdir(parents=True, exist_ok=True)
    half = t.num_rows // 2
    pq.write_table(t.slice(0, half), outs[0])
    pq.write_table(t.slice(half), outs[1])
    return outs
