"""Ciphertext and plaintext layers, their circuits, slot layouts and the planner."""
