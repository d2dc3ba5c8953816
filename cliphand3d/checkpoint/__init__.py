"""Checkpoints: reading and writing them (io), what they hold (state), weights into modules (weights)."""
