"""vlmtune: fine-tune Qwen2-VL, Qwen2.5-VL and Qwen3-VL on your own images and videos."""

import os
from pathlib import Path

__version__ = "0.1.0"


def cache_root() -> Path:
    """Where vlmtune keeps what it builds or fetches (tiny models, downloaded media): ``$VLMTUNE_CACHE``."""
    return Path(os.environ.get("VLMTUNE_CACHE", Path.home() / ".cache" / "vlmtune"))
