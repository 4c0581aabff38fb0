"""Function token tables for tests: built once per session by the suite's builder from
the small InterPro files of tests/test_function_tokens.py (real entry ids and names)."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

from esm3.data.function_keywords import build_function_tokenizer
from tests.test_function_tokens import ENTRY_LIST, GO_TERMS, INTERPRO2GO, _obo


@cache
def function_tables() -> str:
    """The folder of the four tables (what `tasks.function_files` names)."""
    root = Path(tempfile.mkdtemp(prefix="function-tables-"))
    (root / "entry.list").write_text(ENTRY_LIST)
    (root / "interpro2go").write_text(INTERPRO2GO)
    (root / "go-basic.obo").write_text(_obo(GO_TERMS))
    tok = build_function_tokenizer(
        root / "entry.list", root / "interpro2go", root / "go-basic.obo", seed=3
    )
    tok.write(root / "function-tokens")
    return str(root / "function-tokens")
