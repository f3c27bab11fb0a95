"""nestpatch.converters: fold patches into safetensors and GGUF, export LoRA, revert."""
