"""Each metric against an independent computation on small known inputs, and the encoders' plumbing."""
import importlib.util
import math
import os

import numpy as np
import pytest
from PIL import Image

from eval.encoders import ClipEncoder, DinoEncoder, EmbeddingCache, center_crop, load_rgb, resize_short_side
from eval.metrics import (
    LpipsDistance,
    clip_t_scores,
    cmmd,
    cosine_distance,
    dino_diversity,
    mean_pairwise_cosine,
    mean_pairwise_distance,
)
from eval.tiny_encoders import write_tiny_encoders
from waveft.errors import UserError

rng = np.random.default_rng(0)


def direct_cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_pairwise_cosine_identical_orthogonal_and_direct():
    x = rng.normal(size=(1, 8))
    assert mean_pairwise_cosine(x, np.repeat(3.0 * x, 4, axis=0)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(np.eye(4)[:2], np.eye(4)[2:]) == pytest.approx(0.0)
    real, generated = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    expected = np.mean([direct_cosine(r, g) for r in real for g in generated])
    assert mean_pairwise_cosine(real, generated) == pytest.approx(expected)


def test_clip_t_is_100_times_the_cosine_of_matching_rows():
    images, texts = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    expected = [100 * direct_cosine(i, t) for i, t in zip(images, texts)]
    np.testing.assert_allclose(clip_t_scores(images, texts), expected)
    np.testing.assert_allclose(clip_t_scores(np.eye(3), np.eye(3)[[1, 2, 0]]), 0.0, atol=1e-12)


def test_pairwise_aggregation_with_an_independent_distance():
    # |a - b| over the pairs of (1, 2, 4): 1, 3, 2
    assert mean_pairwise_distance([1.0, 2.0, 4.0], lambda a, b: abs(a - b)) == pytest.approx(2.0)
    calls = []
    mean_pairwise_distance("abcd", lambda a, b: calls.append(a + b) or 0.0)
    assert calls == ["ab", "ac", "ad", "bc", "bd", "cd"]  # each i < j pair once
    assert math.isnan(mean_pairwise_distance([1.0], lambda a, b: 1.0))


def test_dino_diversity():
    x = rng.normal(size=8)
    assert dino_diversity(np.stack([x, x, 2 * x])) == pytest.approx(0.0, abs=1e-12)
    assert dino_diversity(np.eye(3)) == pytest.approx(1.0)
    embeddings = rng.normal(size=(4, 8))
    expected = np.mean([1 - direct_cosine(embeddings[i], embeddings[j]) for i in range(4) for j in range(i + 1, 4)])
    assert dino_diversity(embeddings) == pytest.approx(expected)
    assert cosine_distance(np.array([1.0, 0]), np.array([0, 2.0])) == pytest.approx(1.0)


def direct_cmmd(x, y, sigma, scale):
    def k(a, b):
        return math.exp(-sum((p - q) ** 2 for p, q in zip(a, b)) / (2 * sigma**2))

    kxx = np.mean([k(a, b) for a in x for b in x])
    kyy = np.mean([k(a, b) for a in y for b in y])
    kxy = np.mean([k(a, b) for a in x for b in y])
    return scale * (kxx + kyy - 2 * kxy)


def test_cmmd():
    x = rng.normal(size=(5, 4))
    assert cmmd(x, x) == pytest.approx(0.0, abs=1e-9)
    y = rng.normal(size=(3, 4)) + 1.0
    assert cmmd(x, y) == pytest.approx(direct_cmmd(x, y, 10.0, 1000.0), rel=1e-9)
    assert cmmd(x, y, sigma=1.5, scale=1.0) == pytest.approx(direct_cmmd(x, y, 1.5, 1.0), rel=1e-9)
    assert cmmd(x, y) == pytest.approx(cmmd(y, x)) and cmmd(x, y) > 0


@pytest.mark.skipif(importlib.util.find_spec("lpips") is not None, reason="lpips is installed")
def test_lpips_missing_says_how_to_install():
    with pytest.raises(UserError, match="pip install lpips"):
        LpipsDistance()


def test_resize_and_crop_follow_torchvision_conventions():
    image = Image.new("RGB", (300, 200))
    assert resize_short_side(image, 256).size == (384, 256)
    assert resize_short_side(Image.new("RGB", (200, 301)), 100).size == (100, 150)
    assert center_crop(Image.new("RGB", (384, 256)), 224).size == (224, 224)


def test_unreadable_image_is_named(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        load_rgb(path)


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoders")
    write_tiny_encoders(folder)
    return DinoEncoder.load(str(folder / "dino"), "cpu"), ClipEncoder.load(str(folder / "clip"), "cpu")


def test_tiny_encoders_embed_unit_vectors_and_are_labelled(tiny_encoders):
    dino, clip = tiny_encoders
    images = [Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)) for _ in range(3)]
    for encoder in (dino, clip):
        embeddings = encoder.embed_images(images)
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
        assert encoder.smoke_test and "SMOKE TEST" in encoder.describe()
        # The same image twice: DINO / CLIP-I of 1, diversity of 0.
        same = encoder.embed_images([images[0], images[0]])
        assert mean_pairwise_cosine(same[:1], same[1:]) == pytest.approx(1.0, abs=1e-6)
        assert dino_diversity(same) == pytest.approx(0.0, abs=1e-6)
    assert dino.preprocessing.resize == 37 and dino.preprocessing.crop == 32  # 256/224 of the crop
    texts = clip.embed_texts(["a dog in the snow", "a teapot", "a dog in the snow"])
    assert texts.shape[0] == 3 and np.allclose(texts[0], texts[2], atol=1e-6)


