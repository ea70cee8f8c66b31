"""Table: each comparison row's test NLL, share of full fine-tuning's gain and relative deviation, with
95% paired-bootstrap intervals over the test pairs (figures/comparison_intervals.csv)."""
from _common import FIGURES, study_dir, table

from cogprobe import io
from cogprobe.verdicts import comparison_table

study = study_dir()
compare = table(study, "compare.parquet")
scores = table(study, "scores.parquet")
rows = comparison_table(scores, list(compare[["strategy", "seed"]].itertuples(index=False, name=None)))
io.write_text(FIGURES / "comparison_intervals.csv", rows.to_csv(index=False))
print(FIGURES / "comparison_intervals.csv")
