"""Benchmarks that print figures and write JSON (see docs and README)."""
