"""The image grid that generation writes: each image over a caption of its seed and prompt."""
import numpy as np
from PIL import Image

from waveft.infer.generation import ManifestRow, prompt_seed_jobs, save_grid


def test_grid_captions_each_image_with_its_seed_and_prompt(tmp_path):
    rows = [ManifestRow(job, {}) for job in prompt_seed_jobs(["a zjw ball", "a zjw ball in the snow"], [3, 4])]
    for row in rows:
        Image.new("RGB", (32, 32), (128, 128, 128)).save(tmp_path / row.file)
    grid = np.asarray(Image.open(save_grid(rows, str(tmp_path), columns=2)).convert("L")).astype(int)
    tile_height = grid.shape[0] // 2
    assert grid.shape[1] == 2 * 32 and tile_height > 32
    captions = [grid[r * tile_height + 32:(r + 1) * tile_height, c * 32:(c + 1) * 32] for r in (0, 1) for c in (0, 1)]
    assert all(caption.min() < 100 for caption in captions)  # dark text under every image
    # Each caption is its own: the seeds differ along a row, the prompts down a column.
    assert not np.array_equal(captions[0], captions[1]) and not np.array_equal(captions[0], captions[2])
