"""The function token tables and residue-annotation vocabulary of a training run, read from
the file preprocessing wrote (`data.vocabulary`, named in the preprocessing manifest as
`vocabulary`). The task config gets them from it, and the model its track sizes from the
task config (`TaskConfig.track_sizes`), so data, tokenizer and model agree.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from esm3.tokenize.annotations import read_vocabulary
from esm3.tokenize.function_tokens import FunctionFiles
from jobs.config import ConfigError


def vocabulary_path(cfg: Any, data_root: str | Path) -> Path | None:
    """The config's vocabulary file (relative paths under the data root), None if unset."""
    name = cfg.data.vocabulary
    if not name:
        return None
    p = Path(name)
    return p if p.is_absolute() else Path(data_root) / p


def with_vocabulary(cfg: Any, data_root: str | Path) -> Any:
    """`cfg` with tasks.function_files / residue_labels / residue_aliases from its vocabulary
    file (unchanged when `data.vocabulary` is unset). tasks.function_files is the folder of the
    four function token tables (`FunctionFiles.in_folder` reads it; "" when preprocessing
    made none); a folder of esm's own files may be given there directly instead. ConfigError,
    one line naming the key and the file, when the file is missing or unreadable, or when
    the config also gives values that differ from the file's."""
    path = vocabulary_path(cfg, data_root)
    if path is None:
        return cfg
    try:
        vocab = read_vocabulary(path)
    except ValueError as e:
        raise ConfigError(f"config key 'data.vocabulary': {e}") from e
    folder = _function_folder(vocab.function_files, path)
    t = cfg.tasks
    if t.function_files and Path(t.function_files).resolve() != Path(folder).resolve():
        raise ConfigError(f"config key 'tasks.function_files': {t.function_files} differs from "
                          f"the tables of data.vocabulary ({path}): {folder or 'none'}; give one of them")  # fmt: skip
    for key, given, read in (
        ("residue_labels", tuple(t.residue_labels), vocab.residue_labels),
        ("residue_aliases", tuple(map(tuple, t.residue_aliases)), vocab.residue_aliases),
    ):
        if given and given != read:
            what = key.removeprefix("residue_")
            raise ConfigError(f"config key 'tasks.{key}': {len(given)} {what} given that differ "
                              f"from the {len(read)} of data.vocabulary ({path}); give one of them")  # fmt: skip
    labels, aliases = vocab.residue_labels, vocab.residue_aliases
    return replace(cfg, tasks=replace(t, function_files=folder, residue_labels=labels,
                                      residue_aliases=aliases))  # fmt: skip


def _function_folder(files: FunctionFiles | None, path: Path) -> str:
    """The one folder holding the vocabulary's four function tables ("" for none)."""
    if files is None:
        return ""
    folder = files.keywords.parent
    if FunctionFiles.in_folder(folder) != files:
        raise ConfigError(f"config key 'data.vocabulary': {path}: the function token tables "
                          f"must be the four files of one folder ({folder})")  # fmt: skip
    return str(folder)
