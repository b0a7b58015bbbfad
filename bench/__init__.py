"""Benchmarks (not tests): `python bench/branching.py`, then `python bench/report.py`."""
