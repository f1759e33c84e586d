"""The "Load WaveFT" node: the stock "Load LoRA" path with a check that the file is a WaveFT file. The CLIP is
optional: given one, the file's text-encoder layers (`lora_te1_`, `lora_te2_`) are applied to it at
`strength_clip`, as "Load LoRA" does; without one, the model alone."""
import comfy.sd
import comfy.utils
import folder_paths

from .waveft_native import is_native_file


class LoadWaveFT:
    DESCRIPTION = ("Applies a WaveFT adapter (a file from `python -m waveft.export --format waveft`, in "
                   "models/loras) to the diffusion model and, when connected, to the CLIP (the text encoders' "
                   "part of the file). The stock Load LoRA node reads the same files.")
    CATEGORY = "loaders"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The diffusion model with the WaveFT adapter applied.",
                       "The CLIP with the adapter's text-encoder layers applied (none if no CLIP was connected).")
    FUNCTION = "load_waveft"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the adapter was trained on (SDXL)."}),
                "waveft_name": (folder_paths.get_filename_list("loras"), {"tooltip": "The WaveFT file."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "Multiplies the adapter's weight difference."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint, for adapters that adapted the "
                                             "text encoders."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                            "tooltip": "Multiplies the text encoders' weight difference."}),
            },
        }

    def load_waveft(self, model, waveft_name, strength_model, clip=None, strength_clip=1.0):
        path = folder_paths.get_full_path_or_raise("loras", waveft_name)
        tensors = comfy.utils.load_torch_file(path, safe_load=True)
        if not is_native_file(tensors):
            raise ValueError(f"{waveft_name} is not a WaveFT file (no waveft.format_version): use Load LoRA")
        return comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)
