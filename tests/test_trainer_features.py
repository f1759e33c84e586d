"""The trainer's practitioner features on the tiny SDXL: latent cache, aspect-ratio buckets, EMA, validation loss,
masked loss, Prodigy, and the bad inputs each refuses before any model loads."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import adapter_weights, assert_resumed_not_redone, fresh_unet, interrupted_copy, tiny_cfg
from waveft.errors import UserError


def class_folder(tmp_path, count=2):
    """Ready-made class images, so that prior preservation needs no generation."""
    folder = tmp_path / "class_images"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"class_{i}.png")
    return folder


def cache_info(out):
    return json.loads((out / "run_info.json").read_text())["latent_cache"]


@pytest.mark.slow
def test_cached_run_equals_uncached_bit_for_bit_and_the_cache_is_reused_then_invalidated(
        tiny_sdxl_dir, subject_dir, tmp_path):
    from waveft.train.loop import train

    subject = tmp_path / "subject"
    shutil.copytree(subject_dir, subject)
    cache = tmp_path / "cache"
    settings = ("train.max_steps=3", "train.checkpointing_steps=0", "data.crop=center", "data.flip_probability=0.5",
                "data.prior_preservation.enabled=true", f"data.prior_preservation.class_dir={class_folder(tmp_path)}",
                "data.prior_preservation.num_class_images=2", f"data.latent_cache_dir={cache}")
    train(tiny_cfg(tiny_sdxl_dir, subject, tmp_path / "plain", *settings, "data.cache_latents=false"))
    first = train(tiny_cfg(tiny_sdxl_dir, subject, tmp_path / "cached", *settings, "data.cache_latents=true"))
    plain, cached = adapter_weights(tmp_path / "plain"), adapter_weights(tmp_path / "cached")
    assert plain.keys() == cached.keys() and all(torch.equal(plain[k], cached[k]) for k in plain)
    # 4 instance + 2 class images, each unflipped and flipped: 12 views encoded once, before the loop.
    assert first.run_info.latent_cache["misses"] == 12
    assert len(list(cache.rglob("*.safetensors"))) == 12

    again = train(tiny_cfg(tiny_sdxl_dir, subject, tmp_path / "cached", *settings, "overwrite_output_dir=true"))
    assert again.run_info.latent_cache["misses"] == 0 and again.run_info.latent_cache["hits"] > 0
    assert adapter_weights(tmp_path / "cached")[next(iter(plain))].equal(plain[next(iter(plain))])

    changed = sorted(subject.glob("*.png"))[0]
    image = np.asarray(Image.open(changed)).copy()
    image[:8] = 0
    Image.fromarray(image).save(changed)
    train(tiny_cfg(tiny_sdxl_dir, subject, tmp_path / "cached", *settings, "overwrite_output_dir=true"))
    assert cache_info(tmp_path / "cached")["misses"] == 2  # the changed image's two views, nothing else


@pytest.mark.slow
def test_random_crops_are_cached_lazily_and_still_match(tiny_sdxl_dir, subject_dir, tmp_path):
    from waveft.train.loop import train

    settings = ("train.max_steps=2", "train.checkpointing_steps=0", f"data.latent_cache_dir={tmp_path / 'cache'}")
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "plain", *settings, "data.cache_latents=false"))
    first = train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "cached", *settings)).run_info.latent_cache
    assert first["misses"] > 0  # crops encoded as they are drawn, and cached
    # The same run again draws the same crops: every one is read from the cache, none encoded.
    again = train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "cached", *settings, "overwrite_output_dir=true"))
    assert again.run_info.latent_cache["misses"] == 0 and again.run_info.latent_cache["hits"] > 0
    plain, cached = adapter_weights(tmp_path / "plain"), adapter_weights(tmp_path / "cached")
    assert plain.keys() == cached.keys() and all(torch.equal(plain[k], cached[k]) for k in plain)


def write_bucket_folder(folder):
    """4:3, 3:4 and 1:1 images, and a JPEG stored 4:3 that EXIF turns upright to 3:4."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide.png": (48, 36), "tall.png": (36, 48), "square.png": (40, 40)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # display needs a 90 degree turn
    Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(folder / "phone.jpg", exif=exif)


BUCKETS = ("data.buckets.enabled=true", "data.buckets.area=1024", "data.buckets.step=8", "data.buckets.max_ratio=2")


