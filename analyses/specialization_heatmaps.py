"""Figure: the share of the gain kept after reverting k blocks from each end, per checkpoint (k x checkpoint)."""
from _common import publish, study_dir, table

from cogprobe.plots.sweeps import specialization_heatmaps

study = study_dir()
sweeps = table(study, "sweeps.parquet")
revert = sweeps[(sweeps["mode"] == "revert") & ~sweeps["ends"]]
publish(specialization_heatmaps(revert, value="share"), revert, "specialization_heatmaps")
