"""Benchmarks of gradwatch (run from the repository root: `python -m benchmarks.overhead`)."""