def test_buckets_one_size_per_batch_with_sdxl_time_ids(tmp_path):
    from waveft.config import load_config
    from waveft.train.data import DreamBoothDataset, collate, effective_batches

    write_bucket_folder(tmp_path / "photos")
    cfg = load_config(None, ("output_dir=x", f"data.instance_dir={tmp_path / 'photos'}", "data.resolution=32",
                             "data.crop=center", *BUCKETS))
    dataset = DreamBoothDataset(cfg.data, seed=0)
    sizes = {os.path.basename(e.path): e.size for e in dataset.instances}
    assert sizes == {"wide.png": (24, 40), "tall.png": (40, 24), "square.png": (32, 32), "phone.jpg": (40, 24)}
    upright = {"wide.png": (36, 48), "tall.png": (48, 36), "square.png": (40, 40), "phone.jpg": (48, 36)}
    seen = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for indices in effective_batches(dataset, size=2, seed=0, epoch=epoch):
            batch = collate([dataset[i] for i in indices])
            names = [os.path.basename(dataset.instances[i].path) for i in indices]
            assert len({sizes[n] for n in names}) == 1  # one bucket per batch
            (height, width) = sizes[names[0]]
            assert batch.pixels.shape[-2:] == (height, width)
            for name, ids in zip(names, batch.time_ids.tolist()):
                orig_h, orig_w, top, left, target_h, target_w = ids
                assert (orig_h, orig_w) == upright[name] and (target_h, target_w) == (height, width)
                scale = max(width / orig_w, height / orig_h)
                assert (top, left) == ((round(orig_h * scale) - height) // 2, (round(orig_w * scale) - width) // 2)
            seen.append(tuple(indices))
    assert sorted({i for batch in seen for i in batch}) == [0, 1, 2, 3]
    assert len({tuple(seen[0:3]), tuple(seen[3:6]), tuple(seen[6:9])}) > 1  # the order changes with the epoch


@pytest.mark.parametrize("buckets", [False, True])
def test_every_split_of_the_effective_batch_trains_on_the_same_samples_one_bucket_per_batch(tmp_path, buckets):
    """Processes x accumulation x batch size = 4 in every way: each optimizer step gets the same samples at the same
    positions (which key their noise), and every micro-batch holds one bucket, also where a bucket runs short."""
    from waveft.config import load_config
    from waveft.train.data import BatchLayout, DreamBoothDataset, effective_batches

    write_bucket_folder(tmp_path / "photos")
    cfg = load_config(None, ("output_dir=x", f"data.instance_dir={tmp_path / 'photos'}", "data.resolution=32",
                             "data.repeats=3", *(BUCKETS if buckets else ())))
    dataset = DreamBoothDataset(cfg.data, seed=0)
    layouts = [BatchLayout(1, 4, 1), BatchLayout(1, 2, 2), BatchLayout(2, 1, 2), BatchLayout(1, 1, 4)]
    for epoch in range(3):
        effective = effective_batches(dataset, 4, seed=0, epoch=epoch)
        assert sorted({i for batch in effective for i in batch}) == list(range(len(dataset)))
        for layout in layouts:
            rebuilt = [[None] * 4 for _ in effective]
            for process in range(layout.processes):
                micro_batches = iter(layout.micro_batches(effective, process))
                for step in range(len(effective)):
                    for accumulation_index in range(layout.accumulation):
                        batch = next(micro_batches)
                        assert len({dataset.size_of(i) for i in batch}) == 1  # one bucket
                        for position, index in zip(layout.positions(accumulation_index, process), batch):
                            rebuilt[step][position] = index
            assert rebuilt == effective, layout


@pytest.mark.slow
def test_buckets_train_with_prior_preservation_and_resume_exactly(tiny_sdxl_dir, tmp_path):
    from waveft.train.loop import train

    write_bucket_folder(tmp_path / "photos")
    settings = (*BUCKETS, "train.batch_size=2", "train.gradient_accumulation_steps=1", "train.max_steps=4",
                "train.checkpointing_steps=2", "train.resume=latest", "data.flip_probability=0.5",
                "data.prior_preservation.enabled=true", f"data.prior_preservation.class_dir={class_folder(tmp_path)}",
                "data.prior_preservation.num_class_images=2", f"data.latent_cache_dir={tmp_path / 'cache'}")
    full = train(tiny_cfg(tiny_sdxl_dir, tmp_path / "photos", tmp_path / "full", *settings))
    assert full.run_info.steps == 4
    interrupted_copy(tmp_path / "full", tmp_path / "split", checkpoint_step=2)
    resumed = train(tiny_cfg(tiny_sdxl_dir, tmp_path / "photos", tmp_path / "split", *settings))
    assert_resumed_not_redone(resumed.run_info, checkpoint_step=2, accumulation=1)
    a, b = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ema_resume_is_exact_and_the_adapter_holds_the_ema_weights(tiny_sdxl_dir, subject_dir, tmp_path):
    from waveft.adapters.attach import attach_adapter
    from waveft.io.adapter_folder import PEFT_MODEL_PREFIX
    from waveft.train.loop import train

    settings = ("train.ema.enabled=true", "train.ema.decay=0.8", "train.max_steps=5", "train.checkpointing_steps=2",
                "train.checkpoints_total_limit=3", "train.resume=latest", "train.learning_rate=3e-3",
                f"data.latent_cache_dir={tmp_path / 'cache'}")
    cfg = tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "full", *settings)
    train(cfg)
    interrupted_copy(tmp_path / "full", tmp_path / "split", checkpoint_step=2)
    resumed = train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "split", *settings))
    assert_resumed_not_redone(resumed.run_info, checkpoint_step=2, accumulation=2)
    for folder in ("adapter", "adapter_raw"):
        a, b = _weights(tmp_path / "full" / folder), _weights(tmp_path / "split" / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder

    ema, raw = _weights(tmp_path / "full" / "adapter"), _weights(tmp_path / "full" / "adapter_raw")
    assert ema.keys() == raw.keys() and not all(torch.equal(ema[k], raw[k]) for k in ema)
    # The average saved at step 4 (ema.pt), moved by the step-5 update towards the step-5 weights, is the adapter.
    shadow = torch.load(tmp_path / "full" / "checkpoint-4" / "ema.pt", weights_only=True)
    assert shadow["optimization_step"] == 4
    decay = min(0.8, (1 + 4) / (10 + 4))  # EMAModel's warm-up at its 5th update
    unet = fresh_unet(tiny_sdxl_dir)
    attach_adapter(unet, cfg.adapter, total_steps=cfg.train.max_steps)
    keys = [PEFT_MODEL_PREFIX + n.replace(".default", "") for n, p in unet.named_parameters() if p.requires_grad]
    assert sorted(keys) == sorted(ema)  # the EMA's parameter order is the UNet's
    for key, average in zip(keys, shadow["shadow_params"]):
        torch.testing.assert_close(ema[key], decay * average + (1 - decay) * raw[key], rtol=1e-5, atol=1e-7)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.slow
def test_validation_loss_is_logged_stored_plotted_and_falls(tiny_sdxl_dir, subject_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from waveft.train.loop import train

    out = tmp_path / "run"
    result = train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, "train.max_steps=30", "train.learning_rate=3e-3",
                            "data.crop=center", "adapter.peft.n_frequency=512", "train.checkpointing_steps=0",
                            "validation.loss.every_steps=10", "validation.loss.timesteps=4",
                            "train.report_to=tensorboard", f"data.latent_cache_dir={tmp_path / 'cache'}"))
    losses = result.run_info.validation_losses
    assert [step for step, _ in losses] == [10, 20, 30]
    assert losses[-1][1] < losses[0][1]
    assert json.loads((out / "run_info.json").read_text())["validation_losses"] == losses
    assert Image.open(out / "loss.png").size[0] > 100
    logged = []
    for events_file in (out / "logs").rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(events_file))
        events.Reload()
        if "validation_loss" in events.Tags()["scalars"]:
            logged += [e.step for e in events.Scalars("validation_loss")]
    assert logged == [10, 20, 30]


