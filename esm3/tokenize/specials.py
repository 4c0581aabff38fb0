"""Special tokens shared by every categorical track.

Every track's vocabulary starts with the same five specials at the same ids, so a
corruption routine can write `MASK` into any track without looking up a vocabulary.
Real values of a track follow from `N_SPECIAL` on.
"""

from __future__ import annotations

PAD = 0  # batch padding: never attended as content, never in a loss
MASK = 1  # "not given": a corrupted position, a dropped track, or a track absent in the data
BOS = 2  # start of the sample
EOS = 3  # end of the sample
CHAINBREAK = 4  # the gap between two chains (the paper's "|" / "-" chainbreak token)
N_SPECIAL = 5

SPECIAL_NAMES: tuple[str, ...] = ("<pad>", "<mask>", "<bos>", "<eos>", "<chainbreak>")
