"""Structure data: readers, quality filters, SASA, SS8 and the shard stages.

Modules: `io` (PDB/mmCIF/BinaryCIF -> chains), `filters` (PDB/AFDB/ESMAtlas), `geometry`,
`sasa`, `ss8` (mkdssp), `records` (the shard schema and writer), `stages` (one function
per array task and shard).
"""
