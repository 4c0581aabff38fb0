"""Vocabularies, one per track.

Every categorical track shares the specials of `esm3.tokenize.specials` at ids 0..4
(pad, mask, bos, eos, chainbreak); real values follow. Modules: `sequence`, `structure_tokens`
(vocabulary of the structure-token track), `ss8`, `sasa`, `function_tokens` (ESM3's
function tokens: keywords, TF-IDF and LSH with esm's ids; their own 260-id vocabulary),
`annotations` (residue annotations and the vocabulary file), `coordinates` (backbone track), and `tracks` (the set of sizes a model
is built for).
"""
