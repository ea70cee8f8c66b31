"""Figure: share of the gain retained against k blocks reverted from each end, one line per checkpoint,
with 95% paired-bootstrap bands over the pairs."""
from _common import publish, study_dir, table

from cogprobe.plots.sweeps import specialization_curves

study = study_dir()
sweeps = table(study, "sweeps.parquet")
revert = sweeps[(sweeps["mode"] == "revert") & ~sweeps["ends"]]
publish(specialization_curves(revert), revert, "specialization_curves")
