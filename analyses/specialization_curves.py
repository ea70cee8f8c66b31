"""Figure: NLL against k blocks reverted from each end, one line per checkpoint."""
from _common import publish, study_dir, table

from cogprobe.plots import specialization_curves

study = study_dir()
sweeps = table(study, "sweeps.parquet")
revert = sweeps[(sweeps["mode"] == "revert") & ~sweeps["ends"]]
publish(specialization_curves(revert, y="nll"), revert, "specialization_curves")
