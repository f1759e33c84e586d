"""An SDXL pipeline from a Hub id or folder, with an adapter merged into its UNet (attached, on a quantized base)
and its text encoders' adapters (the adapter folder's text_encoder/, text_encoder_2/) merged into its CLIP
encoders, and its scheduler by name."""
import contextlib
from typing import Optional

import torch

from waveft.errors import UserError
from waveft.hub import check_model_source
from waveft.infer.settings import SCHEDULERS
from waveft.io.adapter_folder import AdapterFolder
from waveft.models import DTYPES, is_quantized, quantize_linear_layers


def set_scheduler(pipe, name: str) -> None:
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})")
    class_name, kwargs = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **kwargs)


def attach_saved_adapter(unet, adapter_dir: str):
    """Load a PEFT adapter folder onto `unet`, unmerged: the PeftModel, whose base model is `unet` with the
    adapter's layers in place."""
    from peft import PeftModel

    from waveft.adapters.structured_waveft import enable_structured_waveft
    from waveft.adapters.waveft_locations import shared_waveft_locations

    with shared_waveft_locations():
        peft_model = PeftModel.from_pretrained(unet, adapter_dir)
    # Our WaveFT layer also runs (and merges) wavelets that stock PEFT's layer cannot run.
    enable_structured_waveft(peft_model)
    return peft_model


def merge_adapter(model, adapter_dir: str):
    """Load a PEFT adapter folder onto `model` (the UNet, a text encoder) and merge it into the weights: no
    inference cost remains. A quantized base (model.quantize) is refused: its weights are packed, and merging would
    re-quantize them."""
    if is_quantized(model):
        raise UserError(
            f"cannot merge the adapter {adapter_dir} into a quantized base (its Linear weights are packed by "
            f"bitsandbytes): merge onto the unquantized base (quantize none), or keep the adapter attached"
        )
    return attach_saved_adapter(model, adapter_dir).merge_and_unload()


def merge_text_encoder_adapters(pipe, adapter: AdapterFolder) -> None:
    """Merge each text encoder's adapter of `adapter` (none for a UNet-only adapter) into the pipeline's encoder of
    that name. `model.quantize` quantizes the UNet only, so the encoders always take the merge. Cost: one layer's
    difference at a time, in place."""
    for component, folder in adapter.text_encoder_adapters().items():
        setattr(pipe, component, merge_adapter(getattr(pipe, component), folder.root))


@contextlib.contextmanager
def _base_model_errors(base_model: str):
    try:
        yield
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load the base model {base_model!r}: {str(exc).splitlines()[0]}") from None


def load_pipeline(
    base_model: str,
    adapter_dir: Optional[str] = None,
    vae: Optional[str] = None,
    dtype: str = "fp32",
    device: Optional[str] = None,
    scheduler: str = "dpmpp_2m",
    quantize: str = "none",
):
    """A StableDiffusionXLPipeline from a Hub id or folder, with the adapter (if any) merged, its text encoders'
    adapters too; with `quantize` (int8, nf4) the UNet's Linear layers are quantized and its adapter stays
    attached, unmerged (the text encoders are not quantized: theirs are merged)."""
    check_model_source(base_model, "the base model")
    if vae is not None:
        check_model_source(vae, "the VAE")
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    if adapter_dir is not None and not AdapterFolder(adapter_dir).is_adapter():
        raise UserError(f"no {AdapterFolder.CONFIG} in adapter folder {adapter_dir}")
    if adapter_dir is not None:
        for folder in (AdapterFolder(adapter_dir), *AdapterFolder(adapter_dir).text_encoder_adapters().values()):
            folder.check_weights()
    torch_dtype = DTYPES[dtype]
    # The UNet first, alone: its checkpoint's pages (mapped while it converts to `dtype`) are released before the
    # text encoders load, so the peak is the UNet's own. Full-size SDXL in fp32 on CPU: 14.8 GB peak RSS, against
    # 14.8-18.2 GB (varying run to run) with the pipeline loading every component itself.
    with _base_model_errors(base_model):
        unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", dtype=torch_dtype)
    if quantize != "none":
        quantize_linear_layers(unet, quantize, torch_dtype)
    if adapter_dir is not None:
        unet = attach_saved_adapter(unet, adapter_dir).get_base_model() if is_quantized(unet) else \
            merge_adapter(unet, adapter_dir)
    with _base_model_errors(base_model):
        kwargs = {"unet": unet, "dtype": torch_dtype}
        if vae is not None:
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae, dtype=torch_dtype)
        pipe = StableDiffusionXLPipeline.from_pretrained(base_model, **kwargs)
    if adapter_dir is not None:  # the encoders came with the pipeline, after the UNet: merged in place
        merge_text_encoder_adapters(pipe, AdapterFolder(adapter_dir))
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)
