"""Download the DreamBooth benchmark (google/dreambooth, CC BY 4.0) into DEST.

    python scripts/download_dreambooth.py DEST

Writes DEST/dataset/<subject>/*.jpg, DEST/dataset/prompts_and_classes.txt,
DEST/dataset/references_and_licenses.txt, DEST/LICENSE.md and DEST/README.md, exactly as published at
the pinned commit. The download is unpacked beside DEST and moved into place only once it checks out,
so an interrupted run leaves no half-written DEST.
"""
import argparse
import io
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from eval.protocol import load_benchmark, real_image_paths
from waveft.errors import UserError, cli_entry

COMMIT = "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0"
ARCHIVE_URL = f"https://codeload.github.com/google/dreambooth/zip/{COMMIT}"
KEPT = ("dataset/", "LICENSE.md", "README.md")
EXPECTED_SUBJECTS = 30


def download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise UserError(f"cannot download {url}: {exc}") from None


def unpack(archive: bytes, dest: Path) -> None:
    """Copy the kept paths out of the GitHub archive, whose entries all sit under `dreambooth-<commit>/`."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            prefix = f"dreambooth-{COMMIT}/"
            for entry in zf.infolist():
                relative = entry.filename.removeprefix(prefix)
                if entry.is_dir() or not entry.filename.startswith(prefix) or not relative.startswith(KEPT):
                    continue
                target = dest / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(entry))
    except zipfile.BadZipFile as exc:
        raise UserError(f"the download from {ARCHIVE_URL} is not a zip archive: {exc}") from None


def check(dest: Path) -> int:
    benchmark = load_benchmark(dest)
    if len(benchmark.subjects) != EXPECTED_SUBJECTS:
        raise UserError(f"expected {EXPECTED_SUBJECTS} subjects in the download, found {len(benchmark.subjects)}")
    return sum(len(real_image_paths(dest, s.name)) for s in benchmark.subjects)


@cli_entry
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="folder to create (must not exist yet)")
    args = parser.parse_args(argv)
    dest = args.dest.resolve()
    if dest.exists():
        raise UserError(f"{dest} already exists; remove it or choose another folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {ARCHIVE_URL}")
    archive = download(ARCHIVE_URL)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        unpack(archive, staging)
        num_images = check(staging)
        (staging / "SOURCE.md").write_text(
            f"Downloaded unchanged from google/dreambooth (commit {COMMIT}): `dataset/`, LICENSE.md (CC BY 4.0), "
            "README.md.\nUnsplash-sourced images keep the Unsplash license named in "
            "`dataset/references_and_licenses.txt`.\n")
        staging.replace(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {EXPECTED_SUBJECTS} subjects, {num_images} images to {dest}")


if __name__ == "__main__":
    main()
