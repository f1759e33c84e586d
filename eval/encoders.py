"""Image and text encoders for the metrics: DINO (ViTModel or Dinov2Model) and CLIP (CLIPModel), from Hub ids or
local folders.

Preprocessing is done here with PIL and numpy rather than transformers' image processors: those pick a
torchvision backend when torchvision is installed and a PIL one when it is not, and the two round
differently; doing it here gives the same numbers on every machine. The recipes follow the protocol:
  DINO: resize the short side to crop*256/224 (256 for 224 px models), bicubic; centre crop; ImageNet mean/std.
  DINOv2: its preprocessor_config.json's (facebook/dinov2-*: short side 256, bicubic, centre crop 224, ImageNet).
  CLIP: resize the short side to the model's image size, bicubic; centre crop; CLIP mean/std.
Embeddings come back L2-normalised, float32, one row per input.

A folder holding `SMOKE_TEST_ENCODER.md` (written by `python -m eval.tiny_encoders`) is a tiny random
encoder: it loads like any other, and its `smoke_test` flag makes every table say so. torch is imported where an
encoder runs, so that the commands whose settings name encoders answer --help without loading it.
"""
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from waveft.errors import UserError
from waveft.hub import check_model_source
from waveft.io.files import write_atomic
from waveft.io.images import load_rgb

