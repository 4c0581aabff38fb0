"""Preprocessing pipelines as stage graphs of submitit arrays.

- `config`: the typed preprocessing config and the check of its inputs.
- `runner`: the stage graph runner (SLURM: every stage submitted at once with afterok
  dependencies; local: stage after stage), the data layout, reject and stat recording.
- `sequences`: ingest -> cluster -> expand -> validation -> purge -> stats.
- `structures`: (derive) -> structures -> codebook -> tokenize -> cluster -> expand -> stats,
  and the InterPro ingest.

The functions that run as jobs are module-level here (the job process imports them); the
work itself is done by `esm3.data`.
"""
