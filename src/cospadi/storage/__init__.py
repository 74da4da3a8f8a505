"""Checkpoint I/O: save and load compressed folders (safetensors + config.json with a
cospadi quantization_config), the transformers quantizer plugin, shared-factor tying,
folder checks, the human-readable report and dense export."""
