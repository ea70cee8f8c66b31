"""cogprobe: where does a language model learn to perceive and produce a new language?

Offline by design: the hub variables are set before transformers is imported.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cogprobe.errors import CogprobeError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CogprobeError", "__version__"]
