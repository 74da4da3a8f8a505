"""Compressed drop-in linear modules (DictLinear, LowRankLinear), the compact storage of
S (packed bitmask, 14-bit values) and their forward kernels."""
from .linear import DictLinear, LowRankLinear, forward_path

__all__ = ["DictLinear", "LowRankLinear", "forward_path"]
