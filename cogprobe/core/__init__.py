"""The ground floor: atomic writes and checked reads, artifact kinds and file names, config knobs,
processes and progress, intervals, and the hub. Imports nothing else of cogprobe."""
