"""Probing checkpoints: the sweep engines, taylor estimates, activation capture and its backends,
alignment, and the table protocol the folder verbs share. Imports `core` to `tuning`."""