def test_masked_loss_gives_no_gradient_from_pixels_outside_the_mask():
    from diffusers import DDPMScheduler

    from waveft.train.loss import Conditioning, LossSettings, mask_weights, micro_batch_loss

    class Prediction(torch.nn.Module):
        """Stands in for the UNet: its prediction is a parameter, so the loss's gradient per pixel is visible."""

        def __init__(self):
            super().__init__()
            self.pred = torch.nn.Parameter(torch.randn(2, 4, 8, 8))

        def forward(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs):
            return type("Out", (), {"sample": self.pred})()

    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, :8, :8] = 1  # the first row learns from its top-left quarter only, the second from nothing
    weights = mask_weights(masks, (8, 8), 0.0)
    model = Prediction()
    conditioning = Conditioning(torch.zeros(2, 7, 64), torch.zeros(2, 32), torch.zeros(2, 6))
    loss = micro_batch_loss(model, DDPMScheduler(), torch.randn(2, 4, 8, 8), conditioning, 2,
                            [torch.Generator().manual_seed(i) for i in range(2)], LossSettings("epsilon"), weights)
    loss.backward()
    grad = model.pred.grad
    assert grad[0, :, :4, :4].abs().min() > 0
    assert grad[0, :, 4:, :].abs().max() == 0 and grad[0, :, :, 4:].abs().max() == 0
    assert grad[1].abs().max() == 0


