"""WaveFT for ComfyUI: importing this package (ComfyUI does, from `custom_nodes/`) lets the stock "Load LoRA"
node and `comfy.sd.load_lora_for_models` read WaveFT's own adapter files, and adds a "Load WaveFT" node.
Needs nothing beyond ComfyUI (torch only)."""
from .load_node import LoadWaveFT
from .waveft_adapter import register

register()

NODE_CLASS_MAPPINGS = {"LoadWaveFT": LoadWaveFT}
NODE_DISPLAY_NAME_MAPPINGS = {"LoadWaveFT": "Load WaveFT"}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
