"""vlmtune: fine-tune Qwen2-VL, Qwen2.5-VL and Qwen3-VL on your own images and videos."""

__version__ = "0.1.0"
