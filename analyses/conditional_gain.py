"""Figures: how much of the source the model uses (shuffled-source NLL - true-source NLL) as blocks are
reverted, and the share of its rise that remains: where the source-dependent part of the gain lives."""
from _common import publish, study_dir, table

from cogprobe.core.intervals import sweep_intervals
from cogprobe.plots.sweeps import conditional_gain_curves, gain_rows, specialization_curves

study = study_dir()
sweeps = table(study, "sweeps.parquet")
revert = sweeps[(sweeps["mode"] == "revert") & ~sweeps["ends"]]
publish(conditional_gain_curves(revert), revert, "conditional_gain")
view = sweep_intervals(gain_rows(revert, "revert", False, "conditional"))
publish(specialization_curves(revert, gain="conditional"), view, "specialization_curves_conditional")
