"""Table: each comparison row's test NLL, share of full fine-tuning's gain, relative deviation and
conditional gain (the base model's too) and chrF, with 95% paired-bootstrap intervals over the test pairs
(figures/comparison_intervals.csv)."""
from _common import FIGURES, study_dir, table

from cogprobe.core import io
import pandas as pd

from cogprobe.data.translate import chrf_intervals
from cogprobe.study.verdicts import comparison_table, conditional_gain_table

study = study_dir()
compare = table(study, "compare.parquet")
scores = table(study, "scores.parquet")
rows = comparison_table(scores, list(compare[["row", "seed"]].itertuples(index=False, name=None)))
by_arm = pd.concat([conditional_gain_table(scores),
                    chrf_intervals(table(study, "translations.parquet"), full=f"full-s{compare['seed'].min()}")])
by_arm[["row", "seed"]] = by_arm["arm"].str.rsplit("-s", n=1, expand=True).reindex(columns=[0, 1]).to_numpy()
rows = pd.concat([rows, by_arm.drop(columns="arm")], ignore_index=True)
io.write_text(FIGURES / "comparison_intervals.csv", rows.to_csv(index=False))
print(FIGURES / "comparison_intervals.csv")
