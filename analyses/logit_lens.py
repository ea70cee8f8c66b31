"""Figure: logit-lens NLL of each block's output, per checkpoint (block x checkpoint)."""
from _common import publish, study_dir, table

from cogprobe.plots.runs import logit_lens_heatmap

study = study_dir()
acts = table(study, "activations.parquet")
lens = acts[acts["stat"] == "logit_lens_nll"]
publish(logit_lens_heatmap(lens), lens, "logit_lens")
