"""Figures drawn from the tables: style, sweep and alignment figures, and a probe run's figures.
Imports `core` to `selection`; never the study."""
