"""The study: `StudyConfig` and its presets, the comparison rows, the learning-rate choice, the
pipeline that runs train, probe, select and compare in order, verdicts, report and figures.
Imports every stage below it."""
