"""Figure: gain retained after reverting k blocks from each end, per checkpoint (layer x checkpoint)."""
from _common import publish, study_dir, table

from cogprobe.plots import specialization_heatmaps

study = study_dir()
sweeps = table(study, "sweeps.parquet")
revert = sweeps[(sweeps["mode"] == "revert") & ~sweeps["ends"]]
publish(specialization_heatmaps(revert, value="gain_retained"), revert, "specialization_heatmaps")