def test_embedding_cache_reuses_and_refreshes(tiny_encoders, tmp_path, monkeypatch):
    dino, _ = tiny_encoders
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    cache = EmbeddingCache(tmp_path / "cache")
    first = dino.embed_files(paths, batch_size=2, cache=cache)
    encoded = []
    original = DinoEncoder.embed_images
    monkeypatch.setattr(DinoEncoder, "embed_images", lambda self, images: encoded.append(len(images))
                        or original(self, images))
    np.testing.assert_array_equal(dino.embed_files(paths, cache=cache), first)
    assert encoded == []  # all three came from the cache
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))  # a changed file (new mtime) is encoded again
    refreshed = dino.embed_files(paths, cache=cache)
    assert encoded == [1] and not np.allclose(refreshed[1], first[1])
    np.testing.assert_array_equal(refreshed[[0, 2]], first[[0, 2]])


def test_dinov2_from_a_folder_uses_its_own_preprocessing(tmp_path):
    write_tiny_encoders(tmp_path)
    dinov2 = DinoEncoder.load(str(tmp_path / "dinov2"), "cpu")
    assert dinov2.architecture == "dinov2" and "dino (dinov2)" in dinov2.describe()
    # Its preprocessor_config.json (short side 36, crop 32), not DINO ViT's 256/224 rule (which would give 37).
    assert (dinov2.preprocessing.resize, dinov2.preprocessing.crop) == (36, 32)
    images = [Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)) for _ in range(2)]
    embeddings = dinov2.embed_images(images + images[:1])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert mean_pairwise_cosine(embeddings[:1], embeddings[2:]) == pytest.approx(1.0, abs=1e-6)
    assert mean_pairwise_cosine(embeddings[:1], embeddings[1:2]) < 0.9999


def test_scoring_sees_images_as_training_does(tiny_encoders, tmp_path):
    """One loader: EXIF orientation applied and transparency composited onto white, as waveft.io.images does."""
    dino, _ = tiny_encoders
    upright = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright.save(tmp_path / "upright.jpg", quality=100)
    transparent = Image.new("RGBA", (40, 40), (10, 200, 30, 0))
    transparent.save(tmp_path / "clear.png")
    Image.new("RGB", (40, 40), "white").save(tmp_path / "white.png")
    e = dino.embed_files([tmp_path / name for name in ("phone.jpg", "upright.jpg", "clear.png", "white.png")])
    assert load_rgb(tmp_path / "phone.jpg").size == (60, 40)
    assert mean_pairwise_cosine(e[:1], e[1:2]) > 0.99 and mean_pairwise_cosine(e[2:3], e[3:]) == pytest.approx(1.0)
