"""Measurement tools behind `qwenstack bench ...` (importable, no global state)."""
