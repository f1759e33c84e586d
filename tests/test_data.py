"""Instance data edge cases: EXIF orientation, colour modes, odd sizes, captions, unreadable files."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from waveft.config import DataConfig
from waveft.errors import UserError
from waveft.io.images import load_rgb
from waveft.train.data import DreamBoothDataset, collate, instance_prompt, prepare_image


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    upright = load_rgb(str(tmp_path / "rot.jpg"))
    assert upright.size == (20, 40)
    top = np.asarray(upright)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue left edge is now on top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "CMYK", "P"])
def test_colour_modes_become_rgb(tmp_path, mode):
    img = Image.new("RGBA", (16, 16), (10, 200, 30, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent pixel
    converted = img.convert(mode) if mode != "CMYK" else img.convert("RGB").convert("CMYK")
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    converted.save(path)
    rgb = load_rgb(str(path))
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    if mode in ("RGBA", "LA"):
        assert rgb.getpixel((0, 0)) == (255, 255, 255)  # transparency composited on white


@pytest.mark.parametrize("size", [(37, 101), (64, 64), (300, 17)])
def test_odd_sizes_crop_to_square_with_sdxl_time_ids(size):
    pixels, time_ids = prepare_image(Image.new("RGB", size, (1, 2, 3)), 32, "random", False, random.Random(0))
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    original_h, original_w, top, left, target_h, target_w = time_ids.tolist()
    assert (original_h, original_w) == (size[1], size[0]) and (target_h, target_w) == (32, 32)
    assert top >= 0 and left >= 0 and (top == 0 or left == 0)


def test_center_crop_and_flip_conditioning():
    img = Image.new("RGB", (64, 32))
    img.paste((255, 255, 255), (0, 0, 8, 32))  # white stripe on the left
    pixels, time_ids = prepare_image(img, 32, "center", True, random.Random(0))
    assert time_ids[2:4].tolist() == [0, 16]  # centred: 16 px cropped from each side, mirrored the same
    plain, _ = prepare_image(img, 32, "center", False, random.Random(0))
    assert torch.equal(pixels, plain.flip(-1))


def _cfg(folder, **kw):
    return DataConfig(instance_dir=str(folder), resolution=32, **kw)


def test_dataset_prompts_captions_and_repeats(tmp_path):
    for name in ["a.png", "b.webp", "c.JPG"]:
        Image.new("RGB", (40, 48), (9, 9, 9)).save(tmp_path / name)
    (tmp_path / "b.txt").write_text("a zjw ball on a table\n")
    (tmp_path / "notes.md").write_text("ignored")
    dataset = DreamBoothDataset(_cfg(tmp_path, class_noun="ball", captions=True, repeats=2), seed=0)
    assert len(dataset) == 6
    prompts = [e.prompt for e in dataset.instances]
    assert prompts == ["a zjw ball", "a zjw ball on a table", "a zjw ball"]
    assert instance_prompt(_cfg(tmp_path, identifier="sks", class_noun="dog")) == "a sks dog"
    batch = collate([dataset[0], dataset[4]])
    assert batch.pixels.shape == (2, 3, 32, 32) and batch.num_instance == 2


def test_crops_depend_only_on_seed_epoch_and_index(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    first = DreamBoothDataset(_cfg(tmp_path), seed=3)
    second = DreamBoothDataset(_cfg(tmp_path), seed=3)
    assert torch.equal(first[0]["instance"]["pixels"], second[0]["instance"]["pixels"])
    crops = set()
    for epoch in range(6):
        first.set_epoch(epoch)
        crops.add(tuple(first[0]["instance"]["time_ids"].tolist()))
    assert len(crops) > 1


def test_missing_empty_and_unreadable_instance_data(tmp_path):
    with pytest.raises(UserError, match="instance folder not found"):
        DreamBoothDataset(_cfg(tmp_path / "nope"), seed=0)
    with pytest.raises(UserError, match="holds no images"):
        DreamBoothDataset(_cfg(tmp_path), seed=0)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        DreamBoothDataset(_cfg(tmp_path), seed=0)


def test_prior_preservation_walks_through_every_class_image(tmp_path):
    from waveft.train.data import Example

    instance_dir = tmp_path / "instance"
    instance_dir.mkdir()
    for name in ["a.png", "b.png"]:
        Image.new("RGB", (40, 40)).save(instance_dir / name)
    class_examples = []  # 5 class images, 2 instance images: each epoch sees 2 of them
    for i in range(5):
        path = tmp_path / f"class_{i}.png"
        Image.new("RGB", (40, 40), (i, i, i)).save(path)
        class_examples.append(Example(str(path), "a ball"))
    dataset = DreamBoothDataset(_cfg(instance_dir), seed=0, class_examples=class_examples)
    used = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        used |= {dataset[i]["class"]["pixels"][0, 0, 0].item() for i in range(len(dataset))}
    assert len(used) == 5
