"""scripts/download_dreambooth.py without the network: a GitHub-style archive built here stands in for the download."""
import importlib.util
import io
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import prompts_file_text, random_image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "download_dreambooth.py"


@pytest.fixture
def downloader():
    spec = importlib.util.spec_from_file_location("download_dreambooth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def github_archive(commit: str, subjects: int) -> bytes:
    """A zip laid out like GitHub's: everything under dreambooth-<commit>/, with files the script must leave out."""
    rng = np.random.default_rng(0)
    names = {f"subject{i:02d}": "dog" if i < 9 else "toy" for i in range(subjects)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        prefix = f"dreambooth-{commit}/"
        zf.writestr(prefix + "dataset/prompts_and_classes.txt", prompts_file_text(names))
        for name in names:
            image = io.BytesIO()
            random_image(rng, 8, 8).save(image, format="JPEG")
            zf.writestr(prefix + f"dataset/{name}/00.jpg", image.getvalue())
        zf.writestr(prefix + "LICENSE.md", "CC BY 4.0")
        zf.writestr(prefix + "README.md", "DreamBooth")
        zf.writestr(prefix + "docs/index.html", "not part of the benchmark")
    return buffer.getvalue()


def test_unpacks_the_benchmark(downloader, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(downloader, "download", lambda url: github_archive(downloader.COMMIT, 30))
    downloader.main([str(tmp_path / "dreambooth")])
    dest = tmp_path / "dreambooth"
    assert sorted(p.name for p in dest.iterdir()) == ["LICENSE.md", "README.md", "SOURCE.md", "dataset"]
    assert len([p for p in (dest / "dataset").iterdir() if p.is_dir()]) == 30
    assert downloader.COMMIT in (dest / "SOURCE.md").read_text()
    assert list(tmp_path.iterdir()) == [dest]  # no staging folder left
    assert "wrote 30 subjects, 30 images" in capsys.readouterr().out


def test_a_wrong_archive_leaves_nothing_behind(downloader, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(downloader, "download", lambda url: github_archive(downloader.COMMIT, 4))
    with pytest.raises(SystemExit) as exit_info:
        downloader.main([str(tmp_path / "dreambooth")])
    assert exit_info.value.code == 2
    assert "error: expected 30 subjects in the download, found 4" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_no_network_is_a_one_line_error(downloader, tmp_path, monkeypatch, capsys):
    def unreachable(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(downloader.urllib.request, "urlopen", unreachable)
    with pytest.raises(SystemExit):
        downloader.main([str(tmp_path / "dreambooth")])
    assert capsys.readouterr().err.strip() == (
        f"error: cannot download {downloader.ARCHIVE_URL}: <urlopen error Name or service not known>")
    assert list(tmp_path.iterdir()) == []
