"""Prefect flows and the run-level plumbing around them (checkpoints, resume)."""
