"""Peak accelerator memory of one training step, estimated without loading any weights.

`estimate_step_memory(cfg)` builds the run's UNet from its config file alone on the meta device (tensors with
shapes and dtypes, no data), attaches the run's adapter, quantizes as `model.quantize` would, and runs two
training steps (forward, backward, optimizer step) at the run's resolution, batch, precision and gradient
checkpointing while `LiveStorage` counts the bytes of every tensor storage allocated and freed. The first step
creates what persists (optimizer state, the structured layer's index plans); the second is the one measured.

What meta tensors cannot do by themselves is modelled where it changes memory, once each:
- attention runs as the fused kernel a GPU uses (`accelerator_semantics`); meta tensors would otherwise take
  the math path and keep N x N scores;
- mixed precision: autocast leaves no mark on meta tensors, so `accelerator_semantics` does what CUDA autocast
  does to memory;
- a quantized Linear layer (`_QuantizedLinear`) holds bitsandbytes' packed bytes and statistics and, like
  bitsandbytes, dequantizes its weight into a temporary for each matmul, forward and backward;
- PEFT's WaveFT layer selects its in-range indices with a boolean mask, which is all true
  (`_masks_known_all_true`).
With `adapter.text_encoders` both CLIP encoders are built the same way, adapted, and run inside the step on a
batch of token ids (their weights, adapters, optimizer state and activations are counted).
Not counted: the CUDA context and allocator fragmentation (add ~0.5-1 GB on a GPU), the VAE's encoder
activations when latents are not cached (its weights are counted), and everything outside the step (frozen text
encoders are freed or moved to the CPU before the loop; sampling loads its own pipeline).
"""
import contextlib
import functools
import gc
import math
import os
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from waveft.errors import UserError

TEXT_TOKENS = 77
GIB = 2**30
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


class EstimateUnavailable(UserError):
    """The run's adapter cannot run on meta tensors (its layers read values: SHiRA's random mask, LoHa's, LoKr's
    and WaRA's), so there is no estimate for it."""


# ---- counting storages ---------------------------------------------------------------------------------------


def _dense_tensors(tree) -> list:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and t.layout == torch.strided]


