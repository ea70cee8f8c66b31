"""Tuning: `TrainConfig`, the training loop and its text packing, strategies, checkpoints, resume,
run folders, health, plateau and dev curve. Named `tuning`, not `train`: `cogprobe.train` is the
function. Imports `core`, `models` and `data`."""
