"""Compressed drop-in linear modules: the CompressedLinear interface (base.py) and its
kinds, DictLinear and LowRankLinear (linear.py), with the compact storage of S (packed
bitmask, 14-bit values) and their forward kernels."""
from .base import MODULE_KINDS, CompressedLinear, check_spec, compressed_modules
from .linear import DictLinear, LowRankLinear, forward_path

__all__ = ["CompressedLinear", "DictLinear", "LowRankLinear", "MODULE_KINDS", "check_spec", "compressed_modules",
           "forward_path"]
