"""Fault and hostile-input harnesses: test infrastructure, run from a clone, not shipped."""
