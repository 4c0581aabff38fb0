"""The function and residue-annotation vocabularies of a training run, read from the file
preprocessing wrote (`data.vocabulary`, named in the preprocessing manifest as
`vocabulary`). The task config gets its label lists from it, and the model its track sizes
from the task config (`TaskConfig.track_sizes`), so data, tokenizer and model agree.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from esm3.tokenize.annotations import read_vocabulary
from jobs.config import ConfigError


def vocabulary_path(cfg: Any, data_root: str | Path) -> Path | None:
    """The config's vocabulary file (relative paths under the data root), None if unset."""
    name = cfg.data.vocabulary
    if not name:
        return None
    p = Path(name)
    return p if p.is_absolute() else Path(data_root) / p


def with_vocabulary(cfg: Any, data_root: str | Path) -> Any:
    """`cfg` with tasks.function_labels / tasks.residue_labels from its vocabulary file
    (unchanged when `data.vocabulary` is unset). ConfigError, one line naming the key and
    the file, when the file is missing or unreadable, or when the config also lists labels
    that differ from the file's."""
    path = vocabulary_path(cfg, data_root)
    if path is None:
        return cfg
    try:
        function, residue = read_vocabulary(path)
    except ValueError as e:
        raise ConfigError(f"config key 'data.vocabulary': {e}") from e
    t = cfg.tasks
    for key, given, read in (("function_labels", t.function_labels, function),
                             ("residue_labels", t.residue_labels, residue)):  # fmt: skip
        if given and tuple(given) != read:
            raise ConfigError(f"config key 'tasks.{key}': {len(given)} labels given that differ "
                              f"from the {len(read)} of data.vocabulary ({path}); give one of them")  # fmt: skip
    return replace(cfg, tasks=replace(t, function_labels=function, residue_labels=residue))
