"""Table and figure: every tuning row against full fine-tuning (shares of the gain, cost)."""
from _common import publish, study_dir, table

from cogprobe.plots import comparison_bars

study = study_dir()
compare = table(study, "compare.parquet")
publish(comparison_bars(compare), compare, "comparison")
