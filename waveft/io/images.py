"""Reading images the one way training and scoring share: EXIF orientation applied, transparency onto white, masks."""
import os

from PIL import Image, ImageOps, UnidentifiedImageError

from waveft.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


MASK_SUFFIX = ".mask.png"  # NAME.mask.png beside NAME.jpg: the masked loss's sidecar, never a training image


def list_images(folder: str, what: str = "instance folder") -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"{what} not found: {folder}")
    files = sorted(
        os.path.join(folder, name) for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.lower().endswith(MASK_SUFFIX)
    )
    if not files:
        raise UserError(f"{what} {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _open_upright(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None


def load_rgb(path) -> Image.Image:
    """Open an image upright (EXIF orientation) in RGB; transparency is composited onto white. The one image
    loader of the project: training, scoring and reports see the same pixels."""
    img = _open_upright(path)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_mask(path: str, source: str) -> Image.Image:
    """The loss mask of the image at `path`, upright, as a greyscale image of the image's size (white: learn).

    source "alpha": the image's own alpha channel; "sidecar": NAME.mask.png beside it.
    """
    if source == "alpha":
        img = _open_upright(path)
        if not (img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)):
            raise UserError(f"data.masks.source=alpha: image {path} has no alpha channel")
        return img.convert("RGBA").getchannel("A")
    mask_path = os.path.splitext(path)[0] + MASK_SUFFIX
    if not os.path.isfile(mask_path):
        raise UserError(f"data.masks.source=sidecar: mask {mask_path} for image {path} not found")
    mask = _open_upright(mask_path).convert("L")
    size = _open_upright(path).size
    if mask.size != size:
        raise UserError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]}, its image {path} is {size[0]}x{size[1]}")
    return mask
