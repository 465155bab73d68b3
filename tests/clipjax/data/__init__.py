"""Deterministic test data generators (no stored data files)."""
