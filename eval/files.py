"""File helpers shared by the eval CLIs: JSON and the generation manifest (atomic writes: waveft.files)."""
import json
from pathlib import Path

from waveft.errors import UserError
from waveft.generate import MANIFEST_NAME as MANIFEST

MANIFEST_KEYS = ("file", "subject", "prompt", "prompt_index", "seed")
def read_json(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def read_manifest(images_dir: str | Path) -> list[dict]:
    """Rows of `images_dir/manifest.jsonl`, checked: the keys scoring needs, and every named image present."""
    images_dir = Path(images_dir)
    path = images_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {images_dir} (generate images with: python -m eval.generate_benchmark)")
    rows, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not a JSON row ({exc})") from None
            missing = [k for k in MANIFEST_KEYS if k not in row] if isinstance(row, dict) else list(MANIFEST_KEYS)
            if missing:
                raise UserError(f"{path}:{number}: missing keys {', '.join(missing)}")
            if row["file"] in seen:
                raise UserError(f"{path}:{number}: {row['file']} is listed twice")
            seen.add(row["file"])
            rows.append(row)
    if not rows:
        raise UserError(f"{path} lists no images")
    absent = [row["file"] for row in rows if not (images_dir / row["file"]).is_file()]
    if absent:
        raise UserError(f"{path} names {len(absent)} missing image file(s), first: {images_dir / absent[0]}")
    return rows
