"""The "Load WaveFT" node: the stock "Load LoRA" path (model only) with a check that the file is a WaveFT file."""
import comfy.sd
import comfy.utils
import folder_paths

from .waveft_native import is_native_file


class LoadWaveFT:
    DESCRIPTION = ("Applies a WaveFT adapter (a file from `python -m waveft.export --format waveft`, in "
                   "models/loras) to the diffusion model. The stock Load LoRA node reads the same files.")
    CATEGORY = "loaders"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The diffusion model with the WaveFT adapter applied.",)
    FUNCTION = "load_waveft"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the adapter was trained on (SDXL)."}),
            "waveft_name": (folder_paths.get_filename_list("loras"), {"tooltip": "The WaveFT file."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "Multiplies the adapter's weight difference."}),
        }}

    def load_waveft(self, model, waveft_name, strength_model):
        path = folder_paths.get_full_path_or_raise("loras", waveft_name)
        tensors = comfy.utils.load_torch_file(path, safe_load=True)
        if not is_native_file(tensors):
            raise ValueError(f"{waveft_name} is not a WaveFT file (no waveft.format_version): use Load LoRA")
        model, _ = comfy.sd.load_lora_for_models(model, None, tensors, strength_model, 0)
        return (model,)
