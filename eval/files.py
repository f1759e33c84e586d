"""File helpers shared by the eval CLIs: JSON and the generation manifest (atomic writes: waveft.io.files)."""
import json
from pathlib import Path

from eval.layout import MANIFEST
from waveft.errors import UserError
from waveft.infer.generation import ManifestRow, read_manifest

MANIFEST_KEYS = ("file", "subject", "prompt", "prompt_index", "seed")


def read_json(path: str | Path) -> dict:
    """A JSON file holding an object (every JSON file this project writes does); anything else is a UserError
    naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def json_field(data: dict, key: str, kind: type, path: str | Path):
    """`data[key]`, refused naming the file and key unless it is a `kind` (a file of another shape or origin)."""
    value = data.get(key)
    if not isinstance(value, kind):
        raise UserError(f"{path}: key '{key}' must be a {kind.__name__}, found {type(value).__name__}")
    return value


def scorable_rows(images_dir: str | Path, keys: tuple[str, ...] = MANIFEST_KEYS) -> list[ManifestRow]:
    """Rows of `images_dir/manifest.jsonl`, checked: the keys scoring needs, and every named image present."""
    images_dir = Path(images_dir)
    path = images_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {images_dir} (generate images with: python -m eval.generate_benchmark)")
    rows = list(read_manifest(path, keys).values())
    if not rows:
        raise UserError(f"{path} lists no images")
    absent = [row.file for row in rows if not (images_dir / row.file).is_file()]
    if absent:
        raise UserError(f"{path} names {len(absent)} missing image file(s), first: {images_dir / absent[0]}")
    return rows
