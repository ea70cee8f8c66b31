"""Figure: how much of the source the model uses (shuffled-source NLL - true-source NLL) as blocks are reverted."""
from _common import publish, study_dir, table

from cogprobe.plots.sweeps import conditional_gain_curves

study = study_dir()
sweeps = table(study, "sweeps.parquet")
revert = sweeps[(sweeps["mode"] == "revert") & ~sweeps["ends"]]
publish(conditional_gain_curves(revert), revert, "conditional_gain")
