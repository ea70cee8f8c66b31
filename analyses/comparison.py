"""Table and figure: every tuning row against full fine-tuning (shares of the gain with 95% bootstrap
intervals, cost)."""
from _common import publish, study_dir, table

from cogprobe.study.figures import comparison_bars
from cogprobe.study.verdicts import comparison_table

study = study_dir()
compare = table(study, "compare.parquet")
bars = comparison_table(table(study, "scores.parquet"), list(compare[["row", "seed"]].itertuples(
    index=False, name=None)))
publish(comparison_bars(compare, intervals=bars), compare, "comparison")