if TYPE_CHECKING:
    import torch

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_CMMD_CLIP = "openai/clip-vit-large-patch14-336"
SMOKE_TEST_MARKER = "SMOKE_TEST_ENCODER.md"

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocessing:
    resize: int  # short side after a bicubic resize
    crop: int  # centre crop, square
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def describe(self) -> str:
        return f"resize {self.resize} bicubic, centre crop {self.crop}, mean {self.mean}, std {self.std}"

    def __call__(self, images: list[Image.Image]) -> "torch.Tensor":
        import torch

        arrays = [np.asarray(center_crop(resize_short_side(im, self.resize), self.crop), np.float32) for im in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        return (pixels - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's `Resize(size)` on a PIL image: the short side becomes `size`, the long side is truncated."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's `CenterCrop(size)`: offsets rounded half to even, as `int(round(...))` does there."""
    width, height = image.size
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _fingerprint(name_or_path: str, commit_hash: str | None) -> str:
    """What identifies the weights: a Hub id and its commit, or a local folder's files by size and mtime."""
    if os.path.isdir(name_or_path):
        folder = Path(name_or_path).resolve()
        stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
        return f"{folder}:{stats}"
    return f"{name_or_path}@{commit_hash}"


def _load(model_class, name_or_path: str, **kwargs):
    check_model_source(name_or_path, "encoder")
    try:
        return model_class.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load encoder {name_or_path!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "pass a Hub id or a local folder (offline smoke tests: python -m eval.tiny_encoders DIR)"
        ) from None


def _load_weights(model_class, name_or_path: str, role: str, **kwargs):
    """`_load` of a model whose every weight must come from the checkpoint: a checkpoint of another architecture
    (a CLIP folder given as the DINO encoder) loads with its weights reported missing and randomly initialised,
    and would score with a random network, so it is refused, naming the role and the first missing weight."""
    model, info = _load(model_class, name_or_path, output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(f"encoder {name_or_path!r} given as the {role} lacks {len(missing)} of the "
                        f"{model_class.__name__}'s weights (first: {missing[0]}): it is not a {role} checkpoint")
    return model


def _checked_config(name_or_path: str, role: str, model_types: tuple[str, ...]):
    """The checkpoint's config, refused unless its model type is one `role` can use."""
    from transformers import AutoConfig

    config = _load(AutoConfig, name_or_path)
    if config.model_type not in model_types:
        raise UserError(f"encoder {name_or_path!r} given as the {role} is a {config.model_type!r} model; the "
                        f"{role} must be one of: {', '.join(model_types)}")
    return config


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ImageEncoder:
    """An image encoder with its preprocessing; subclasses say how a pixel batch becomes embeddings."""

    kind: str  # "dino" or "clip"
    role: str  # what error messages call it
    model_types: tuple[str, ...]  # the checkpoint config's model_type values it can load
    architecture: str | None = None  # said in describe() where one kind has several

    def __init__(self, name_or_path: str, model, preprocessing: Preprocessing, device: str):
        self.name = name_or_path
        self.model = model.eval().to(device)
        self.preprocessing = preprocessing
        self.device = device
        self.smoke_test = os.path.isfile(os.path.join(name_or_path, SMOKE_TEST_MARKER))
        self.fingerprint = _fingerprint(name_or_path, getattr(model.config, "_commit_hash", None))

    @classmethod
    def check_source(cls, name_or_path: str) -> None:
        """Without loading weights (a sweep's dry run): a folder must hold a config of a model type this encoder
        can load; a path that does not exist is refused; a Hub id is left to the load."""
        from waveft.hub import looks_like_path

        if os.path.exists(name_or_path):
            _checked_config(name_or_path, cls.role, cls.model_types)
        elif looks_like_path(name_or_path):
            raise UserError(f"{cls.role} folder not found: {name_or_path}")

    def describe(self) -> str:
        label = " [SMOKE TEST: tiny random weights]" if self.smoke_test else ""
        kind = f"{self.kind} ({self.architecture})" if self.architecture else self.kind
        return f"{kind} {self.name}{label}; {self.preprocessing.describe()}"

    def _features(self, pixels: "torch.Tensor") -> "torch.Tensor":
        raise NotImplementedError

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            features = self._features(self.preprocessing(images).to(self.device)).float()
            return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()

    def embed_files(self, paths: list[Path], batch_size: int = 32, cache: "EmbeddingCache | None" = None,
                    desc: str | None = None) -> np.ndarray:
        """Embeddings of image files, in order; files in `cache` are not re-encoded, new ones are added to it."""
        embeddings = [cache.get(self, p) if cache else None for p in paths]
        todo = [i for i, e in enumerate(embeddings) if e is None]
        batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
        for batch in tqdm(batches, desc=desc or f"{self.kind} images", unit="batch", disable=not batches):
            for i, embedding in zip(batch, self.embed_images([load_rgb(paths[i]) for i in batch])):
                embeddings[i] = embedding
                if cache:
                    cache.put(self, paths[i], embedding)
        return np.stack(embeddings)


class DinoEncoder(ImageEncoder):
    """DINO ViT (facebook/dino-vits16) or DINOv2 (facebook/dinov2-base): the CLS token of the last hidden state
    (DINO checkpoints carry no pooler weights; DINOv2's pooler output is the layer-normed CLS token, which the
    last hidden state already holds). The architecture is read from the checkpoint's config."""

    kind = "dino"
    role = "DINO encoder"
    model_types = ("vit", "dinov2")

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_DINO, device: str | None = None) -> "DinoEncoder":
        from transformers import Dinov2Model, ViTModel

        config = _checked_config(name_or_path, cls.role, cls.model_types)
        if config.model_type == "dinov2":
            model = _load_weights(Dinov2Model, name_or_path, cls.role)
            preprocessing = dinov2_preprocessing(name_or_path)
        else:
            model = _load_weights(ViTModel, name_or_path, cls.role, add_pooling_layer=False)
            crop = model.config.image_size
            preprocessing = Preprocessing(round(crop * 256 / 224), crop, IMAGENET_MEAN, IMAGENET_STD)
        encoder = cls(name_or_path, model, preprocessing, device or default_device())
        encoder.architecture = config.model_type  # "vit" or "dinov2", named in every table's settings
        return encoder

    def _features(self, pixels: "torch.Tensor") -> "torch.Tensor":
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


def dinov2_preprocessing(name_or_path: str) -> Preprocessing:
    """DINOv2's own recipe, from its preprocessor_config.json (facebook/dinov2-*: resize the short side to 256,
    bicubic, centre crop 224, ImageNet mean/std); those values where the checkpoint has no such file."""
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path)
    except (OSError, ValueError):
        processor = {}
    size, crop = processor.get("size") or {}, processor.get("crop_size") or {}
    mean, std = processor.get("image_mean", IMAGENET_MEAN), processor.get("image_std", IMAGENET_STD)
    return Preprocessing(size.get("shortest_edge", 256), crop.get("height", 224), tuple(mean), tuple(std))


class ClipEncoder(ImageEncoder):
    """CLIP: projected image embeddings, and projected text embeddings for CLIP-T."""

    kind = "clip"
    role = "CLIP encoder"
    model_types = ("clip",)

    def __init__(self, name_or_path, model, preprocessing, device, tokenizer):
        super().__init__(name_or_path, model, preprocessing, device)
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_CLIP, device: str | None = None) -> "ClipEncoder":
        from transformers import CLIPModel, CLIPTokenizer

        _checked_config(name_or_path, cls.role, cls.model_types)
        model = _load_weights(CLIPModel, name_or_path, cls.role)
        tokenizer = _load(CLIPTokenizer, name_or_path)
        size = model.config.vision_config.image_size
        return cls(name_or_path, model, Preprocessing(size, size, CLIP_MEAN, CLIP_STD), device or default_device(),
                   tokenizer)

    def _features(self, pixels: "torch.Tensor") -> "torch.Tensor":
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                        max_length=self.tokenizer.model_max_length, return_tensors="pt")
                features = self.model.get_text_features(**tokens.to(self.device)).pooler_output.float()
                chunks.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
        return np.concatenate(chunks)


class EmbeddingCache:
    """Embeddings of (real) images on disk, one .npy per image, keyed by encoder weights + file path, size, mtime."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, encoder: ImageEncoder, image: Path) -> Path:
        stat = image.stat()
        key = f"{encoder.fingerprint}|{encoder.preprocessing}|{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        return self.folder / encoder.kind / f"{hashlib.sha256(key.encode()).hexdigest()}.npy"

    def get(self, encoder: ImageEncoder, image: Path) -> np.ndarray | None:
        path = self._path(encoder, image)
        try:
            return np.load(path) if path.is_file() else None
        except (OSError, ValueError):  # a damaged entry is recomputed and overwritten
            return None

    def put(self, encoder: ImageEncoder, image: Path, embedding: np.ndarray) -> None:
        write_atomic(self._path(encoder, image), lambda f: np.save(f, embedding))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "waveft" / "eval-embeddings"
