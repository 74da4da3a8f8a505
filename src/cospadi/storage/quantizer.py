"""Plain transformers loading of cospadi folders, through transformers' quantizer plugin
mechanism (register_quantization_config / register_quantizer, HfQuantizer).

After `import cospadi`, `AutoModelForCausalLM.from_pretrained(folder)` finds the
"cospadi" quantizer: as soon as it sees the folder it checks the index and that every
shard it names is there (transformers would otherwise fail with a bare JSON or key
error); before the weights are read it checks the safetensors headers against config.json
and the index, and the files against the sha256 that cospadi.json beside them recorded
(when it records any), and swaps every listed nn.Linear for the compressed module its entry
describes (on the meta device, at the model's dtype); the weights then load by name into
those modules; afterwards every compressed module prepares itself (checks its mask,
turns it into ELL row indices and drops it, see layers/linear.py), before the memory
layout is fixed (memory.py)."""
from __future__ import annotations

from pathlib import Path

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from ..layers.base import compressed_modules
from .config import QUANT_METHOD, CospadiConfig, replace_modules
from .folder_checks import (
    INDEX,
    SINGLE,
    check_index,
    check_module_tensors,
    check_safetensors,
    verify_checksums,
    weight_files,
)
from .memory import realign, release_weight_files, trim_heap
from .sharing import tie_shared


class CospadiHfQuantizer(HfQuantizer):
    """Rebuilds the compressed modules of a pre-compressed cospadi folder; it cannot
    compress on the fly (that needs calibration: use `cospadi compress`)."""

    requires_calibration = True
    quantization_config: CospadiConfig

    def update_attn_implementation(self, config):
        """The first hook that sees the folder (config.name_or_path, set by the Auto
        classes), before transformers reads its index: check the index and its shards
        (weight_files). A folder with a single model.safetensors, or no index, is left to
        the checks below."""
        folder = Path(config.name_or_path or "")
        if config.name_or_path and (folder / INDEX).is_file() and not (folder / SINGLE).is_file():
            weight_files(folder)
        return super().update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, **kwargs):
        files = [Path(f) for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
        if files:
            headers = [check_safetensors(f) for f in files]
            verify_checksums(files)
            check_index(files[0].parent, {f.name: header for f, header in zip(files, headers)})
            check_module_tensors(self.quantization_config.to_dict(), headers)
        replace_modules(model, self.quantization_config.modules, model.dtype, self.quantization_config.coef_bits)
        tie_shared(model, {name: spec["shares"] for name, spec in self.quantization_config.modules.items()
                           if spec.get("shares")})
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for _, module in compressed_modules(model):  # ELL form first: mask and packed values are dropped
            module.prepare()
        realign(model)
        release_weight_files(model)
        trim_heap()  # the conversion's freed temporaries
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make "cospadi" known to transformers (idempotent; runs on `import cospadi`)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(CospadiConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(CospadiHfQuantizer)


register()
