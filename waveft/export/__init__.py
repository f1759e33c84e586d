"""Export an adapter to the files ComfyUI, Forge / A1111, InvokeAI and diffusers' `load_lora_weights` read.

`python -m waveft.export --adapter RUN/adapter --format full-diff|lora|waveft --out FILE.safetensors
[--rank N | --energy F] [--dtype fp16|bf16|fp32] [--base MODEL] [--overwrite]`

The formats name SDXL UNet layers the kohya way, `lora_unet_<diffusers module path, "." -> "_">`, and the layers
of the text encoders' adapters (the adapter folder's text_encoder/, text_encoder_2/) `lora_te1_` / `lora_te2_` +
`text_model_encoder_layers_<n>_...`, as kohya, ComfyUI and A1111 name them (so their CLIP weight applies):
- `waveft`: WaveFT's own file, the trained spectrum and its locations (`waveft.export.native`): lossless, at the
  adapter's size; read by the ComfyUI node in `integrations/comfyui/`.
- `full-diff`: `<name>.diff` (out x in), the adapter's weight difference itself: lossless.
- `lora`: `<name>.lora_down.weight` (rank x in), `<name>.lora_up.weight` (out x rank) and `<name>.alpha`, from
  PEFT's `convert_to_lora` (an SVD of each layer's difference at a fixed rank, or the smallest rank keeping an
  `--energy` fraction of its squared singular values); every tool applies (alpha / rank) up @ down. The
  relative error |dW - (alpha / rank) up down|_F / |dW|_F of every layer is printed and stored in the metadata.

Methods whose layers add a difference to the frozen weight (W' = W + dW) export: those `waveft.adapters.methods`
declares `additive` (`source.exportable_peft_types`).
Layer shapes come from the base model's UNet config (and text encoders' configs) alone: the models are built on
the meta device and no base weight is loaded. Differences are built one layer at a time, and a `full-diff` file
is streamed to disk, so an export holds one layer's dense difference (plus, for `lora`, the low-rank output) at
a time.
"""
