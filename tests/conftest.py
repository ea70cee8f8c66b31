import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# Tiny models are overhead-bound: one thread is faster, and it keeps parallel
# test runs from oversubscribing the cores (2 OpenMP threads per process spin
# against each other on a loaded 2-core machine: 10x slower, measured).
torch.set_num_threads(1)
