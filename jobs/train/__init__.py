"""`esm3 train`: the multi-node FSDP training job on submitit (SLURM or local).

One module per job: `config` (loading and every check before submission), `job` (what
each rank runs, with its lifecycle records and preemption handling), `submit` (recording
the run and submitting it; the demo's run), `generate` (inverse-folding generation as an
array job), `cli` (the `esm3 train` subcommand). The training itself is
`esm3.train.trainer`.
"""
