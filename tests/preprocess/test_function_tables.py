"""The vocabulary stage's function token tables: built from an entry.list, or esm's files
copied as they are; the config keys that choose them, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from esm3.data.function_keywords import build_function_tokenizer
from esm3.tokenize.annotations import read_vocabulary
from esm3.tokenize.function_tokens import FunctionFiles, FunctionTokenizer
from jobs.config import ConfigError
from jobs.stages.config import InterproConfig, function_source
from jobs.stages.structures import vocabulary_task

ENTRY_LIST = """ENTRY_AC\tENTRY_TYPE\tENTRY_NAME
IPR000001\tDomain\tKringle
IPR000719\tDomain\tProtein kinase domain
IPR011009\tHomologous_superfamily\tProtein kinase-like domain superfamily
IPR017441\tBinding_site\tProtein kinase, ATP binding site
"""
ESM_NAMES = ("keyword_vocabulary_safety_filtered_58641.txt",
             "keyword_idf_safety_filtered_58641.npy", "interpro_29026_to_keywords_58641.csv",
             "hyperplanes_8bit_58641.npz")  # fmt: skip
PROTEIN = [("IPR000719", 3, 40), ("IPR017441", 10, 20), ("IPR011009", 1, 45)]


def _vocabulary(root: Path, source: dict[str, str], seed: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    vocabulary_task(str(root), "t", [], str(root / "terms.parquet"), [],
                    str(root / "vocabulary.json"), 1, "test", source, 1, seed)  # fmt: skip
    return read_vocabulary(root / "vocabulary.json")


def test_tables_built_from_an_entry_list(tmp_path):
    (tmp_path / "entry.list").write_text(ENTRY_LIST)
    vocab = _vocabulary(tmp_path / "data", {"entry_list": str(tmp_path / "entry.list")}, seed=7)
    doc = json.loads((tmp_path / "data" / "vocabulary.json").read_text())
    assert doc["function_files"] == {"keywords": "function-tokens/keywords.txt",
                                     "idf": "function-tokens/idf.npy",
                                     "interpro2keywords": "function-tokens/interpro2keywords.csv",
                                     "hyperplanes": "function-tokens/hyperplanes.npz"}  # fmt: skip
    built = build_function_tokenizer(tmp_path / "entry.list", seed=7)
    np.testing.assert_array_equal(FunctionTokenizer.from_files(vocab.function_files).encode(PROTEIN, 50),
                                  built.encode(PROTEIN, 50))  # fmt: skip
    assert _vocabulary(tmp_path / "none", {}).function_files is None


def test_esm_files_copied_as_they_are(tmp_path):
    (tmp_path / "entry.list").write_text(ENTRY_LIST)
    given = build_function_tokenizer(tmp_path / "entry.list", seed=1).write(tmp_path / "ours")
    esm_dir = tmp_path / "esm"
    esm_dir.mkdir()
    for src, name in zip(vars(given).values(), ESM_NAMES, strict=True):
        (esm_dir / name).write_bytes(src.read_bytes())
    folder = function_source(InterproConfig(function_files=str(esm_dir)), tmp_path)
    vocab = _vocabulary(tmp_path / "data", folder)
    for ours, name in zip(vars(vocab.function_files).values(), ESM_NAMES, strict=True):
        assert ours.parent == tmp_path / "data" / "function-tokens"
        assert ours.read_bytes() == (esm_dir / name).read_bytes()


def test_function_table_keys_and_their_errors(tmp_path):
    (tmp_path / "entry.list").write_text(ENTRY_LIST)
    for keys, message in (
        ({"function_files": "x", "entry_list": "e"}, "function_files and interpro.entry_list both set"),
        ({"interpro2go": "i"}, "interpro.interpro2go needs interpro.entry_list"),
        ({"entry_list": "e", "go_obo": "g"}, "interpro.go_obo needs interpro.interpro2go"),
        ({"min_keyword_entries": 0}, "interpro.min_keyword_entries 0 must be >= 1"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            InterproConfig(**keys).validate()
    with pytest.raises(ConfigError, match=r"interpro.function_files: function token folder .* needs one keywords.txt or keyword_vocabulary\*.txt, found none"):  # fmt: skip
        function_source(InterproConfig(function_files=str(tmp_path)), tmp_path)
    with pytest.raises(ConfigError, match=r"interpro.entry_list: input 'nope.list'"):
        function_source(InterproConfig(entry_list="nope.list"), tmp_path)
    found = function_source(InterproConfig(entry_list="{workspace}/entry.list"), tmp_path)
    assert found == {"entry_list": str((tmp_path / "entry.list").resolve())}
    assert FunctionFiles.__dataclass_fields__.keys() == {"keywords", "idf", "interpro2keywords",
                                                         "hyperplanes"}  # fmt: skip
