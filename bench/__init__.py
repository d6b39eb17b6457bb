"""Benchmarks: baselines that hetrain is measured against."""
