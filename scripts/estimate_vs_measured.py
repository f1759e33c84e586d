"""The memory estimate of configs/sdxl_waveft_paper.yaml against the same training step measured on the device.

    python3 scripts/estimate_vs_measured.py --model DIR [--out FILE] [-- key.sub=value ...]

For a bf16, int8 and nf4 base, and the bf16 base with the text encoders trained too:
`waveft.train.memory_estimate.estimate_step_memory` (meta tensors, no weights)
and the step it models run for real on the model in DIR (a diffusers folder, e.g. `python3 -m waveft.tiny DIR
--size full`): the UNet loaded and quantized as the trainer does, the run's adapter, two steps, the second
measured (CUDA: torch.cuda.max_memory_allocated; CPU: the frozen and adapter tensors plus the storages the two
steps allocate at their peak, `LiveStorage`). Prints and writes a Markdown table with the ratio.
"""
import argparse
import os
import sys

import torch

from waveft.adapters.attach import attach_adapter
from waveft.config import load_config
from waveft.models import DTYPES, quantize_linear_layers
from waveft.train.memory_estimate import GIB, LiveStorage, accelerator_semantics, estimate_step_memory, training_step
from waveft.train.optimizer import build_optimizer

PAPER_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                            "sdxl_waveft_paper.yaml")


def measured_step_bytes(cfg, model: str, device: torch.device) -> int:
    """Peak memory of the run's second training step on `device`, its weights included (with
    adapter.text_encoders, both encoders' too, adapted and run in the step)."""
    from diffusers import UNet2DConditionModel

    from waveft.adapters.attach import attach_text_encoder_adapter
    from waveft.models import TEXT_ENCODER_CLASSES, text_encoder_class

    dtype = DTYPES[cfg.train.mixed_precision]
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dtype).requires_grad_(False)
    if cfg.model.quantize != "none":
        quantize_linear_layers(unet, cfg.model.quantize, dtype)
    unet.to(device)
    attach_adapter(unet, cfg.resolved_adapter)
    encoders = []
    if cfg.adapter.text_encoders.enabled:
        for component in TEXT_ENCODER_CLASSES:
            encoder = text_encoder_class(component).from_pretrained(model, subfolder=component, dtype=dtype)
            attach_text_encoder_adapter(encoder.requires_grad_(False).to(device), component,
                                        cfg.text_encoder_adapter())
            encoders.append(encoder.train())
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    models = [unet, *encoders]
    optimizer = build_optimizer(cfg, [p for m in models for p in m.parameters() if p.requires_grad])
    step = training_step(unet, optimizer, dict(unet.config), cfg, dtype, device, encoders=encoders)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        if device.type == "cuda":
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        model_bytes = sum(t.untyped_storage().nbytes() for m in models for t in [*m.parameters(), *m.buffers()])
        with accelerator_semantics(torch.float32), LiveStorage() as tracked:
            step()
            step()
        return model_bytes + tracked.peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers SDXL folder (random weights are fine)")
    parser.add_argument("--out", help="write the Markdown table here too")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings on top of the paper config")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"### Estimated vs measured peak memory of a training step, configs/sdxl_waveft_paper.yaml "
             f"({device.type}{', ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''})", "",
             "| base | setting | estimate (GiB) | measured (GiB) | estimate / measured |", "|---|---|---:|---:|---:|"]
    # Each base, then the bf16 base with the text encoders trained too (adapter.text_encoders).
    for quantize, text_encoders in (("none", False), ("int8", False), ("nf4", False), ("none", True)):
        cfg = load_config(PAPER_CONFIG, (f"model.pretrained={args.model}", f"model.quantize={quantize}",
                                         f"adapter.text_encoders.enabled={str(text_encoders).lower()}",
                                         *args.overrides))
        estimate = estimate_step_memory(cfg)
        measured = measured_step_bytes(cfg, args.model, device)
        lines.append(f"| {quantize} | {estimate.setting} | {estimate.total / GIB:.3f} | {measured / GIB:.3f} | "
                     f"{estimate.total / measured:.3f} |")
        print(lines[-1], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
