"""The trainer's reader of the exchange store, and the store at an fsspec URL."""
