"""The qualitative grid: one row per subject (and chosen prompt), one column per method, the same seed throughout,
as the paper's qualitative figure. The report copies each shown image under its folder (images/, and a small
copy in thumbs/) so that the page is self-contained, and also saves the grid as qualitative.png for papers."""
import textwrap
from dataclasses import dataclass
from pathlib import Path

from eval.files import MANIFEST
from eval.report_plots import pyplot, save_figure
from waveft.infer.generation import read_manifest
from waveft.io.files import write_atomic
from waveft.io.images import load_rgb

THUMBNAIL_SIZE = 256  # longest side, pixels


@dataclass
class Cell:
    image: Path  # the scored image
    full: str  # its copy, relative to the report folder
    thumb: str


@dataclass
class GridRow:
    subject: str
    prompt_index: int
    prompt: str
    cells: list  # one Cell (or None: no such image) per column


def _folder_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text) or "_"


def grid_rows(columns: list, prompt_indices: list[int], seed: int | None) -> tuple[list[GridRow], int | None]:
    """Rows for every subject of `columns` (report groups) x prompt index; the seed defaults to the lowest one
    the first images folder holds. Each cell is the image of the column's first run (by path) of that subject."""
    manifests = {}
    for group in columns:
        for run in sorted(group.runs, key=lambda r: str(r.path)):
            if run.images_dir is not None and run.images_dir not in manifests:
                manifests[run.images_dir] = list(read_manifest(run.images_dir / MANIFEST).values())
    if seed is None:
        seeds = [row.seed for rows in manifests.values() for row in rows]
        seed = min(seeds) if seeds else None
    subjects = sorted({s for g in columns for r in g.runs for s in r.per_subject})
    rows = []
    for subject in subjects:
        for prompt_index in prompt_indices:
            cells, prompt = [], None
            for column, group in enumerate(columns):
                found = _find_image(group, subject, prompt_index, seed, manifests)
                if found is None:
                    cells.append(None)
                    continue
                path, prompt = found
                name = f"{column:02d}-{_folder_name(group.label)}/{_folder_name(subject)}/{path.name}"
                cells.append(Cell(path, f"images/{name}", f"thumbs/{name}"))
            if prompt is not None:
                rows.append(GridRow(subject, prompt_index, prompt, cells))
    return rows, seed


def _find_image(group, subject: str, prompt_index: int, seed, manifests) -> tuple[Path, str] | None:
    for run in sorted(group.runs, key=lambda r: str(r.path)):
        for row in manifests.get(run.images_dir, []):
            if (row.detail("subject"), row.detail("prompt_index"), row.seed) == (subject, prompt_index, seed):
                return run.images_dir / row.file, row.prompt
    return None


def write_grid_images(rows: list[GridRow], out: Path) -> None:
    """Copy each shown image to out/images/... and a thumbnail of it to out/thumbs/..."""
    for row in rows:
        for cell in filter(None, row.cells):
            image = load_rgb(cell.image)
            write_atomic(out / cell.full, lambda f, image=image: image.save(f, format="PNG"))
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            write_atomic(out / cell.thumb, lambda f, image=image: image.save(f, format="PNG"))


def save_qualitative_png(rows: list[GridRow], labels: list[str], path: Path, seed, smoke_test: bool) -> None:
    """The grid as one figure: subjects (and prompts) down, methods across."""
    plt = pyplot()
    figure, axes = plt.subplots(len(rows), len(labels), figsize=(2.2 * len(labels) + 1.6, 2.2 * len(rows)),
                                squeeze=False)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row.cells):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if cell is not None:
                axis.imshow(load_rgb(cell.image))
            else:
                axis.text(0.5, 0.5, "n/a", ha="center", va="center", transform=axis.transAxes)
            if r == 0:
                axis.set_title(labels[c], fontsize=9)
            if c == 0:
                axis.set_ylabel(f"{row.subject}\n" + "\n".join(textwrap.wrap(row.prompt, 24)), fontsize=7)
    figure.suptitle(f"Qualitative comparison, seed {seed}" + (" [SMOKE TEST]" if smoke_test else ""))
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
