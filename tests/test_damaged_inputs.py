"""Damaged or foreign inputs: a truncated file, a JSON file of the wrong shape, an encoder of another
architecture. Each is refused in one `error:` line naming the file (or, for a cache, recomputed and said once)."""
import torch

from waveft.train.latent_cache import LatentCache, Latents


def test_a_truncated_latent_cache_entry_is_recomputed_and_said_once(tiny_sdxl_dir, tmp_path, capsys):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    pixels = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keys = ["view-a", "view-b"]
    first = Latents(vae, LatentCache(str(tmp_path), "vae"), "cpu")
    expected = [first.posterior(pixels, key) for key in keys]
    for key in keys:  # a full disk or a copy cut short
        path = first.cache._path(key)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])

    again = Latents(vae, LatentCache(str(tmp_path), "vae"), "cpu")
    got = [again.posterior(pixels, key) for key in keys]
    for (mean, std), (mean2, std2) in zip(expected, got):
        assert torch.equal(mean, mean2) and torch.equal(std, std2)
    assert again.cache.stats()["damaged"] == 2 and again.cache.stats()["misses"] == 2
    messages = [line for line in capsys.readouterr().err.splitlines() if "latent cache" in line]
    assert len(messages) == 1 and "is damaged; recomputing it" in messages[0]
    # The recomputed entries are whole: a third run reads them.
    third = LatentCache(str(tmp_path), "vae")
    assert all(third.get(key, "cpu") is not None for key in keys) and third.damaged == 0
