"""ESM3 training system: pure, importable library (no cluster, no filesystem layout)."""

__version__ = "0.1.0"