def test_masks_follow_the_crop_and_prior_images_are_unmasked(tmp_path):
    from waveft.config import load_config
    from waveft.train.data import DreamBoothDataset, Example, collate

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (64, 32), (200, 10, 10)).save(folder / "a.png")
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (32, 0, 64, 32))  # the right half
    mask.save(folder / "a.mask.png")
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 16))  # the top half opaque
    rgba.save(tmp_path / "alpha.png")
    cfg = load_config(None, ("output_dir=x", f"data.instance_dir={folder}", "data.resolution=32", "data.crop=center",
                             "data.masks.source=sidecar"))
    dataset = DreamBoothDataset(cfg.data, 0, class_examples=[Example(str(folder / "a.png"), "a ball")])
    assert [os.path.basename(e.path) for e in dataset.instances] == ["a.png"]  # the mask is no training image
    batch = collate([dataset[0]])
    assert batch.masks.shape == (2, 1, 32, 32)
    assert batch.masks[0, 0, :, :16].max() == 0 and batch.masks[0, 0, :, 16:].min() == 1  # center crop
    assert batch.masks[1].min() == 1  # the class row

    cfg = load_config(None, ("output_dir=x", f"data.instance_dir={tmp_path}", "data.resolution=32",
                             "data.masks.source=alpha"))
    alpha_cfg = cfg.data
    from waveft.io.images import load_mask

    alpha = np.asarray(load_mask(str(tmp_path / "alpha.png"), alpha_cfg.masks.source))
    assert alpha[:16].min() == 255 and alpha[16:].max() == 0


@pytest.mark.slow
def test_prodigy_trains(tiny_sdxl_dir, subject_dir, tmp_path):
    from waveft.train.loop import train

    out = tmp_path / "run"
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, "train.optimizer=prodigy", "train.learning_rate=1.0",
                   "train.max_steps=3", "train.checkpointing_steps=3", f"data.latent_cache_dir={tmp_path / 'c'}"))
    groups = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)["param_groups"]
    assert groups[0]["d"] >= groups[0]["d0"] > 0  # Prodigy's state: its step size estimate never falls
    weights = adapter_weights(out)  # WaveFT starts from a zero spectrum: non-zero weights are Prodigy's steps
    assert any(w.abs().max() > 0 for w in weights.values())


@pytest.mark.parametrize("setup, overrides, message", [
    ("mask_size", ("data.masks.source=sidecar",), r"mask .*a\.mask\.png is 10x10, its image .*a\.png is 64x32"),
    ("none", ("data.buckets.enabled=true", "data.buckets.max_ratio=1.5", "data.buckets.step=8"),
     r"data.buckets.max_ratio=1.5 is below the aspect ratio of image .*a\.png \(64x32, ratio 2\)"),
    ("none", ("train.ema.enabled=true", "train.ema.decay=1.0"), r"key 'train.ema.decay' must be in \(0, 1\)"),
    ("no_prodigy", ("train.optimizer=prodigy",), "train.optimizer=prodigy needs the prodigyopt package"),
    ("none", ("data.latent_cache_dir={tmp}/a.png/cache",), r"data.latent_cache_dir: .* is not writable"),
])
def test_bad_inputs_stop_before_any_model_loads(tmp_path, monkeypatch, setup, overrides, message):
    import importlib.util

    from waveft.config import load_config
    from waveft.train.loop import train

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (64, 32)).save(folder / "a.png")
    if setup == "mask_size":
        Image.new("L", (10, 10)).save(folder / "a.mask.png")
    if setup == "no_prodigy":
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else
                            find_spec(name, *a))
    overrides = tuple(o.replace("{tmp}", str(folder)) for o in overrides)
    with pytest.raises(UserError, match=message):
        cfg = load_config(None, (f"output_dir={tmp_path / 'run'}", f"data.instance_dir={folder}", "data.resolution=32",
                                 "model.pretrained=/nonexistent/model", *overrides))
        train(cfg)  # model.pretrained does not exist: reaching the model would fail differently
    assert not (tmp_path / "run").exists()


def test_latent_views_depend_on_content_crop_and_flip(tmp_path):
    from waveft.config import load_config
    from waveft.train.data import DreamBoothDataset, choose_view

    Image.new("RGB", (48, 32), (1, 2, 3)).save(tmp_path / "a.png")
    cfg = load_config(None, ("output_dir=x", f"data.instance_dir={tmp_path}", "data.resolution=32"))
    dataset = DreamBoothDataset(cfg.data, 0)
    path = str(tmp_path / "a.png")
    views = [choose_view((48, 32), (32, 32), "random", flip, random.Random(seed)) for seed in range(5)
             for flip in (False, True)]
    keys = {dataset.view_key(path, v) for v in views}
    assert len(keys) == len(set(views))
    Image.new("RGB", (48, 32), (1, 2, 4)).save(tmp_path / "a.png")
    assert DreamBoothDataset(cfg.data, 0).view_key(path, views[0]) != dataset.view_key(path, views[0])
