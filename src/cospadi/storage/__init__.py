"""Checkpoint I/O: saving and loading compressed folders (checkpoint.py: safetensors plus a
config.json whose cospadi quantization_config is config.py's schema), the transformers
quantizer plugin (quantizer.py), shared-factor tying (sharing.py), folder checks, memory
layout after loading (memory.py), the human-readable report and dense export."""
