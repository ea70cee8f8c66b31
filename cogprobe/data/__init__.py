"""Data: parallel corpora and their sources, the perception and production tasks with their
controls, evaluation sets, translation and chrF. Imports `core` and `models`."""
