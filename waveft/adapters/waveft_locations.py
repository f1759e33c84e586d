"""PEFT's WaveFT coefficient locations, drawn once per distinct layer size instead of once per layer.

PEFT's `WaveFTLayer.update_layer` draws each layer's locations as
`torch.randperm(out * in, generator=torch.Generator().manual_seed(random_loc_seed))[:n_frequency]`: the
permutation depends only on `out * in` and the seed. It costs O(out * in) per layer (0.12 s for 1280 x 1280 on
CPU), 60 s over SDXL's 560 projections, which have only 4 distinct sizes. `shared_waveft_locations()` makes
equal draws share one permutation while PEFT attaches or loads adapters, with exactly PEFT's values.
"""
import contextlib

import torch


class _TorchWithSharedRandperm:
    """`torch` as PEFT's WaveFT layer module sees it inside `shared_waveft_locations`: all of torch, with a
    memoised `randperm` for seeded CPU generators."""

    def __init__(self):
        # (n, generator state before) -> (permutation, generator state after). Permutations are returned
        # without copying (PEFT slices them and derives new index tensors; it never writes to them).
        self._draws = {}

    def __getattr__(self, name):
        return getattr(torch, name)

    def randperm(self, n, *args, generator=None, **kwargs):
        if args or kwargs or generator is None or generator.device.type != "cpu":
            return torch.randperm(n, *args, generator=generator, **kwargs)
        key = (n, generator.get_state().numpy().tobytes())
        if key not in self._draws:
            permutation = torch.randperm(n, generator=generator)
            self._draws[key] = (permutation, generator.get_state())
        permutation, state_after = self._draws[key]
        generator.set_state(state_after)  # as if drawn: the generator ends where torch.randperm leaves it
        return permutation


@contextlib.contextmanager
def shared_waveft_locations():
    """Within this context, PEFT's WaveFT layers of equal `out * in` and seed share one location draw.

    Wrap whatever makes PEFT create WaveFT layers: `get_peft_model`, `unet.add_adapter(WaveFTConfig(...))`,
    `PeftModel.from_pretrained`. The locations (`waveft_indices`) and generator states are bit-identical to
    PEFT's own; the draws are freed on exit (they hold `out * in` int64 each: 48 MB for SDXL's four sizes).
    Only PEFT's WaveFT layer module sees the change; nested use is fine.
    """
    from peft.tuners.waveft import layer as waveft_layer

    if isinstance(waveft_layer.torch, _TorchWithSharedRandperm):
        yield
        return
    waveft_layer.torch = _TorchWithSharedRandperm()
    try:
        yield
    finally:
        waveft_layer.torch = torch
