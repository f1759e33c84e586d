"""DreamBooth data: instance (and class) images, prompts, crops and SDXL's size/crop conditioning.

The data order is drawn from (seed, epoch) per effective batch (`effective_batches`), random crops and flips
from (seed, epoch, index), so a resumed run sees exactly the images an uninterrupted one would, and a run split
over more processes or accumulation steps sees the same images at each optimizer step.
"""
import hashlib
import itertools
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from waveft.errors import UserError
from waveft.fixtures.synthetic_subject import TOY_SUBJECT, write_synthetic_subject
from waveft.io.images import IMAGE_EXTENSIONS, list_images, load_mask, load_rgb
from waveft.io.run_folder import RunFolder


@dataclass
class Example:
    path: str
    prompt: str
    size: tuple[int, int] | None = None  # (height, width) to train at (its bucket); None: data.resolution square


def instance_prompt(data_cfg) -> str:
    return data_cfg.instance_prompt or f"a {data_cfg.identifier} {data_cfg.class_noun}"


def class_prompt(data_cfg) -> str:
    return data_cfg.prior_preservation.class_prompt or f"a {data_cfg.class_noun}"


def instance_examples(data_cfg) -> list[Example]:
    """One example per instance image; a sidecar `<image>.txt` caption replaces the prompt when enabled; with
    buckets, each carries its bucket's size. Every image (and mask) is read once now, to fail naming the file."""
    examples = []
    buckets = bucket_sizes(data_cfg) if data_cfg.buckets.enabled else None
    for path in list_images(data_cfg.instance_dir):
        prompt = instance_prompt(data_cfg)
        caption_file = os.path.splitext(path)[0] + ".txt"
        if data_cfg.captions and os.path.isfile(caption_file):
            with open(caption_file) as f:
                prompt = f.read().strip() or prompt
        width, height = load_rgb(path).size
        if data_cfg.masks.source is not None:
            load_mask(path, data_cfg.masks.source)
        size = nearest_bucket(buckets, width, height, path, data_cfg.buckets.max_ratio) if buckets else None
        examples.append(Example(path, prompt, size))
    return examples


# ---- aspect-ratio buckets and the data order ---------------------------------------------------------------