class LiveStorage(TorchDispatchMode):
    """Bytes of the tensor storages allocated while active: live now, at their peak, and the allocation that
    made the peak. Views and in-place results are not new storage. Storages are told apart by their C++
    object, so meta tensors (no data pointer) count too; a storage stops counting when it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.peak_allocation = 0
        self._tracked = set()

    def _release(self, key, nbytes):
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in _dense_tensors((args, kwargs))}
        allocated = 0
        for tensor in _dense_tensors(out):  # a sparse tensor's memory is its dense index and value tensors
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._tracked:
                continue
            self._tracked.add(key)
            allocated += storage.nbytes()
            weakref.finalize(storage, self._release, key, storage.nbytes())
        self.live += allocated
        if self.live > self.peak:
            self.peak, self.peak_allocation = self.live, allocated
        return out


# ---- what meta tensors need to behave like the accelerator ----------------------------------------------------

F = torch.nn.functional
_FP32_UNDER_AUTOCAST = ("group_norm", "layer_norm", "softmax", "mse_loss")
_COMPUTE_DTYPE_UNDER_AUTOCAST = ("linear", "conv2d", "conv_transpose2d")


def _cast(tree, dtype):
    return torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def _in_fp32(function, compute_dtype):
    def run(*args, **kwargs):
        if any(t.dtype == compute_dtype for t in _dense_tensors(args)):
            args, kwargs = _cast((args, kwargs), torch.float32)
        return function(*args, **kwargs)

    return run


def _in_compute_dtype(function, compute_dtype):
    def run(*args, **kwargs):
        args, kwargs = _cast((args, kwargs), compute_dtype)
        return function(*args, **kwargs)

    return run


def _fused_attention(function):
    def run(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or kwargs:
            return function(query, key, value, attn_mask, dropout_p, is_causal, scale, **kwargs)
        output, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return output

    return run


@contextlib.contextmanager
def accelerator_semantics(compute_dtype: torch.dtype):
    """`torch.nn.functional` as the accelerator runs it, for meta tensors, while active (this process only):

    - attention as the fused kernel (flash / memory-efficient on CUDA; the CPU's flash kernel has the same
      footprint): its output and a log-sum-exp per query row are kept for backward, not N x N scores;
    - under mixed precision (`compute_dtype` half), what CUDA autocast does to memory: normalisations, softmax
      and the loss in fp32; Linear, convolution and transposed convolution in `compute_dtype`, their inputs and
      weights cast to it, the fp32 adapters' too (PEFT casts the input to the adapter's fp32, then autocast
      casts both down: PEFT WaveFT's dense delta is kept for backward in `compute_dtype`). The structured
      layer turns autocast off and uses none of these functions.
    Functions are swapped rather than intercepted by a mode so that gradient checkpointing's recomputation in
    the backward sees the same."""
    swaps = {"scaled_dot_product_attention": _fused_attention(F.scaled_dot_product_attention)}
    if compute_dtype != torch.float32:
        swaps.update({name: _in_fp32(getattr(F, name), compute_dtype) for name in _FP32_UNDER_AUTOCAST})
        swaps.update({name: _in_compute_dtype(getattr(F, name), compute_dtype)
                      for name in _COMPUTE_DTYPE_UNDER_AUTOCAST})
    originals = {name: getattr(F, name) for name in swaps}
    try:
        for name, function in swaps.items():
            setattr(F, name, function)
        yield
    finally:
        for name, function in originals.items():
            setattr(F, name, function)


def quantized_bytes(out_features: int, in_features: int, kind: str) -> int:
    """Bytes bitsandbytes keeps for one quantized weight: nf4 packs two weights a byte, with one 8-bit absmax
    per block of 64 and an fp32 absmax per 256 blocks (compressed statistics); int8 one byte a weight plus an
    fp32 scale per output row."""
    weights = out_features * in_features
    if kind == "nf4":
        blocks = math.ceil(weights / 64)
        return math.ceil(weights / 2) + blocks + 4 * math.ceil(blocks / 256)
    return weights + 4 * out_features


class _QuantizedLinear(torch.nn.Module):
    """A Linear layer as bitsandbytes quantizes it, for the estimate: its packed bytes, its bias in the compute
    dtype, a dequantized temporary per matmul."""

    def __init__(self, linear: torch.nn.Linear, kind: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.empty(quantized_bytes(self.out_features, self.in_features, kind),
                                                   dtype=torch.uint8, device="meta"))
        self.bias = linear.bias
        # What layers around it read of its weight (dtype, shape, device), with no storage to count.
        self.weight = torch.empty((), dtype=linear.weight.dtype, device="meta").expand(linear.weight.shape)

    def forward(self, x):
        x = x.to(self.weight.dtype)  # bitsandbytes computes in its compute dtype
        output = _QuantizedMatmulFunction.apply(x, self.packed, self.out_features, self.in_features)
        return output if self.bias is None else output + self.bias


class _QuantizedMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, out_features, in_features):
        ctx.shape = (out_features, in_features)
        return torch.nn.functional.linear(x, x.new_empty(out_features, in_features))

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output @ grad_output.new_empty(ctx.shape), None, None, None


def _masks_known_all_true(cfg):
    """A context in which meta tensors' `nonzero` (boolean indexing, forward and backward) assumes every element
    true (torch's own switch), for PEFT's WaveFT only: each step its layer rebuilds a dense delta from its spectrum
    and keeps the indices that fall inside the padded matrix with a boolean mask. The indices are drawn inside the
    layer (row = i // in_features, column = i % in_features of a permutation of out x in) and the padding offsets
    are at most the padding, so that mask is always all true and the step allocates what a real one does. Other
    methods' masks (SHiRA's random one) are not all true: for them `nonzero` stays unimplemented and the estimate
    unavailable."""
    if cfg.adapter.type == "waveft" and cfg.adapter.implementation == "peft":
        import torch.fx.experimental._config as fx_config

        return fx_config.patch(meta_nonzero_assume_all_nonzero=True)
    return contextlib.nullcontext()


def _quantize_for_estimate(model: torch.nn.Module, kind: str) -> None:
    """Every Linear layer `quantize_linear_layers` would quantize (adapted projections' base layers included)
    becomes a `_QuantizedLinear`."""
    from waveft.models import is_quantizable

    for name, module in list(model.named_modules()):
        if is_quantizable(module, kind) and not module.weight.requires_grad:  # an adapter's own Linear stays
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _QuantizedLinear(module, kind))


# ---- the model's shape, from its config files ----------------------------------------------------------------


def _component_config(model_cfg, subfolder: str, shipped: dict) -> dict:
    """A component's config.json: from the local folder, the Hub cache, the Hub, or (SDXL base only, offline)
    the copy waveft.tiny ships."""
    from diffusers import UNet2DConditionModel

    base = model_cfg.pretrained
    if model_cfg.builds_tiny_model() and not os.path.isdir(base):
        from waveft.fixtures.tiny import TINY_VAE_CONFIG, tiny_text_encoder_config, tiny_unet_config

        if subfolder.startswith("text_encoder"):
            return tiny_text_encoder_config().to_dict()
        return tiny_unet_config() if subfolder == "unet" else dict(TINY_VAE_CONFIG)
    if os.path.isdir(base):
        return dict(UNet2DConditionModel.load_config(base, subfolder=subfolder))
    for local_only in (True, False):
        try:
            return dict(UNet2DConditionModel.load_config(base, subfolder=subfolder, revision=model_cfg.revision,
                                                         local_files_only=local_only))
        except (OSError, ValueError) as exc:
            if base == SDXL_BASE:  # not cached: the shipped copy, without asking the Hub
                return dict(shipped)
            failure = str(exc).splitlines()[0]
    raise UserError(f"model.pretrained: cannot read {subfolder}/config.json of {base!r} (a folder, the Hub cache "
                    f"or the Hub): {failure}")


def unet_config(model_cfg) -> dict:
    from waveft.fixtures.tiny import SDXL_UNET_CONFIG

    return _component_config(model_cfg, "unet", SDXL_UNET_CONFIG)


# ---- the estimate -------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Expected peak accelerator memory of one training step, in bytes; the four parts add up to `total`."""

    weights: int  # the frozen base: UNet (quantized where asked), + the VAE when latents are not cached
    adapter_state: int  # adapter parameters and buffers, optimizer state, the structured layer's index plans
    activations: int  # what the step holds at its peak: tensors saved for backward, gradients so far
    largest_temporary: int  # the allocation that reached the peak
    setting: str  # what was estimated, in words

    @property
    def total(self) -> int:
        return self.weights + self.adapter_state + self.activations + self.largest_temporary

    def table(self) -> str:
        """The split as a Markdown table, with the setting."""
        rows = [("weights (frozen base)", self.weights), ("adapter + optimizer state", self.adapter_state),
                ("activations", self.activations), ("largest temporary", self.largest_temporary),
                ("total (CUDA context not included)", self.total)]
        return "\n".join([f"Estimated peak accelerator memory of one training step ({self.setting}):", "",
                          "| part | MiB | GiB |", "|---|---:|---:|",
                          *(f"| {name} | {size / 2**20:,.1f} | {size / GIB:.2f} |" for name, size in rows)])

    def line(self) -> str:
        return (f"estimated peak accelerator memory of a training step: {_size(self.total)} (weights "
                f"{_size(self.weights)}, adapter + optimizer state {_size(self.adapter_state)}, activations "
                f"{_size(self.activations)}, largest temporary {_size(self.largest_temporary)}; {self.setting}; "
                f"CUDA context not included; --estimate-memory for the table)")


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


def _meta_model(make, dtype: torch.dtype):
    """`make()` (a model built from its config) with shapes only, made directly in `dtype`."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return make()
    finally:
        torch.set_default_dtype(default)


def _meta_text_encoders(cfg, dtype: torch.dtype) -> list:
    """With adapter.text_encoders: both CLIP encoders from their config files, on the meta device in the run's
    dtype (as the trainer loads them), with the run's adapter; else []."""
    from transformers import CLIPTextConfig

    from waveft.adapters.attach import attach_text_encoder_adapter
    from waveft.fixtures.tiny import SDXL_TEXT_ENCODER_2_CONFIG, SDXL_TEXT_ENCODER_CONFIG
    from waveft.models import text_encoder_class

    if not cfg.adapter.text_encoders.enabled:
        return []
    encoders = []
    for component, shipped in (("text_encoder", SDXL_TEXT_ENCODER_CONFIG),
                               ("text_encoder_2", SDXL_TEXT_ENCODER_2_CONFIG)):
        config = CLIPTextConfig.from_dict(_component_config(cfg.model, component, shipped))
        encoder = _meta_model(functools.partial(text_encoder_class(component), config), dtype).requires_grad_(False)
        attach_text_encoder_adapter(encoder, component, cfg.text_encoder_adapter())
        encoders.append(encoder)
    return encoders


def _tensors(model: torch.nn.Module) -> list:
    return [*model.parameters(), *model.buffers()]


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def estimate_step_memory(cfg) -> MemoryEstimate:
    """One training step of `cfg` (a validated RunConfig) on meta tensors; a few seconds of CPU and < 1 GB of RAM
    for SDXL. See the module docstring for what is modelled. `EstimateUnavailable` for a method whose layers
    read tensor values (meta tensors have none)."""
    try:
        return _estimate_on_meta(cfg)
    except (NotImplementedError, RuntimeError) as exc:
        raise EstimateUnavailable(f"no memory estimate for adapter.type={cfg.adapter.type}: its PEFT layers read "
                                  f"tensor values, which meta tensors lack ({str(exc).splitlines()[0][:70]})"
                                  ) from None


def _estimate_on_meta(cfg) -> MemoryEstimate:
    from diffusers import UNet2DConditionModel

    from waveft.adapters.attach import attach_adapter
    from waveft.models import DTYPES
    from waveft.train.latent_cache import use_latent_cache
    from waveft.train.optimizer import build_optimizer

    dtype = DTYPES[cfg.train.mixed_precision]
    config = unet_config(cfg.model)
    unet = _meta_model(lambda: UNet2DConditionModel.from_config(config), dtype).requires_grad_(False)
    base = {t.untyped_storage()._cdata for t in _tensors(unet)}
    attach_adapter(unet, cfg.resolved_adapter)
    encoders = _meta_text_encoders(cfg, dtype)  # adapted already; their frozen weights are all that is not trainable
    adapter_state = _storage_bytes([t for t in _tensors(unet) if t.untyped_storage()._cdata not in base] +
                                   [p for encoder in encoders for p in encoder.parameters() if p.requires_grad])
    if cfg.model.quantize != "none":
        _quantize_for_estimate(unet, cfg.model.quantize)
    weights = _storage_bytes([*_tensors(unet), *(t for encoder in encoders for t in _tensors(encoder))]) - adapter_state
    if not use_latent_cache(cfg):
        weights += _vae_bytes(cfg)
    trainable = [p for model in (unet, *encoders) for p in model.parameters() if p.requires_grad]
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = build_optimizer(cfg, trainable)
    if cfg.train.ema.enabled:
        adapter_state += _storage_bytes(trainable)  # the average, one copy
    for encoder in encoders:
        encoder.train()
    step = training_step(unet, optimizer, config, cfg, dtype, encoders=encoders)
    with accelerator_semantics(dtype), _masks_known_all_true(cfg):
        with LiveStorage() as first:
            step()
            gc.collect()
        adapter_state += first.live  # optimizer state and index plans persist past the first step
        with LiveStorage() as second:
            step()
    checkpointing = "on" if cfg.train.gradient_checkpointing else "off"
    setting = (f"{cfg.data.resolution} px, batch {cfg.train.batch_size}, {cfg.train.mixed_precision}, "
               f"quantize {cfg.model.quantize}, gradient checkpointing {checkpointing}, "
               f"{cfg.adapter.label or cfg.adapter.type}{' + text encoders' if encoders else ''}")
    return MemoryEstimate(weights, adapter_state, second.peak - second.peak_allocation, second.peak_allocation,
                          setting)


def _vae_bytes(cfg) -> int:
    from diffusers import AutoencoderKL

    from waveft.fixtures.tiny import SDXL_VAE_CONFIG
    from waveft.models import DTYPES

    config = _component_config(cfg.model, "vae", SDXL_VAE_CONFIG)
    vae = _meta_model(lambda: AutoencoderKL.from_config(config), DTYPES[cfg.model.vae_dtype])
    return _storage_bytes(_tensors(vae))


def training_step(unet, optimizer, config: dict, cfg, dtype, device="meta", encoders: list = ()):
    """The trainer's step on inputs of the run's shapes (zeros: only their memory matters): noisy
    latents, both encoders' hidden states, the pooled embedding and SDXL's size conditioning; the MSE in fp32
    (accelerate returns fp32 outputs under autocast); AdamW's step. With `encoders` (the two adapted text encoders
    of adapter.text_encoders), the hidden states and pooled embedding come from them, per step, on token ids, as
    `waveft.models.encode_token_ids` makes them for the trainer. Returns it as a function."""
    from waveft.models import encode_token_ids

    batch, latent = cfg.train.batch_size, cfg.data.resolution // 8
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]

    def step():
        with torch.device(device):
            noisy = torch.zeros(batch, config["in_channels"], latent, latent, dtype=dtype)
            target = torch.zeros(batch, config["in_channels"], latent, latent, dtype=torch.float32)
            if encoders:
                ids = torch.zeros(batch, TEXT_TOKENS, dtype=torch.long)
                hidden, text_embeds = encode_token_ids(list(encoders), [ids, ids], cfg.model.text_hidden_states)
            else:
                hidden = torch.zeros(batch, TEXT_TOKENS, config["cross_attention_dim"], dtype=dtype)
                text_embeds = torch.zeros(batch, pooled, dtype=dtype)
            added = dict(text_embeds=text_embeds, time_ids=torch.zeros(batch, 6, dtype=dtype))
            prediction = unet(noisy, torch.zeros(batch, dtype=torch.long), hidden, added_cond_kwargs=added).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), target)
            del prediction
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step
