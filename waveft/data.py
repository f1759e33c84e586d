"""DreamBooth data: instance (and class) images, prompts, crops and SDXL's size/crop conditioning.

Random crops and flips are drawn from a generator seeded by (seed, epoch, index), so a resumed run sees
exactly the images an uninterrupted one would.
"""
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from waveft.errors import UserError
from waveft.run_folder import RunFolder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def list_images(folder: str, what: str = "instance folder") -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"{what} not found: {folder}")
    files = sorted(
        os.path.join(folder, name) for name in os.listdir(folder) if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise UserError(f"{what} {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_rgb(path: str) -> Image.Image:
    """Open an image upright (EXIF orientation) in RGB; transparency is composited onto white."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


@dataclass
class Example:
    path: str
    prompt: str


def instance_prompt(data_cfg) -> str:
    return data_cfg.instance_prompt or f"a {data_cfg.identifier} {data_cfg.class_noun}"


def class_prompt(data_cfg) -> str:
    return data_cfg.prior_preservation.class_prompt or f"a {data_cfg.class_noun}"


def instance_examples(data_cfg) -> list[Example]:
    """One example per instance image; a sidecar `<image>.txt` caption replaces the prompt when enabled."""
    examples = []
    for path in list_images(data_cfg.instance_dir):
        prompt = instance_prompt(data_cfg)
        caption_file = os.path.splitext(path)[0] + ".txt"
        if data_cfg.captions and os.path.isfile(caption_file):
            with open(caption_file) as f:
                prompt = f.read().strip() or prompt
        load_rgb(path)  # fail now, naming the file, rather than mid-training
        examples.append(Example(path, prompt))
    return examples


def prepare_image(image: Image.Image, resolution: int, crop: str, flip: bool, rng: random.Random):
    """Resize the short side to `resolution`, crop a square, maybe flip; return pixels in [-1, 1] and time ids.

    Time ids are SDXL's (original_h, original_w, crop_top, crop_left, target_h, target_w).
    """
    original_size = (image.height, image.width)
    scale = resolution / min(image.size)
    new_size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    if crop == "center":
        top, left = (image.height - resolution) // 2, (image.width - resolution) // 2
    else:
        top, left = rng.randint(0, image.height - resolution), rng.randint(0, image.width - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = ImageOps.mirror(image)
        left = new_size[0] - left - resolution  # the crop as seen in the mirrored image
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    time_ids = torch.tensor([*original_size, top, left, resolution, resolution], dtype=torch.float32)
    return pixels, time_ids


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance examples repeated `repeats` times; with prior preservation each item also carries a class image."""

    def __init__(self, data_cfg, seed: int, class_examples: list[Example] | None = None):
        self.cfg = data_cfg
        self.seed = seed
        self.instances = instance_examples(data_cfg)
        self.class_examples = class_examples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.instances) * self.cfg.repeats

    def _load(self, example: Example, rng: random.Random) -> dict:
        flip = rng.random() < self.cfg.flip_probability
        pixels, time_ids = prepare_image(load_rgb(example.path), self.cfg.resolution, self.cfg.crop, flip, rng)
        return {"pixels": pixels, "time_ids": time_ids, "prompt": example.prompt}

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        item = {"instance": self._load(self.instances[index % len(self.instances)], rng)}
        if self.class_examples:
            # Walk through all class images over the epochs, not only the first len(self) of them.
            class_index = (self.epoch * len(self) + index) % len(self.class_examples)
            item["class"] = self._load(self.class_examples[class_index], rng)
        return item


def collate(items: list[dict]) -> dict:
    """Instance examples first, then class examples, so the loss can split the batch in two halves."""
    rows = [item["instance"] for item in items] + [item["class"] for item in items if "class" in item]
    return {
        "pixels": torch.stack([r["pixels"] for r in rows]),
        "time_ids": torch.stack([r["time_ids"] for r in rows]),
        "prompts": [r["prompt"] for r in rows],
        "num_instance": len(items),
    }


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


# ---- the offline synthetic subject --------------------------------------------------------------------------


def write_synthetic_subject(folder: str, num_images: int = 4, size: int = 96, seed: int = 0) -> None:
    """A toy 'subject' (a striped red-and-yellow ball with a blue band) photographed on varied backgrounds.

    Lets the offline default train on something with a consistent identity without committing image files.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(num_images):
        background = tuple(int(c) for c in rng.integers(60, 230, size=3))
        img = Image.new("RGB", (size + 16 * i, size), background)  # varied aspect ratios
        draw = ImageDraw.Draw(img)
        radius = int(size * rng.uniform(0.25, 0.35))
        cx = int(rng.integers(radius, img.width - radius))
        cy = int(rng.integers(radius, size - radius))
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(200, 30, 40))
        for stripe in range(-radius, radius, max(2, radius // 3)):
            draw.line((cx + stripe, cy - radius, cx + stripe + radius // 2, cy + radius), fill=(250, 210, 40), width=2)
        draw.rectangle((cx - radius, cy - 3, cx + radius, cy + 3), fill=(30, 60, 200))
        img.save(os.path.join(folder, f"subject_{i:02d}.png"))


def ensure_instance_images(data_cfg) -> None:
    from waveft.files import atomic_directory

    if data_cfg.synthetic_if_missing and not os.path.isdir(data_cfg.instance_dir):
        with atomic_directory(data_cfg.instance_dir) as staging:
            write_synthetic_subject(staging)