def bucket_sizes(data_cfg) -> list[tuple[int, int]]:
    """SDXL-style buckets: (height, width), sides multiples of `step`, about `area` pixels (never more), aspect
    ratios up to `max_ratio` either way."""
    b = data_cfg.buckets
    area = b.area or data_cfg.resolution**2
    sizes = set()
    width = b.step
    while width * b.step <= area:
        height = (area // width) // b.step * b.step
        if height >= b.step and max(width / height, height / width) <= b.max_ratio:
            sizes.add((height, width))
        width += b.step
    if not sizes:
        raise UserError(f"data.buckets: no bucket of about {area} pixels (data.buckets.area) with sides multiples of "
                        f"{b.step} (data.buckets.step) has an aspect ratio within {b.max_ratio:g} "
                        f"(data.buckets.max_ratio); raise data.buckets.max_ratio or change the area")
    return sorted(sizes)


def nearest_bucket(buckets, width: int, height: int, path: str, max_ratio: float) -> tuple[int, int]:
    ratio = width / height
    if max(ratio, 1 / ratio) > max_ratio + 1e-9:
        raise UserError(f"data.buckets.max_ratio={max_ratio:g} is below the aspect ratio of image {path} "
                        f"({width}x{height}, ratio {max(ratio, 1 / ratio):.3g})")
    return min(buckets, key=lambda hw: (abs(math.log(ratio) - math.log(hw[1] / hw[0])), -hw[0] * hw[1]))


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's samples (its effective batch) are split: `processes` processes x `accumulation`
    micro-batches each x `batch_size` samples each. Sample k of the effective batch is in micro-batch
    k // batch_size, which is accumulation step (k // batch_size) // processes of process
    (k // batch_size) % processes. Data and randomness depend on a sample's position k, never on the split."""

    batch_size: int
    accumulation: int = 1
    processes: int = 1

    @property
    def size(self) -> int:
        """The effective batch: samples per optimizer step, over all processes and accumulation steps."""
        return self.batch_size * self.accumulation * self.processes

    def positions(self, accumulation_index: int, process_index: int) -> range:
        """Where one micro-batch's samples sit in the effective batch."""
        first = (accumulation_index * self.processes + process_index) * self.batch_size
        return range(first, first + self.batch_size)

    def micro_batches(self, effective: list[list[int]], process_index: int) -> list[list[int]]:
        """One process's share of `effective` batches: its micro-batches, in the order it trains on them."""
        return [batch[p.start: p.stop] for batch in effective
                for p in (self.positions(a, process_index) for a in range(self.accumulation))]


def effective_batches(dataset, size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's effective batches (dataset indices, `size` per optimizer step), each of one bucket.

    The indices are shuffled by (seed, epoch), split by bucket (`dataset.size_of`; one bucket without buckets)
    keeping that order, and cut into groups of `size`; a bucket's last group is topped up from the start of the
    same bucket, so that every micro-batch of any split is full and holds one bucket. The groups are then
    shuffled. Depends on the effective batch size only, not on how it is split across processes.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    by_bucket: dict = {}
    for index in torch.randperm(len(dataset), generator=g).tolist():
        by_bucket.setdefault(dataset.size_of(index), []).append(index)
    batches = []
    for _, indices in sorted(by_bucket.items()):
        filled = list(itertools.islice(itertools.cycle(indices), math.ceil(len(indices) / size) * size))
        batches += [filled[i: i + size] for i in range(0, len(filled), size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


# ---- one view of an image ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """How one training image is made from a file: resized to `resized` (w, h), cropped at (top, left) to
    (height, width), maybe mirrored."""

    resized: tuple[int, int]
    top: int
    left: int
    height: int
    width: int
    flip: bool


def choose_view(image_size: tuple[int, int], target: tuple[int, int], crop: str, flip: bool,
                rng: random.Random) -> View:
    """Scale the image to cover `target` (height, width), then a center or random crop (drawn from `rng`)."""
    width, height = image_size
    th, tw = target
    scale = max(tw / width, th / height)
    resized = (max(tw, round(width * scale)), max(th, round(height * scale)))
    if crop == "center":
        top, left = (resized[1] - th) // 2, (resized[0] - tw) // 2
    else:
        top, left = rng.randint(0, resized[1] - th), rng.randint(0, resized[0] - tw)
    return View(resized, top, left, th, tw, flip)


def apply_view(image: Image.Image, view: View, resample=Image.Resampling.BICUBIC) -> Image.Image:
    image = image.resize(view.resized, resample)
    image = image.crop((view.left, view.top, view.left + view.width, view.top + view.height))
    return ImageOps.mirror(image) if view.flip else image


def view_time_ids(original_size: tuple[int, int], view: View) -> torch.Tensor:
    """SDXL's (original_h, original_w, crop_top, crop_left, target_h, target_w); a mirrored crop's left edge is
    measured in the mirrored image."""
    left = view.resized[0] - view.left - view.width if view.flip else view.left
    return torch.tensor([*original_size, view.top, left, view.height, view.width], dtype=torch.float32)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def view_pixels(image: Image.Image, view: View) -> tuple[torch.Tensor, torch.Tensor]:
    """One view of an image as the UNet's inputs: pixels (3, H, W) in [-1, 1] and SDXL's time ids (6,)."""
    return to_pixels(apply_view(image, view)), view_time_ids((image.height, image.width), view)


def prepare_image(image: Image.Image, resolution: int, crop: str, flip: bool, rng: random.Random,
                  size: tuple[int, int] | None = None):
    """Resize to cover `size` (height, width; default a `resolution` square), crop, maybe flip; return pixels in
    [-1, 1] and SDXL's time ids (original_h, original_w, crop_top, crop_left, target_h, target_w)."""
    return view_pixels(image, choose_view(image.size, size or (resolution, resolution), crop, flip, rng))


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance examples repeated `repeats` times; with prior preservation each item also carries a class image.

    Each row also carries `view_key`, naming what its pixels were made from (file content, resize, crop, flip):
    the latent cache's key.
    """

    def __init__(self, data_cfg, seed: int, class_examples: list[Example] | None = None):
        self.cfg = data_cfg
        self.seed = seed
        self.instances = instance_examples(data_cfg)
        self.class_examples = class_examples
        self.epoch = 0
        self._digests: dict[str, str] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.instances) * self.cfg.repeats

    def size_of(self, index: int) -> tuple[int, int]:
        """The (height, width) item `index` trains at."""
        return self.instances[index % len(self.instances)].size or (self.cfg.resolution, self.cfg.resolution)

    def digest(self, path: str) -> str:
        if path not in self._digests:
            self._digests[path] = file_digest(path)
        return self._digests[path]

    def view_key(self, path: str, view: View) -> str:
        return json.dumps([self.digest(path), *view.resized, view.top, view.left, view.height, view.width,
                           view.flip])

    def make_row(self, example: Example, view: View, image: Image.Image, masked: bool) -> dict:
        pixels, time_ids = view_pixels(image, view)
        row = {"pixels": pixels, "time_ids": time_ids, "prompt": example.prompt,
               "view_key": self.view_key(example.path, view)}
        if masked:
            mask = apply_view(load_mask(example.path, self.cfg.masks.source), view, Image.Resampling.BILINEAR)
            row["mask"] = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
        return row

    def _load(self, example: Example, rng: random.Random, size: tuple[int, int], masked: bool) -> dict:
        flip = rng.random() < self.cfg.flip_probability
        image = load_rgb(example.path)
        view = choose_view(image.size, size, self.cfg.crop, flip, rng)
        return self.make_row(example, view, image, masked)

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        size = self.size_of(index)
        masked = self.cfg.masks.source is not None
        item = {"instance": self._load(self.instances[index % len(self.instances)], rng, size, masked)}
        if self.class_examples:
            # Walk through all class images over the epochs, not only the first len(self) of them; a class image
            # takes its instance's bucket, so that the batch stays one size. Prior images are never masked.
            class_index = (self.epoch * len(self) + index) % len(self.class_examples)
            item["class"] = self._load(self.class_examples[class_index], rng, size, False)
        return item

    def fixed_views(self) -> tuple[list, bool]:
        """The views that do not depend on the epoch's draws: center crops, or random crops of images that just
        fill their target; each once per flip that can occur. Returns ([(example, view, image)], whether every
        view of the data is among them)."""
        p = self.cfg.flip_probability
        flips = [False] * (p < 1) + [True] * (p > 0)
        sizes = sorted({self.size_of(i) for i in range(len(self.instances))})
        examples = [(e, [self.size_of(i)]) for i, e in enumerate(self.instances)]
        examples += [(e, sizes) for e in self.class_examples or []]
        views, all_fixed = [], True
        for example, example_sizes in examples:
            image = load_rgb(example.path)
            for size in example_sizes:
                for flip in flips:
                    view = choose_view(image.size, size, "center", flip, random.Random(0))
                    if self.cfg.crop == "random" and view.resized != (view.width, view.height):
                        all_fixed = False
                        continue
                    views.append((example, view, image))
        return views, all_fixed


@dataclass(frozen=True)
class TrainingBatch:
    """One micro-batch as the loop, the loss and the latent cache read it: instance rows first, then class rows
    (prior preservation), so the loss can split it in two halves. On the CPU: the loop moves what it needs."""

    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    time_ids: torch.Tensor  # (B, 6): SDXL's (original_h, original_w, crop_top, crop_left, target_h, target_w)
    prompts: list[str]
    view_keys: list[str]  # what each row's pixels were made from: the latent cache's keys
    num_instance: int  # rows 0..num_instance-1 are instance rows
    masks: Optional[torch.Tensor] = None  # (B, 1, H, W) in [0, 1] with data.masks: ones for the class rows


def collate(items: list[dict]) -> TrainingBatch:
    """The dataset's items as one batch: instance examples first, then class examples."""
    rows = [item["instance"] for item in items] + [item["class"] for item in items if "class" in item]
    masks = None
    if "mask" in rows[0]:
        masks = torch.stack([r.get("mask", torch.ones_like(rows[0]["mask"])) for r in rows])
    return TrainingBatch(
        pixels=torch.stack([r["pixels"] for r in rows]),
        time_ids=torch.stack([r["time_ids"] for r in rows]),
        prompts=[r["prompt"] for r in rows],
        view_keys=[r["view_key"] for r in rows],
        num_instance=len(items),
        masks=masks,
    )


# ---- prior preservation -------------------------------------------------------------------------------------


def class_image_dir(cfg) -> str:
    return cfg.data.prior_preservation.class_dir or RunFolder(cfg.output_dir).class_images


def missing_class_image_count(cfg) -> int:
    folder = class_image_dir(cfg)
    have = len([n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)]) if os.path.isdir(folder) else 0
    return max(0, cfg.data.prior_preservation.num_class_images - have)


def class_examples(cfg) -> list[Example]:
    files = list_images(class_image_dir(cfg), "class image folder")[: cfg.data.prior_preservation.num_class_images]
    return [Example(path, class_prompt(cfg.data)) for path in files]


# ---- the offline synthetic subject -----------------------------------------------------------------------


def ensure_instance_images(data_cfg) -> None:
    """With data.synthetic_if_missing, write the toy subject into a missing instance folder named after it. Any
    other missing folder is left missing, so that the dataset refuses it on every process, naming it: a typo
    must not train on toy images."""
    from waveft.io.files import atomic_directory

    folder = data_cfg.instance_dir
    if data_cfg.synthetic_if_missing and not os.path.isdir(folder) \
            and os.path.basename(os.path.normpath(folder)) == TOY_SUBJECT:
        with atomic_directory(folder) as staging:
            write_synthetic_subject(staging)
