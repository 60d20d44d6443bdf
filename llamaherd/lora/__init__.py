"""LoRA adapters over the built model: the LoRALinear swap (float and packed GGUF bases) and the PEFT folder format.

Below `api` so that `llamaherd.load(source, adapter=DIR)` can apply an adapter; `llamaherd.train` trains them.
"""

from .layer import (LoRAConfig, LoRALinear, adapters_disabled, apply_lora, lora_modules, lora_state, merge_lora,
                    set_enabled, trainable_parameters)
from .peft import hf_module_name, load_adapter, read_adapter, save_adapter

__all__ = ["LoRAConfig", "LoRALinear", "adapters_disabled", "apply_lora", "hf_module_name", "load_adapter",
           "lora_modules", "lora_state", "merge_lora", "read_adapter", "save_adapter", "set_enabled",
           "trainable_parameters"]
