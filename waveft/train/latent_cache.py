"""The latent cache: the VAE posterior (mean, std) of each training view, computed once and kept on disk.

An entry is keyed by what made it: the image file's content, the resize, crop box and flip (`View`), and the
VAE's identity (a hash of its weights, dtype and scaling). A changed image, crop, VAE or dtype therefore never
reuses a stale entry. Entries are written atomically; processes and runs share the folder. An entry damaged
anyway (a full disk, a copy cut short) is removed and recomputed, and the run says so once.

Each step samples its latents from the posterior as the VAE's own `latent_dist.sample` does (mean + std * noise
drawn from each sample's generator), so a cached run gives the same adapter, bit for bit, as an uncached one.
"""
import hashlib
import json
import os
import sys
import tempfile
from contextlib import suppress

import torch

from waveft.errors import UserError
from waveft.io.files import write_atomic
from waveft.train.data import TrainingBatch


def cache_folder(data_cfg) -> str:
    if data_cfg.latent_cache_dir:
        return data_cfg.latent_cache_dir
    root = os.environ.get("WAVEFT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "waveft")
    return os.path.join(root, "latents")


def check_writable(folder: str) -> None:
    """Fail before any model loads when the cache cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"data.latent_cache_dir: {folder} is not writable ({exc.strerror}); set "
                        f"data.latent_cache_dir to a writable folder or data.cache_latents=false") from None


def vae_identity(vae) -> str:
    """A hash of the VAE's weights, dtype and latent scaling. Cost: one pass over its weights (~0.3 GB at SDXL)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([str(vae.dtype), vae.config.scaling_factor, vae.config.get("shift_factor")]).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """Posteriors on disk under `folder/<vae identity>/`, one safetensors file per view."""

    def __init__(self, folder: str, vae_id: str):
        self.folder = os.path.join(folder, vae_id)
        self.hits = 0
        self.misses = 0
        self.damaged = 0  # entries found damaged, removed and recomputed

    def _path(self, view_key: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(view_key.encode()).hexdigest() + ".safetensors")

    def _whole_entry(self, view_key: str) -> str | None:
        """The entry's file if it holds a whole entry (safetensors checks that the header covers the file exactly;
        only the header is read), else None; a damaged file is removed so that the view is encoded again."""
        from safetensors import SafetensorError, safe_open

        path = self._path(view_key)
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, "pt") as f:
                if set(f.keys()) == {"mean", "std"}:
                    return path
        except SafetensorError:
            pass
        if not self.damaged:
            print(f"latent cache: {path} is damaged; recomputing it (and any other damaged entry)", file=sys.stderr)
        self.damaged += 1
        with suppress(FileNotFoundError):  # another process may have removed it first
            os.unlink(path)
        return None

    def __contains__(self, view_key: str) -> bool:
        return self._whole_entry(view_key) is not None

    def get(self, view_key: str, device):
        """(mean, std), each (4, h, w) on `device`, or None if the view was never encoded (or its entry is damaged)."""
        from safetensors.torch import load

        path = self._whole_entry(view_key)
        if path is None:
            self.misses += 1
            return None
        self.hits += 1
        with open(path, "rb") as f:
            saved = load(f.read())
        return saved["mean"].to(device), saved["std"].to(device)

    def put(self, view_key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        from safetensors.torch import save

        data = save({"mean": mean.detach().cpu().contiguous(), "std": std.detach().cpu().contiguous()},
                    metadata={"view": view_key})
        write_atomic(self._path(view_key), lambda f: f.write(data))

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "damaged": self.damaged, "folder": self.folder}


class Latents:
    """Latents for the training batches: each row's posterior from the cache or, on a miss, from the VAE (then
    cached); `vae_needed` False means every view was precomputed and the VAE may leave the accelerator."""

    def __init__(self, vae, cache: LatentCache | None, device):
        self.vae, self.cache, self.device = vae, cache, device
        self.vae_needed = True

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor, view_key: str):
        """(mean, std) of one view, pixels (3, H, W) in [-1, 1]; the VAE runs in its own dtype, one image at a
        time, so that a cached and an uncached posterior are the same numbers."""
        cached = self.cache.get(view_key, self.device) if self.cache is not None else None
        if cached is not None:
            return cached
        if not self.vae_needed:
            raise RuntimeError(f"latent cache: view {view_key} was not precomputed")
        dist = self.vae.encode(pixels[None].to(self.device, dtype=self.vae.dtype)).latent_dist
        mean, std = dist.mean[0], dist.std[0]
        if self.cache is not None:
            self.cache.put(view_key, mean, std)
        return mean, std

    def precompute(self, dataset, progress: bool, share: tuple[int, int] = (0, 1)) -> bool:
        """Encode every fixed view not yet cached, or with `share` (i, n) every n-th from the i-th (process i of n
        takes its share; entries are written atomically, so processes never see a half-written one). True when
        every view the loop can ask for is fixed."""
        from tqdm.auto import tqdm

        from waveft.train.data import view_pixels

        views, all_fixed = dataset.fixed_views()
        first, step = share
        for example, view, image in tqdm(views[first::step], desc="caching latents", disable=not progress):
            key = dataset.view_key(example.path, view)
            if key not in self.cache:
                self.posterior(view_pixels(image, view)[0], key)
        return all_fixed

    @torch.no_grad()
    def sample(self, batch: TrainingBatch, generators: list[torch.Generator], dtype) -> torch.Tensor:
        """(B, 4, H/f, W/f) latents, scaled, in `dtype`: mean + std * noise, each row's noise drawn from its own
        generator (CPU) as diffusers' DiagonalGaussianDistribution.sample draws it."""
        from diffusers.utils.torch_utils import randn_tensor

        rows = [self.posterior(pixels, key) for pixels, key in zip(batch.pixels, batch.view_keys)]
        mean, std = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        noise = torch.stack([randn_tensor(mean.shape[1:], generator=g, device=mean.device, dtype=mean.dtype)
                             for g in generators])
        latents = mean + std * noise
        return (latents * self.vae.config.scaling_factor).to(dtype)


def use_latent_cache(cfg) -> bool:
    """Whether a run (`cfg`: a RunConfig) caches its latents (data.cache_latents auto or true)."""
    return cfg.data.cache_latents in ("auto", True)
